"""A LoRA training step against the frozen-base floor, PEFT and full fine-tuning, with the training passes measured
on their own: step time (interleaved rounds, medians), bytes saved for the backward, peak step memory and the first
compiled step (each in a fresh process), cost growth with rank and sequence length, and a profile.

    python -m benchmarks.train_floor            # writes benchmarks/results/train_floor.{json,md}

Llama hidden 512 x 4 layers, vocab 2000, batch 4 x 128, all-linear r=8, AdamW, as `benchmarks.train_step`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import time
from collections import Counter

import peft
import torch
from torch.profiler import ProfilerActivity, profile

import lora_fx
from benchmarks.common import machine, median_seconds, training_step, write_results
from benchmarks.models import BATCH, SEQ, llama, token_batch
from benchmarks.moe_step import peak_step_bytes
from benchmarks.qlora_dora import saved_bytes
from benchmarks.train_step import EXAMPLE, RANK, timed_rows
from lora_fx import LoraSpec
from lora_fx import build as lora_build
from lora_fx.passes.expand_layout import NARROW_RANK

DROPOUTS = (0.0, 0.05)
SHARED = "one mask per input (opt-in)"          # lora_fx.fuse_siblings(gm, share_dropout=True)


@contextlib.contextmanager
def training_passes(names):
    """Build graphs with only the named training passes (`lora_fx.build.TRAINING_PASSES`), to measure each alone."""
    saved = list(lora_build.TRAINING_PASSES)
    lora_build.TRAINING_PASSES[:] = [p for p in saved if p.__name__ in names]
    try:
        yield
    finally:
        lora_build.TRAINING_PASSES[:] = saved


def lora_fx_model(model, dropout: float, passes=None, share_dropout: bool = False):
    """lora_fx's graph of `model` (all-linear, sibling fusion on, sharing dropout masks if asked), built with
    `passes` (default: all)."""
    names = [p.__name__ for p in lora_build.TRAINING_PASSES] if passes is None else passes
    with training_passes(names):
        gm = lora_fx.apply(model, LoraSpec(targets="all-linear", rank=RANK, alpha=2.0 * RANK, dropout=dropout),
                           **EXAMPLE)
        lora_fx.fuse_siblings(gm, share_dropout=share_dropout)
        gm.train()
        gm(token_batch(batch=2, seq=16))                  # built now, with these passes
    return gm


def peft_model(model, dropout: float):
    return peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        target_modules="all-linear", r=RANK, lora_alpha=2 * RANK, lora_dropout=dropout)).train()


def floor_model(model):
    """The frozen base: every weight frozen but one norm at the bottom, so the backward runs through every layer."""
    floor = copy.deepcopy(model).train()
    for name, param in floor.named_parameters():
        param.requires_grad_(name == "model.layers.0.input_layernorm.weight")
    return floor


hf = lambda m: (lambda ids: m(input_ids=ids, use_cache=False).logits)
graph = lambda m: (lambda ids: m(ids).logits)


def variants(model) -> dict:
    """name -> (module, call(ids) -> logits)."""
    rows = {"full fine-tuning, eager": (full := copy.deepcopy(model).train(), hf(full)),
            "frozen base floor, eager": (floor := floor_model(model), hf(floor)),
            "frozen base floor, compiled": (floor, hf(torch.compile(floor)))}
    for p in DROPOUTS:
        reference = peft_model(model, p)
        ours = lora_fx_model(model, p)
        rows |= {f"PEFT, eager, dropout {p}": (reference, hf(reference)),
                 f"PEFT, compiled, dropout {p}": (reference, hf(torch.compile(reference))),
                 f"lora_fx, eager, dropout {p}": (ours, graph(ours)),
                 f"lora_fx, compiled, dropout {p}": (ours, graph(torch.compile(ours)))}
    shared = lora_fx_model(model, 0.05, share_dropout=True)
    rows |= {f"lora_fx, {mode}, dropout 0.05, {SHARED}": (shared, graph(torch.compile(shared) if mode == "compiled"
                                                                       else shared)) for mode in ("eager", "compiled")}
    for passes in ([], ["lean_dropout"], ["expand_layout"], ["sdpa_gqa"]):
        ours = lora_fx_model(model, 0.05, passes)
        rows[f"lora_fx, eager, dropout 0.05, training passes: {'+'.join(passes) or 'none'}"] = (ours, graph(ours))
    return rows


def step_table(model, ids, repeats: int) -> list[dict]:
    built = variants(model)
    times = timed_rows(built, lambda module, call: training_step(module, call, ids), repeats)
    full, floor = times["full fine-tuning, eager"], times["frozen base floor, compiled"]
    rows = []
    for name, seconds in times.items():
        module, call = built[name]
        fields = name.split(", ")
        peft_name = next((f"PEFT, compiled, dropout {p}" for p in DROPOUTS if fields[2:3] == [f"dropout {p}"]
                          and "training passes" not in name), None)
        rows.append({"variant": name, "ms": seconds * 1e3, "vs floor compiled": seconds / floor,
                     "vs PEFT compiled (same dropout)": seconds / times[peft_name] if peft_name else "-",
                     "vs full FT eager": seconds / full,
                     "saved for backward MiB": saved_bytes(module, call, ids) / 2 ** 20})
    return rows


def measure_alone(name: str) -> dict:
    """One variant in this (fresh) process: capture + apply + first compiled step, then peak step memory."""
    torch.set_num_threads(2)
    model, ids = llama(), token_batch()
    framework, mode, dropout, *sharing = name.split(", ")
    p = float(dropout.split()[-1])
    started = time.perf_counter()
    module = peft_model(model, p) if framework == "PEFT" else lora_fx_model(model, p, share_dropout=bool(sharing))
    call = (hf if framework == "PEFT" else graph)(torch.compile(module) if mode == "compiled" else module)
    step = training_step(module, call, ids)
    step()
    first = time.perf_counter() - started
    step()
    return {"variant": name, "build + first step s": first, "peak step MiB": peak_step_bytes(step) / 2 ** 20}


def fresh_process_rows() -> list[dict]:
    environment = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}       # a first compile, not a cache hit
    rows = []
    for framework, sharing in (("PEFT", ""), ("lora_fx", ""), ("lora_fx", f", {SHARED}")):
        for mode in ("eager", "compiled"):
            run = subprocess.run([sys.executable, "-m", "benchmarks.train_floor", "--alone",
                                  f"{framework}, {mode}, dropout 0.05{sharing}"], check=True, capture_output=True,
                                 text=True, env=environment)
            rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
    for row in rows:
        mode = row["variant"].split(", ")[1]
        reference = next(r for r in rows if r["variant"] == f"PEFT, {mode}, dropout 0.05")
        row["peak vs PEFT (same mode)"] = row["peak step MiB"] / reference["peak step MiB"]
        row["first step vs PEFT (same mode)"] = row["build + first step s"] / reference["build + first step s"]
    return rows


def growth_rows(repeats: int) -> list[dict]:
    """Eager step time by rank (batch 4 x 128) and by sequence length (batch 1), the floor beside each."""
    model = llama()
    rows = []
    for rank, batch, seq in ((8, BATCH, SEQ), (64, BATCH, SEQ), (256, BATCH, SEQ), (8, 1, 128), (8, 1, 512),
                             (8, 1, 2048)):
        ids = token_batch(batch=batch, seq=seq)
        gm = lora_fx.apply(model, LoraSpec(targets="all-linear", rank=rank, alpha=2.0 * rank), **EXAMPLE).train()
        lora_fx.fuse_siblings(gm)
        floor = floor_model(model)
        times = timed_rows({"lora_fx": (gm, graph(gm)), "floor": (floor, hf(floor))},
                           lambda module, call: training_step(module, call, ids), repeats)
        rows.append({"rank": rank, "batch x seq": f"{batch} x {seq}", "lora_fx eager ms": times["lora_fx"] * 1e3,
                     "floor eager ms": times["floor"] * 1e3, "lora_fx / floor": times["lora_fx"] / times["floor"]})
    return rows


def profile_rows(model, ids) -> list[dict]:
    """CPU time by op over one compiled step, lora_fx (dropout 0) against the floor."""
    totals = {}
    for name, (module, call) in {"lora_fx": (ours := lora_fx_model(model, 0.0), graph(torch.compile(ours))),
                                 "floor": (floor := floor_model(model), hf(torch.compile(floor)))}.items():
        step = training_step(module, call, ids)
        for _ in range(3):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        totals[name] = Counter({event.key: event.self_cpu_time_total / 1e3 for event in prof.key_averages()})
    ops = sorted(set(totals["lora_fx"]) | set(totals["floor"]),
                 key=lambda op: -abs(totals["lora_fx"][op] - totals["floor"][op]))[:12]
    return [{"op": op, "lora_fx ms": totals["lora_fx"][op], "floor ms": totals["floor"][op],
             "difference ms": totals["lora_fx"][op] - totals["floor"][op]} for op in ops]


def one_gemm_study(repeats: int) -> list[dict]:
    """One site's base matmul and LoRA shrink, forward and backward (x's gradient), as two GEMMs or as one GEMM on
    the stacked weight [W; A] (stacked each step, as A changes), in both cases reading x; the stacked weight made
    once is the lower bound of the fused form."""
    x = torch.randn(BATCH * SEQ, 512, requires_grad=True)
    weight = torch.randn(512, 512)
    lora_A = torch.randn(RANK, 512, requires_grad=True)
    stacked_once = torch.cat([weight, lora_A.detach()]).requires_grad_()

    def two_gemms():
        y, h = torch.nn.functional.linear(x, weight), torch.nn.functional.linear(x, lora_A)
        torch.autograd.backward((y, h), (torch.ones_like(y), torch.ones_like(h)))

    def one_gemm(stacked):
        out = torch.nn.functional.linear(x, stacked())
        y, h = out.split([512, RANK], -1)
        torch.autograd.backward((y, h), (torch.ones_like(y), torch.ones_like(h)))

    cases = {"two GEMMs (as built)": two_gemms,
             "one GEMM on [W; A], stacked each step": lambda: one_gemm(lambda: torch.cat([weight, lora_A])),
             "one GEMM on [W; A] stacked once (lower bound)": lambda: one_gemm(lambda: stacked_once)}
    times = {name: median_seconds(run, repeats=repeats * 3, warmup=3) for name, run in cases.items()}
    return [{"form": name, "forward + backward ms": seconds * 1e3,
             "vs two GEMMs": seconds / times["two GEMMs (as built)"]} for name, seconds in times.items()]


def layout_study(repeats: int) -> list[dict]:
    """An expand y = h·Bᵀ (N = 512 rows) and its two backward products, ∂h = ∂y·B and ∂B = ∂yᵀ·h, computed as
    autograd of `linear` does (outputs r columns wide) and transposed, with r rows (as `expand_layout` makes autograd
    compute them); then the expand's forward and backward as built by `linear` and by `expand_layout`."""
    rows = []
    for width_out, rank in ((512, 8), (256, 8), (1365, 8), (512, 16), (512, 64)):
        h, weight = torch.randn(BATCH * SEQ, rank), torch.randn(width_out, rank)
        grad = torch.randn(BATCH * SEQ, width_out)
        rank_major, weight_t = h.t().contiguous().t(), weight.t().contiguous()
        leaves = lambda: (h.clone().requires_grad_(), weight.clone().requires_grad_())

        def expand(rewritten: bool):
            h_leaf, weight_leaf = leaves()
            out = (torch.matmul(h_leaf.t().contiguous().t(), weight_leaf.t().contiguous()) if rewritten
                   else torch.nn.functional.linear(h_leaf, weight_leaf))
            out.backward(grad)

        cases = {"∂h r columns": lambda: grad.mm(weight), "∂h r rows": lambda: weight_t.mm(grad.t()).t(),
                 "∂B r columns": lambda: grad.t().mm(h), "∂B r rows": lambda: rank_major.t().mm(grad).t(),
                 "expand fwd+bwd, linear": lambda: expand(False), "expand fwd+bwd, expand_layout": lambda: expand(True)}
        times = {name: median_seconds(run, repeats=repeats * 3, warmup=3) * 1e6 for name, run in cases.items()}
        rows.append({"out x r": f"{width_out} x {rank}", **{f"{name} us": t for name, t in times.items()},
                     "expand_layout / linear": times["expand fwd+bwd, expand_layout"] /
                     times["expand fwd+bwd, linear"],
                     "rewritten by expand_layout": rank < NARROW_RANK})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--alone", help="measure one variant in this process (used by the fresh-process rows)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if args.alone:
        print(json.dumps(measure_alone(args.alone)))
        return
    torch.set_num_threads(2)
    load = os.getloadavg()[0]
    model, ids = llama(), token_batch()
    steps = step_table(model, ids, args.repeats)
    print("fresh processes", flush=True)
    alone = fresh_process_rows()
    print("growth", flush=True)
    growth = growth_rows(max(3, args.repeats // 3))
    print("profile", flush=True)
    profiled = profile_rows(model, ids)
    fused = one_gemm_study(args.repeats)
    layouts = layout_study(args.repeats)
    notes = f"Load average before the run: {load:.2f} (2 cores). Machine: {machine()}."
    write_results("train_floor", f"Training step, Llama hidden 512 x 4 layers, batch {BATCH} x {SEQ}, all-linear "
                                 f"r={RANK}, AdamW: against the frozen-base floor, PEFT and full fine-tuning", steps,
                  notes)
    write_results("train_floor_alone", "Each variant in a fresh process (dropout 0.05): build + first step (compile "
                                       "caches off), peak step memory (tensor allocations of one step)", alone)
    write_results("train_floor_growth", "Eager step cost by rank and sequence length, the frozen-base floor beside",
                  growth)
    write_results("train_floor_one_gemm", f"One site (512 -> 512, r={RANK}, {BATCH * SEQ} tokens): base matmul and "
                                          f"LoRA shrink as two GEMMs or one", fused)
    write_results("train_floor_layouts", f"An expand's GEMMs by layout ({BATCH * SEQ} rows; microseconds)", layouts)
    write_results("train_floor_profile", "Where a compiled step's time goes: self CPU time by op, lora_fx (dropout "
                                         "0) minus the floor, largest differences", profiled)


if __name__ == "__main__":
    main()
