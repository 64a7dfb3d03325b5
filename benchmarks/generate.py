"""Decoding speed, side by side in one process: lora_fx `generate` (one adapter unmerged, eager and compiled; merged;
the base), PEFT's `generate`, and transformers' own fastest path for the merged model (static cache + its
automatic torch.compile), on the Llama benchmark models, greedy, a fixed number of new tokens.

    python -m benchmarks.generate                # writes benchmarks/results/generate*.{json,md} and generate.png
    python -m benchmarks.generate mixed ranks    # those tables again
    python -m benchmarks.generate --quick        # one model, batch 1, fewer tokens: a smoke run

Also: K = 8 adapters in one decoding batch (`mixed_batch(...).generate(adapter_ids=...)`) against the
single-adapter graph and PEFT's `generate(adapter_names=...)`; the time per token as the generation grows (no prompt
recompute: flat apart from attention's share); the first token's latency; the KV cache's bytes; and the cost of
one adapter's branch in the compiled decode step at ranks 4 to 64 (unmerged against merged). Every timing is the
median of interleaved rounds, after a warm-up call that compiles.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

import lora_fx
from benchmarks.common import RESULTS, write_results
from benchmarks.models import llama, token_batch
from lora_fx import LoraSpec

RANK = 8
MODELS = {"llama 512x4": dict(hidden=512, layers=4), "llama 1024x8": dict(hidden=1024, layers=8)}


def randomized(gm, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def seconds_of(calls: dict, rounds: int) -> dict[str, float]:
    """Median wall seconds of each call over `rounds` interleaved rounds (each call warmed up once first)."""
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def peft_model(model, gm, adapters: list[str]):
    import peft

    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        target_modules="all-linear", r=RANK, lora_alpha=2 * RANK), adapter_name=adapters[0])
    for name in adapters[1:]:
        reference.add_adapter(name, peft.LoraConfig(target_modules="all-linear", r=RANK, lora_alpha=2 * RANK))
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if ".lora_" in name:
                params["base_model.model." + name].copy_(param)
    return reference.eval()


def static_compiled(merged_model):
    """transformers' fastest path: a static cache, whose decode step its `generate` compiles by itself. transformers
    compiles only on accelerators unless `CompileConfig._compile_all_devices` is set; its default mode,
    "reduce-overhead", is CUDA graphs, so on CPU the plain Inductor mode is asked for."""
    from transformers import CompileConfig

    model = copy.deepcopy(merged_model).eval()
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = CompileConfig(fullgraph=True, mode="default")
    model.generation_config.compile_config._compile_all_devices = True
    return model


def adapted(model, adapters: list[str], prompt: torch.Tensor):
    gm = lora_fx.capture(model, (prompt[:2, :16],), {"use_cache": False})
    for name in adapters:
        lora_fx.apply(gm, LoraSpec(targets="all-linear", rank=RANK, alpha=2.0 * RANK, adapter=name))
    randomized(gm)
    return gm.eval()


def speed_rows(label: str, model, batch: int, prompt_length: int, new: int, rounds: int) -> list[dict]:
    prompt = token_batch(batch=batch, seq=prompt_length, seed=1)
    gm = adapted(model, ["a"], prompt)
    merged = lora_fx.merge(gm)
    base = lora_fx.capture(model, (prompt[:2, :16],), {"use_cache": False}).eval()
    reference = peft_model(model, gm, ["a"])
    merged_model = copy.deepcopy(model)
    with torch.no_grad():
        for fqn, (lora_A, lora_B, scale) in lora_fx.adapter_weights(gm, "a").items():
            merged_model.get_submodule(fqn).weight += scale * lora_B @ lora_A
    static = static_compiled(merged_model)
    settings = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    calls = {
        "lora_fx unmerged, eager": lambda: gm.generate(prompt, **settings),
        "lora_fx unmerged, compiled": lambda: gm.generate(prompt, compile=True, **settings),
        "lora_fx merged, eager": lambda: merged.generate(prompt, **settings),
        "lora_fx merged, compiled": lambda: merged.generate(prompt, compile=True, **settings),
        "lora_fx base, compiled": lambda: base.generate(prompt, compile=True, **settings),
        "PEFT generate": lambda: reference.generate(input_ids=prompt, **settings),
        "transformers merged, eager": lambda: merged_model.generate(prompt, **settings),
        "transformers merged, static cache + compile": lambda: static.generate(prompt, **settings),
    }
    first = {}
    for name, call in calls.items():                  # the first call compiles where it compiles
        started = time.perf_counter()
        call()
        first[name] = time.perf_counter() - started
    with torch.no_grad():
        seconds = seconds_of(calls, rounds)
    unit = lambda name: seconds[name] / (batch * new)
    rows = []
    for name, s in seconds.items():
        rows.append({"model": label, "batch": batch, "variant": name, "tokens/s": batch * new / s,
                     "ms/token (per row)": 1e3 * s / new, "first call s": first[name],
                     "vs compiled merged": unit("lora_fx merged, compiled") / unit(name),
                     "vs PEFT": unit("PEFT generate") / unit(name),
                     "vs transformers static+compile":
                         unit("transformers merged, static cache + compile") / unit(name)})
    return rows


def mixed_rows(model, count: int, new: int, rounds: int) -> list[dict]:
    """K adapters in one batch of K rows (row k through adapter k) against one adapter on every row."""
    prompt = token_batch(batch=count, seq=32, seed=2)
    adapters = [f"a{k}" for k in range(count)]
    gm = adapted(model, adapters, prompt)
    mixed = lora_fx.mixed_batch(gm, adapters)
    lora_fx.set_active(gm, "a0")
    reference = peft_model(model, gm, adapters)
    rows_ids = torch.arange(count)
    settings = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    calls = {
        "single adapter, compiled": lambda: gm.generate(prompt, compile=True, **settings),
        f"K={count} mixed, compiled": lambda: mixed.generate(prompt, adapter_ids=rows_ids, compile=True, **settings),
        "single adapter, eager": lambda: gm.generate(prompt, **settings),
        f"K={count} mixed, eager": lambda: mixed.generate(prompt, adapter_ids=rows_ids, **settings),
        f"K={count} PEFT generate(adapter_names)": lambda: reference.generate(input_ids=prompt, adapter_names=adapters,
                                                                              **settings),
    }
    with torch.no_grad():
        seconds = seconds_of(calls, rounds)
    return [{"variant": name, "tokens/s": count * new / s,
             "vs single adapter (compiled)": seconds["single adapter, compiled"] / s,
             "vs PEFT adapter_names": seconds[f"K={count} PEFT generate(adapter_names)"] / s}
            for name, s in seconds.items()]


def growth_rows(model, lengths: list[int], rounds: int) -> list[dict]:
    """ms per new token of compiled unmerged decoding as the generation grows, batch 1, prompt 128."""
    prompt = token_batch(batch=1, seq=128, seed=3)
    gm = adapted(model, ["a"], prompt)
    calls = {new: (lambda n=new: gm.generate(prompt, compile=True, max_new_tokens=n, min_new_tokens=n,
                                              pad_token_id=0)) for new in [1, *lengths]}
    with torch.no_grad():
        seconds = seconds_of(calls, rounds)
    config = model.config
    kv_bytes = lambda tokens: (2 * config.num_hidden_layers * config.num_key_value_heads * tokens
                               * (config.hidden_size // config.num_attention_heads) * 4)
    return [{"new tokens": new, "total s": s, "ms/token after the first": 1e3 * (s - seconds[1]) / max(new - 1, 1),
             "first token (prefill) ms": 1e3 * seconds[1], "KV cache bytes at the end": kv_bytes(128 + new)}
            for new, s in seconds.items() if new > 1]


def rank_rows(model, ranks: list[int], new: int, rounds: int) -> list[dict]:
    """What one all-linear adapter costs per token in the compiled decode step, by rank: unmerged against merged."""
    prompt = token_batch(batch=1, seq=32, seed=4)
    rows, sites = [], None
    for rank in ranks:
        gm = lora_fx.capture(model, (prompt.repeat(2, 1)[:, :16],), {"use_cache": False})
        lora_fx.apply(gm, LoraSpec(targets="all-linear", rank=rank, alpha=2.0 * rank))
        randomized(gm)
        gm.eval()
        merged = lora_fx.merge(gm)
        sites = len(lora_fx.adapter_weights(gm, "default"))
        settings = dict(compile=True, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        with torch.no_grad():
            seconds = seconds_of({"unmerged": lambda: gm.generate(prompt, **settings),
                                  "merged": lambda: merged.generate(prompt, **settings)}, rounds)
        extra = (seconds["unmerged"] - seconds["merged"]) / new
        rows.append({"rank": rank, "sites": sites, "merged ms/token": 1e3 * seconds["merged"] / new,
                     "unmerged ms/token": 1e3 * seconds["unmerged"] / new, "adapter µs/token": 1e6 * extra,
                     "per site µs/token": 1e6 * extra / sites, "unmerged / merged": seconds["unmerged"] /
                     seconds["merged"]})
    return rows


def flop_floor_ms(model, batch: int, past: int) -> float:
    """The decode step's arithmetic (2 FLOPs per weight per row, plus attention over `past`) at this machine's
    measured GEMM rate."""
    config = model.config
    weights = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    head_dim = config.hidden_size // config.num_attention_heads
    flops = batch * (2 * weights + 4 * config.num_hidden_layers * config.num_attention_heads * head_dim * past)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    seconds = min(_timed(lambda: a @ b) for _ in range(10))
    return 1e3 * flops / (2 * 1024 ** 3 / seconds)


def memory_floor_ms(model) -> float:
    """The decode step's weight traffic: every weight but the embedding table read once per step (the step is
    memory-bound at small batch), at this machine's measured read bandwidth (a sum over 256 MiB)."""
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "embed_tokens" not in name)
    big = torch.ones(64 * 1024 * 1024)
    seconds = min(_timed(big.sum) for _ in range(5))
    return 1e3 * weights / (big.numel() * big.element_size() / seconds)


