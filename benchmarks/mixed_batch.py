"""Many adapters in one batch, side by side in one process: lora_fx mixed_batch (eager, compiled) vs the
single-adapter graph, PEFT's `adapter_names` loop and one forward per adapter (each adapter's rows through the
single-adapter graph; switching its weights not counted), for K = 1, 4, 8, 16 adapters on the
Llama benchmark model (inference, batch 16 rows x 128 tokens, every adapter all-linear r=8). Then the design
measurements: stacking the factors per call (its share of a forward), padding ranks vs one op per rank, and
gathering per row (BGMV) vs sorting rows into per-adapter segments (SGMV) on this CPU.

    python -m benchmarks.mixed_batch            # writes benchmarks/results/mixed_batch.{json,md,png}
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import peft
import torch

import lora_fx
from benchmarks.common import RESULTS, machine, median_seconds as common_median
from benchmarks.models import llama, token_batch
from lora_fx import LoraSpec
from lora_fx.ops.mixed_lora import expand_reference, shrink_reference

ROWS, SEQ, RANK, COUNTS = 16, 128, 8, (1, 4, 8, 16)
EXAMPLE = {"example_args": (token_batch(batch=2, seq=16),), "example_kwargs": {"use_cache": False}}


def median_seconds(run, repeats: int, warmup: int = 2) -> float:
    """Median CPU time of `run()` (this process, one torch thread): unlike wall time, it does not grow when other
    jobs share the cores."""
    return common_median(run, repeats, warmup, clock=time.process_time)


def timed_rows(calls: dict, repeats: int, rounds: int = 2) -> dict[str, float]:
    """Best-of-`rounds` median seconds per call; rounds interleave the calls so drift hits all alike."""
    best = {}
    for _ in range(rounds):
        for name, call in calls.items():
            seconds = median_seconds(call, repeats)
            best[name] = min(seconds, best.get(name, float("inf")))
            print(f"  {name}: {seconds * 1e3:.1f} ms", flush=True)
    return best


def names(count: int) -> list[str]:
    return [f"a{k}" for k in range(count)]


def row_ids(count: int) -> torch.Tensor:
    return torch.arange(ROWS) % count                       # every adapter gets ROWS / count rows


def randomized(module) -> None:
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)


def lora_fx_graph(model, count: int):
    gm = lora_fx.capture(model, **EXAMPLE)
    for name in names(count):
        lora_fx.apply(gm, LoraSpec(targets="all-linear", rank=RANK, alpha=2.0 * RANK, adapter=name))
    randomized(gm)
    return gm.eval()


def peft_with(model, count: int):
    config = lambda: peft.LoraConfig(target_modules="all-linear", r=RANK, lora_alpha=2 * RANK)
    module = peft.get_peft_model(copy.deepcopy(model), config(), adapter_name="a0")
    for name in names(count)[1:]:
        module.add_adapter(name, config())
    randomized(module)
    return module.eval()


def variants(model, ids) -> dict:
    """name -> (K or None, call())."""
    single = lora_fx_graph(model, 1)
    every = lora_fx_graph(model, max(COUNTS))
    reference = peft_with(model, max(COUNTS))
    compiled_single = torch.compile(single)
    found = {"single-adapter graph, eager": (None, lambda: single(ids)),
             "single-adapter graph, compiled": (None, lambda: compiled_single(ids))}
    for count in COUNTS:
        mixed = lora_fx.mixed_batch(every, names(count)).eval()
        compiled = torch.compile(mixed)
        rows = row_ids(count)
        peft_names = [f"a{k}" for k in rows.tolist()]
        found[f"K={count} lora_fx mixed, eager"] = (count, lambda m=mixed, r=rows: m(ids, adapter_ids=r))
        found[f"K={count} lora_fx mixed, compiled"] = (count, lambda m=compiled, r=rows: m(ids, adapter_ids=r))
        found[f"K={count} PEFT adapter_names loop, eager"] = (
            count, lambda n=peft_names: reference(input_ids=ids, adapter_names=n, use_cache=False))
        found[f"K={count} lora_fx one forward per adapter, eager"] = (
            count, lambda c=count, r=rows: [single(ids[r == k]) for k in range(c)])
    return found


# ---- design measurements -----------------------------------------------------------------------------------------

def stacking_share(model, ids) -> list[dict]:
    """Per call, the graph stacks every site's factors: time that work alone against a whole mixed forward."""
    every = lora_fx_graph(model, max(COUNTS))
    sites = lora_fx.adapter_weights(every, "a0").keys()
    rows = []
    for count in COUNTS:
        weights = [lora_fx.adapter_weights(every, name) for name in names(count)]
        scales = [torch.tensor(2.0) for _ in range(count)]

        def stack_all():
            for fqn in sites:
                torch.stack([w[fqn][0] for w in weights]), torch.stack([w[fqn][1] for w in weights])
                torch.stack(scales)
        mixed = lora_fx.mixed_batch(every, names(count)).eval()
        stacking = median_seconds(stack_all, repeats=20, warmup=3)
        forward = median_seconds(lambda: mixed(ids, adapter_ids=row_ids(count)), repeats=5, warmup=2)
        rows.append({"K": count, "stacking ms": stacking * 1e3, "mixed forward ms": forward * 1e3,
                     "share": stacking / forward})
    return rows


