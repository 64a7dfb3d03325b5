"""Training and inference step times, side by side in one process: full fine-tuning, the frozen-base floor, PEFT
(eager and compiled), lora_fx (eager and compiled, with and without sibling fusion); inference base / unmerged /
merged; the cost of an adapter switch; capture + apply time per model size.

    python -m benchmarks.train_step            # writes benchmarks/results/train_step.{json,md,png}
"""

from __future__ import annotations

import argparse
import copy
import time

import peft
import torch

import lora_fx
from benchmarks.common import RESULTS, median_seconds, training_step, write_results
from benchmarks.models import BATCH, SEQ, llama, token_batch
from lora_fx import LoraSpec
from lora_fx.apply import plan
from lora_fx.commit import commit
from lora_fx import fuse_siblings

RANK = 8
EXAMPLE = {"example_args": (token_batch(batch=2, seq=16),), "example_kwargs": {"use_cache": False}}


def lora_graph(model, fused: bool):
    gm = lora_fx.capture(model, **EXAMPLE)
    spec = LoraSpec(targets="all-linear", rank=RANK, alpha=2.0 * RANK)
    commit(gm, plan(gm, spec))
    if fused:
        fuse_siblings(gm)
    return gm


def peft_model(model):
    return peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules="all-linear", r=RANK,
                                                                      lora_alpha=2 * RANK))


def train_variants(model):
    """name -> (module, call(ids) -> logits)."""
    full = copy.deepcopy(model)
    floor = copy.deepcopy(model)
    for name, param in floor.named_parameters():     # a norm at the bottom: backward runs through every layer,
        param.requires_grad_(name == "model.layers.0.input_layernorm.weight")   # as it must for LoRA
    hf = lambda m: (lambda ids: m(input_ids=ids, use_cache=False).logits)
    graph = lambda m: (lambda ids: m(ids).logits)
    reference = peft_model(model)
    fused, unfused = lora_graph(model, fused=True), lora_graph(model, fused=False)
    compiled = torch.compile
    return {
        "full fine-tuning, eager": (full, hf(full)),
        "frozen base floor, compiled": (floor, hf(compiled(floor))),
        "PEFT, eager": (reference, hf(reference)),
        "PEFT, compiled": (reference, hf(compiled(reference))),
        "lora_fx, eager": (fused, graph(fused)),
        "lora_fx, compiled": (fused, graph(compiled(fused))),
        "lora_fx without sibling fusion, eager": (unfused, graph(unfused)),
        "lora_fx without sibling fusion, compiled": (unfused, graph(compiled(unfused))),
    }


def timed_rows(variants: dict, make_step, repeats: int, rounds: int = 2, clock=time.perf_counter) -> dict[str, float]:
    """Best-of-`rounds` median seconds per variant (wall time, or the `clock` given); rounds interleave the variants
    so drift hits all alike."""
    steps = {name: make_step(*variant) for name, variant in variants.items()}
    best = {}
    for _ in range(rounds):
        for name, step in steps.items():
            seconds = median_seconds(step, repeats=repeats, warmup=3, clock=clock)
            best[name] = min(seconds, best.get(name, float("inf")))
            print(f"  {name}: {seconds * 1e3:.1f} ms", flush=True)
    return best


def inference_variants(model):
    gm = lora_graph(model, fused=True)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.01)
    merged = lora_fx.merge(gm)
    base = lora_fx.capture(model, **EXAMPLE)
    for module in (gm, merged, base):
        module.eval()
    call = lambda m: (lambda ids: m(ids).logits)
    return {"base, eager": call(base), "base, compiled": call(torch.compile(base)),
            "lora_fx unmerged, eager": call(gm), "lora_fx unmerged, compiled": call(torch.compile(gm)),
            "lora_fx merged, eager": call(merged), "lora_fx merged, compiled": call(torch.compile(merged))}, gm


def switch_cost(model, ids) -> dict:
    """A second adapter, compiled once; then time set_active + the next forward, and count recompiles."""
    from torch._dynamo.utils import counters

    gm = lora_graph(model, fused=True).eval()
    spec = LoraSpec(targets="all-linear", rank=RANK, adapter="b")
    commit(gm, plan(gm, spec))
    compiled = torch.compile(gm)
    with torch.no_grad():
        compiled(ids)
        graphs = counters["stats"]["unique_graphs"]
        forward = median_seconds(lambda: compiled(ids), repeats=10, warmup=2)
        names = iter(["b", "default"] * 20)
        switch = median_seconds(lambda: (lora_fx.set_active(gm, next(names)), compiled(ids)), repeats=10, warmup=2)
    return {"forward ms": forward * 1e3, "switch + forward ms": switch * 1e3,
            "recompiles on switch": counters["stats"]["unique_graphs"] - graphs}


def capture_times(layer_counts) -> list[dict]:
    rows = []
    for layers in layer_counts:
        model = llama(layers=layers)
        started = time.perf_counter()
        gm = lora_fx.capture(model, **EXAMPLE)
        captured = time.perf_counter() - started
        lora_fx.apply(gm, LoraSpec(targets="all-linear", rank=RANK))
        rows.append({"layers": layers, "capture s": captured, "apply s": time.perf_counter() - started - captured})
    return rows


def plot(rows: dict[str, float], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    figure, axis = plt.subplots(figsize=(9, 4.5))
    bars = axis.barh(names[::-1], [rows[n] * 1e3 for n in names][::-1],
                     color=["#d95f02" if n.startswith("lora_fx") else "#7570b3" for n in names][::-1])
    axis.bar_label(bars, fmt="%.0f ms", padding=3)
    axis.set_xlabel("training step, ms (median; lower is better)")
    axis.set_title(f"Llama 512x4, vocab 2000, batch {BATCH}x{SEQ}, all-linear r={RANK}, AdamW")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = llama()
    ids = token_batch()
    print("training steps", flush=True)
    train = timed_rows(train_variants(model), lambda module, call: training_step(module, call, ids), args.repeats)
    full, floor = train["full fine-tuning, eager"], train["frozen base floor, compiled"]
    peft_compiled = train["PEFT, compiled"]
    train_rows = [{"variant": name, "ms": s * 1e3, "vs full FT": s / full, "vs floor": s / floor,
                   "vs PEFT compiled": s / peft_compiled} for name, s in train.items()]
    print("inference", flush=True)
    calls, _ = inference_variants(model)
    with torch.no_grad():
        infer = timed_rows({k: (v,) for k, v in calls.items()}, lambda call: (lambda: call(ids)), args.repeats)
    infer_rows = [{"variant": name, "ms": s * 1e3, "vs base (same mode)":
                   s / infer["base, " + name.split(", ")[-1]]} for name, s in infer.items()]
    print("adapter switch", flush=True)
    switch = switch_cost(model, ids)
    print("capture + apply", flush=True)
    capture_rows = capture_times([2, 4, 8, 16])
    write_results("train_step", f"Training step, Llama hidden 512 x 4 layers, vocab 2000, batch {BATCH} x {SEQ}, "
                                f"all-linear r={RANK}, AdamW", train_rows)
    write_results("inference", f"Inference forward, same model, batch {BATCH} x {SEQ}, r={RANK} unmerged vs merged",
                  infer_rows)
    write_results("adapter_switch", "Adapter switch under torch.compile (two adapters, set_active + forward)",
                  [switch])
    write_results("capture_time", "capture + apply (all-linear r=8) time by model depth", capture_rows)
    plot(train, RESULTS / "train_step.png")
    for name in ("train_step", "inference", "adapter_switch", "capture_time"):
        print((RESULTS / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