def _timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def plot(rows: list[dict], path) -> None:
    """ms per decoding step of each variant, one group of bars per (model, batch), the two floors as ticks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((row["model"], row["batch"]) for row in rows))
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    by_key = {(row["model"], row["batch"], row["variant"]): row for row in rows}
    figure, axis = plt.subplots(figsize=(11, 5))
    width = 0.8 / len(variants)
    for index, variant in enumerate(variants):
        xs = [g + index * width for g in range(len(groups))]
        axis.bar(xs, [by_key[(*group, variant)]["ms/token (per row)"] for group in groups], width, label=variant)
    for g, group in enumerate(groups):
        row = by_key[(*group, variants[0])]
        axis.hlines([row["memory floor ms/token"]], g - width / 2, g + 0.8 - width / 2, colors="black",
                    linestyles="dashed", label="weights read once (memory floor)" if g == 0 else None)
    axis.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))],
                    [f"{model}, batch {batch}" for model, batch in groups])
    axis.set_ylabel("ms per decoding step (lower is better)")
    axis.set_title(f"Greedy decoding on CPU, all-linear r={RANK}")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("parts", nargs="*", help=f"tables to run again, of {list(PARTS)} (default: all); each is "
                                                  f"written when it is done, the plot from the speed table on disk")
    parser.add_argument("--quick", action="store_true", help="llama 512x4, batch 1, 32 new tokens")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    name = "generate_quick" if args.quick else "generate"
    small = llama(**MODELS["llama 512x4"]).eval()
    for part in args.parts or list(PARTS):
        load_before = os.getloadavg()[0]
        rows, title, notes = PARTS[part](args.quick, args.rounds, small)
        load = f"Load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after."
        write_results(name + ("" if part == "speed" else f"_{part}"), title, rows, notes=f"{load} {notes}".strip())
    speed = json.loads((RESULTS / f"{name}.json").read_text())["rows"]
    plot(speed, RESULTS / f"{name}.png")
    print((RESULTS / f"{name}.md").read_text())


def _speed(quick: bool, rounds: int, small) -> tuple[list[dict], str, str]:
    prompt_length, new = (64, 32) if quick else (128, 128)
    plan = [("llama 512x4", 1)] if quick else [(m, b) for m in MODELS for b in (1, 8)]
    rows = []
    for label, batch in plan:
        model = llama(**MODELS[label]).eval()
        rows += speed_rows(label, model, batch, prompt_length, new, rounds)
        floor, memory = flop_floor_ms(model, batch, prompt_length + new // 2), memory_floor_ms(model)
        for row in rows[-8:]:
            row["FLOP floor ms/token"], row["memory floor ms/token"] = floor, memory
    return (rows, f"Greedy decoding, prompt {prompt_length}, {new} new tokens, all-linear r={RANK}",
            "tokens/s counts every row's new tokens; first call s includes capture and compilation. FLOP floor: the "
            "decode step's arithmetic at this machine's 1024x1024 GEMM rate; memory floor: its weights read once at "
            "this machine's read bandwidth.")


PARTS = {
    "speed": _speed,
    "mixed": lambda quick, rounds, small: (mixed_rows(small, 8, 32 if quick else 64, rounds),
                                           "K = 8 adapters in one decoding batch (8 rows, prompt 32)", ""),
    "growth": lambda quick, rounds, small: (growth_rows(small, [16, 64] if quick else [32, 128, 256], rounds),
                                            "Time per token as the generation grows (compiled, batch 1, prompt 128)",
                                            ""),
    "ranks": lambda quick, rounds, small: (rank_rows(small, [4, 64] if quick else [4, 8, 16, 64],
                                                     32 if quick else 64, rounds),
                                           "One adapter's cost per token in the compiled decode step, by rank "
                                           "(batch 1)", ""),
}


if __name__ == "__main__":
    main()