def site_inputs(count: int, ranks: list[int], tokens: int, rows: int, width: int = 512, out: int = 1365):
    generator = torch.Generator().manual_seed(0)
    rank = max(ranks)
    lora_A, lora_B = torch.zeros(count, rank, width), torch.zeros(count, out, rank)
    for k, r in enumerate(ranks):
        lora_A[k, :r] = torch.randn(r, width, generator=generator)
        lora_B[k, :, :r] = torch.randn(out, r, generator=generator)
    x = torch.randn(rows, tokens, width, generator=generator)
    y = torch.randn(rows, tokens, out, generator=generator)
    return x, y, lora_A, lora_B, torch.full((count,), 2.0), torch.arange(rows) % count


def bgmv(x, y, lora_A, lora_B, scales, ids):
    return expand_reference(y, shrink_reference(x, lora_A, ids), lora_B, scales, ids)


def sgmv(x, y, lora_A, lora_B, scales, ids):
    """Rows sorted into one segment per adapter; one matmul pair per segment (index_select in, index_add out)."""
    out = y.clone()
    for k in torch.unique(ids).tolist():
        rows = (ids == k).nonzero().squeeze(1)
        segment = x.index_select(0, rows).flatten(0, 1)                                     # (n_k·L, in)
        delta = (segment @ lora_A[k].T * scales[k]) @ lora_B[k].T                          # (n_k·L, out)
        out.index_add_(0, rows, delta.unflatten(0, (len(rows), -1)))
    return out


def segmented_by_rank(x, y, lora_A, lora_B, scales, ids, ranks):
    """One shrink/expand pair per distinct rank, each over its adapters' rows only (others routed as -1)."""
    out = y
    for rank in sorted(set(ranks)):
        members = torch.tensor([r == rank for r in ranks])
        group = torch.where(members[ids], ids, -1)
        out = expand_reference(out, shrink_reference(x, lora_A[:, :rank], group), lora_B[..., :rank], scales, group)
    return out


def kernel_choices() -> list[dict]:
    rows = []
    with torch.no_grad():
        for shape in ((ROWS, SEQ), (ROWS, 1), (256, 1)):
            for count in COUNTS:
                args = site_inputs(count, [RANK] * count, shape[1], shape[0])
                torch.testing.assert_close(bgmv(*args), sgmv(*args), rtol=1e-4, atol=1e-3)
                times = {name: median_seconds(lambda f=f: f(*args), repeats=30, warmup=5)
                         for name, f in (("BGMV", bgmv), ("SGMV", sgmv))}
                rows.append({"study": "BGMV vs SGMV", "batch": f"{shape[0]} x {shape[1]}", "K": count,
                             "variant": "BGMV gather per row (ours)", "ms": times["BGMV"] * 1e3, "vs ours": 1.0})
                rows.append({"study": "BGMV vs SGMV", "batch": f"{shape[0]} x {shape[1]}", "K": count,
                             "variant": "SGMV sorted segments", "ms": times["SGMV"] * 1e3,
                             "vs ours": times["SGMV"] / times["BGMV"]})
        for ranks in ([RANK] * 8, [4, 8, 8, 8, 8, 8, 8, 16], [2, 4, 8, 8, 16, 16, 32, 64]):
            args = site_inputs(len(ranks), ranks, SEQ, ROWS)
            torch.testing.assert_close(bgmv(*args), segmented_by_rank(*args, ranks), rtol=1e-4, atol=1e-3)
            padded = median_seconds(lambda: bgmv(*args), repeats=30, warmup=5)
            segmented = median_seconds(lambda: segmented_by_rank(*args, ranks), repeats=30, warmup=5)
            label = "ranks " + ",".join(map(str, ranks))
            rows.append({"study": "padding vs segmenting by rank", "batch": f"{ROWS} x {SEQ}", "K": len(ranks),
                         "variant": f"{label}: padded to {max(ranks)} (ours)", "ms": padded * 1e3, "vs ours": 1.0})
            rows.append({"study": "padding vs segmenting by rank", "batch": f"{ROWS} x {SEQ}", "K": len(ranks),
                         "variant": f"{label}: one op pair per rank", "ms": segmented * 1e3,
                         "vs ours": segmented / padded})
    return rows


# ---- results -----------------------------------------------------------------------------------------------------

def table(rows: list[dict]) -> list[str]:
    headers = list(rows[0])
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    return (["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            + ["| " + " | ".join(cell(row[h]) for h in headers) + " |" for row in rows])


def plot(throughput: dict, counts: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for label, style in (("lora_fx mixed, eager", "o-"), ("lora_fx mixed, compiled", "s-"),
                         ("PEFT adapter_names loop, eager", "^-"), ("lora_fx one forward per adapter, eager", "v--")):
        xs = [k for k in COUNTS if f"K={k} {label}" in throughput]
        axis.plot(xs, [throughput[f"K={k} {label}"] for k in xs], style, label=label)
    for label, style in (("single-adapter graph, eager", ":"), ("single-adapter graph, compiled", "-.")):
        axis.axhline(throughput[label], linestyle=style, color="gray", label=label)
    axis.set_xscale("log", base=2)
    axis.set_xticks(list(COUNTS), [str(k) for k in COUNTS])
    axis.set_xlabel("adapters in the batch (K)")
    axis.set_ylabel("tokens / s (higher is better)")
    axis.set_title(f"Llama 512x4, {ROWS} rows x {SEQ} tokens, r={RANK} per adapter, CPU inference")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = llama()
    ids = token_batch(batch=ROWS, seq=SEQ)
    load_before = os.getloadavg()[0]
    with torch.no_grad():
        print("throughput", flush=True)
        calls = variants(model, ids)
        seconds = timed_rows({name: call for name, (_, call) in calls.items()}, args.repeats)
        print("stacking share", flush=True)
        stacking = stacking_share(model, ids)
    print("kernel choices", flush=True)
    choices = kernel_choices()
    load_after = os.getloadavg()[0]
    tokens = ROWS * SEQ
    throughput = {name: tokens / s for name, s in seconds.items()}
    rows = []
    for name, s in seconds.items():
        mode = name.rsplit(", ", 1)[-1]
        single = seconds.get(f"single-adapter graph, {mode}", seconds["single-adapter graph, eager"])
        count = calls[name][0]
        loop = seconds.get(f"K={count} PEFT adapter_names loop, eager")
        rows.append({"variant": name, "ms": s * 1e3, "tokens/s": tokens / s,
                     "throughput vs single-adapter (same mode)": single / s,
                     "throughput vs PEFT loop (same K)": loop / s if loop else "-"})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mixed_batch.json").write_text(json.dumps(
        {"machine": machine(), "throughput": rows, "stacking": stacking, "kernel_choices": choices}, indent=2) + "\n")
    k8 = {mode: seconds[f"single-adapter graph, {mode}"] / seconds[f"K=8 lora_fx mixed, {mode}"]
          for mode in ("eager", "compiled")}
    loop8 = seconds["K=8 PEFT adapter_names loop, eager"]
    goals = [f"- K = 8, throughput vs the single-adapter graph: {k8['eager']:.2f}x eager, {k8['compiled']:.2f}x "
             f"compiled (goal >= 0.8x)",
             f"- K = 8, throughput vs PEFT's adapter_names loop: {loop8 / seconds['K=8 lora_fx mixed, eager']:.2f}x "
             f"eager, {loop8 / seconds['K=8 lora_fx mixed, compiled']:.2f}x compiled (goal >= 3x)"]
    lines = [f"# Mixed-adapter batches: Llama hidden 512 x 4 layers, vocab 2000, {ROWS} rows x {SEQ} tokens, "
             f"all-linear r={RANK} per adapter, inference", "", f"Machine: {machine()}", "",
             "No GPU was available for this run: every figure is CPU (the ops' torch reference). The Triton kernels "
             "were only run in the interpreter (correctness tests), never timed.", "",
             "Times are CPU time of the benchmark process with one torch thread (median; best of 2 interleaved "
             f"rounds): this machine was shared with other jobs (load average {load_before:.1f} before, "
             f"{load_after:.1f} after, on 2 cores), which makes wall times swing between identical calls. CPU time "
             "counts only this process's work.", "",
             "![mixed batch](mixed_batch.png)", "", *goals, "", *table(rows), "",
             "## Stacking the factors per call", "",
             "The graph stacks every site's factors in each forward (so gradients reach each adapter and optimizer "
             "steps show at once). What that costs, measured alone against a whole mixed forward (eager):", "",
             *table(stacking), "",
             "## Kernel choices (one site, in 512, out 1365, torch on this CPU)", "", *table(choices), ""]
    (RESULTS / "mixed_batch.md").write_text("\n".join(lines))
    plot(throughput, calls, RESULTS / "mixed_batch.png")
    print((RESULTS / "mixed_batch.md").read_text())


if __name__ == "__main__":
    main()
