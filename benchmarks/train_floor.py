"""A LoRA training step against the frozen-base floor, PEFT and full fine-tuning, with the training passes measured
on their own: step time (interleaved rounds, medians), bytes saved for the backward, peak step memory and the first
compiled step (each in a fresh process), cost growth with rank and sequence length, and a profile.

    python -m benchmarks.train_floor            # writes benchmarks/results/train_floor*.{json,md}
    python -m benchmarks.train_floor --dropout  # only what dropout costs: train_floor_dropout*.md, train_floor_masks.md

`--threads 1 --cpu-time` times this process's CPU time on one thread instead of wall time on two: steadier on a
machine other jobs share, but not the figure of record.

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
from benchmarks.qlora_dora import interleaved_times, saved_bytes
from benchmarks.train_step import EXAMPLE, RANK, timed_rows
from lora_fx import LoraSpec
from lora_fx import build as lora_build
from lora_fx.ops import COUNTER_DROPOUT, COUNTER_DROPOUT_LINEAR, DROPOUT_LINEAR
from lora_fx.ops import counter_masks
from lora_fx.ops.dropout_linear import pack_mask, unpack_mask
from lora_fx.passes.expand_layout import NARROW_RANK

DROPOUTS = (0.0, 0.05)
SHARED = "one mask per input (opt-in)"          # lora_fx.fuse_siblings(gm, share_dropout=True)
PEFT_DRAWS = "PEFT's draws (opt-in)"            # lora_fx.dropout_masks(gm, "peft")
TRAINING_PASSES = ("lean_dropout", "expand_layout", "sdpa_gqa")    # lora_fx.build.PIPELINE, training graphs


@contextlib.contextmanager
def training_passes(names):
    """Build graphs with only the named passes of TRAINING_PASSES (in `lora_fx.build.PIPELINE`), to measure each
    alone."""
    saved = list(lora_build.PIPELINE)
    lora_build.PIPELINE[:] = [p for p in saved if p.name not in TRAINING_PASSES or p.name in names]
    try:
        yield
    finally:
        lora_build.PIPELINE[:] = saved


def lora_fx_model(model, dropout: float, passes=None, share_dropout: bool = False, masks: str = "counter"):
    """lora_fx's graph of `model` (all-linear, sibling fusion on, sharing dropout masks if asked, its dropout masks
    from `masks`), built with `passes` (default: all)."""
    names = TRAINING_PASSES if passes is None else passes
    with training_passes(names):
        gm = lora_fx.apply(model, LoraSpec(targets="all-linear", rank=RANK, alpha=2.0 * RANK, dropout=dropout),
                           **EXAMPLE)
        lora_fx.fuse_siblings(gm, share_dropout=share_dropout)
        lora_fx.dropout_masks(gm, masks)
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
    for label, ours in ((SHARED, lora_fx_model(model, 0.05, share_dropout=True)),
                        (PEFT_DRAWS, lora_fx_model(model, 0.05, masks="peft"))):
        rows |= {f"lora_fx, {mode}, dropout 0.05, {label}": (ours, graph(torch.compile(ours) if mode == "compiled"
                                                                         else ours)) for mode in ("eager", "compiled")}
    for passes in ([], ["lean_dropout"], ["expand_layout"], ["sdpa_gqa"]):
        ours = lora_fx_model(model, 0.05, passes)
        rows[f"lora_fx, eager, dropout 0.05, training passes: {'+'.join(passes) or 'none'}"] = (ours, graph(ours))
    return rows


def step_table(model, ids, repeats: int, clock=time.perf_counter) -> list[dict]:
    built = variants(model)
    times = timed_rows(built, lambda module, call: training_step(module, call, ids), repeats, clock=clock)
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


def dropout_rows(model_name: str, model, ids, repeats: int, clock) -> list[dict]:
    """What dropout 0.05 costs a step: lora_fx at dropout 0 and 0.05 (counter masks, and PEFT's draws), beside PEFT
    and full fine-tuning eager; each variant's median over 2·`repeats` steps timed in turn with the others."""
    reference = peft_model(model, 0.05)
    ours = {p: lora_fx_model(model, p) for p in DROPOUTS}
    peft_draws = lora_fx_model(model, 0.05, masks="peft")
    built = {"full fine-tuning, eager": (full := copy.deepcopy(model).train(), hf(full)),
             "PEFT, eager, dropout 0.05": (reference, hf(reference)),
             "PEFT, compiled, dropout 0.05": (reference, hf(torch.compile(reference))),
             **{f"lora_fx, {mode}, dropout {p}": (ours[p], graph(torch.compile(ours[p]) if mode == "compiled"
                                                                   else ours[p]))
                for mode in ("eager", "compiled") for p in DROPOUTS},
             f"lora_fx, compiled, dropout 0.05, {PEFT_DRAWS}": (peft_draws, graph(torch.compile(peft_draws)))}
    steps = {name: training_step(module, call, ids) for name, (module, call) in built.items()}
    times = {name: median for name, (median, _) in interleaved_times(steps, 2 * repeats, 3, clock).items()}
    saved = {name: saved_bytes(module, call, ids) for name, (module, call) in built.items()}
    rows = []
    for name, seconds in times.items():
        mode = name.split(", ")[1]
        rows.append({"model": model_name, "variant": name, "ms": seconds * 1e3,
                     "vs lora_fx compiled dropout 0": seconds / times["lora_fx, compiled, dropout 0.0"],
                     "vs PEFT compiled dropout 0.05": seconds / times["PEFT, compiled, dropout 0.05"],
                     "vs full FT eager": seconds / times["full fine-tuning, eager"],
                     "saved for backward MiB": saved[name] / 2 ** 20,
                     "saved vs lora_fx dropout 0 (same mode)": saved[name] / saved[f"lora_fx, {mode}, dropout 0.0"]
                     if name.startswith("lora_fx") else "-"})
    return rows


def dropout_goals(rows: list[dict]) -> list[dict]:
    """The dropout issue's figures, per model, from `dropout_rows`."""
    goals = []
    for model_name in dict.fromkeys(row["model"] for row in rows):
        row = next(r for r in rows if r["model"] == model_name and r["variant"] == "lora_fx, compiled, dropout 0.05")
        figures = (("compiled step / its dropout-0 step", 1.08, row["vs lora_fx compiled dropout 0"]),
                   ("compiled step / PEFT compiled, dropout 0.05", 0.75, row["vs PEFT compiled dropout 0.05"]),
                   ("compiled step / full fine-tuning eager", 0.75, row["vs full FT eager"]),
                   ("saved for backward / its dropout-0 bytes", 1.02, row["saved vs lora_fx dropout 0 (same mode)"]))
        goals += [{"model": model_name, "figure (lora_fx, dropout 0.05)": figure, "goal": f"<= {goal:.2f}",
                   "measured": measured, "met": "yes" if measured <= goal else "no"}
                  for figure, goal, measured in figures]
    return goals


class _PackedCounterDropoutLinear(torch.autograd.Function):
    """The counter-mask shrink keeping its mask packed a bit an element instead of drawing it again in the backward
    (measured against regenerating, not built)."""

    @staticmethod
    def forward(ctx, x, weight, seed, p):
        dropped = COUNTER_DROPOUT(x, seed, p)
        ctx.p = p
        ctx.save_for_backward(x, weight, pack_mask(dropped != 0))
        return torch.nn.functional.linear(dropped, weight)

    @staticmethod
    def backward(ctx, grad_h):
        x, weight, packed = ctx.saved_tensors
        noise = unpack_mask(packed, x.shape, x.dtype).div_(1 - ctx.p)
        dropped = (x * noise).reshape(-1, x.shape[-1])
        return grad_h.matmul(weight) * noise, grad_h.reshape(-1, grad_h.shape[-1]).t().matmul(dropped), None, None


def mask_rows(repeats: int, clock) -> list[dict]:
    """Drawing one 512 x 512 site's dropout noise (262k elements, x ⊙ noise out) each way there is, and one site's
    dropout + shrink (r = 8) forward and backward: PEFT's draws (packed mask), counter masks drawn again in the
    backward (the op), or kept packed."""
    p, x = 0.05, torch.randn(BATCH * SEQ, 512)
    seed = torch.tensor(2 ** 61 + 12345)
    inductor_rand = torch.compile(lambda t: t * (torch.rand_like(t) >= p) / (1 - p), dynamic=False)
    scaled = torch.compile(lambda t: t / (1 - p), dynamic=False)
    noise = {"nn.Dropout's bernoulli_ (PEFT)": lambda: x * torch.empty_like(x).bernoulli_(1 - p).div_(1 - p),
             "torch.rand_like (mt19937) >= p": lambda: x * (torch.rand_like(x) >= p) / (1 - p),
             "Inductor's random (compiled rand_like: Philox per element)": lambda: inductor_rand(x),
             "counter hash, eager torch ops (its reference)": lambda: counter_masks.dropout_reference(x, seed, p),
             "counter hash, the op's eager kernel (Inductor-compiled)": lambda: COUNTER_DROPOUT(x, seed, p),
             "no noise: x / (1 - p) compiled (memory floor)": lambda: scaled(x)}
    rows = [{"what": f"noise: {name}", "us": median_seconds(run, repeats=repeats * 10, warmup=3, clock=clock) * 1e6,
             "saved for backward KiB": "-"} for name, run in noise.items()]
    inputs = torch.nn.ParameterDict({"x": x.clone(), "A": torch.randn(RANK, 512)})      # not counted as saved
    x_leaf, lora_A = inputs["x"], inputs["A"]
    site = {"dropout + linear (aten, autograd)": lambda: torch.nn.functional.linear(
                torch.nn.functional.dropout(x_leaf, p, True), lora_A),
            "dropout_linear (PEFT's draws, packed mask)": lambda: DROPOUT_LINEAR(x_leaf, lora_A, p)[0],
            "counter_dropout_linear (mask drawn again)": lambda: COUNTER_DROPOUT_LINEAR(x_leaf, lora_A, seed, p),
            "counter mask kept packed (not built)": lambda: _PackedCounterDropoutLinear.apply(x_leaf, lora_A, seed, p)}
    grad = torch.randn(BATCH * SEQ, RANK)
    for name, forward in site.items():
        seconds = median_seconds(lambda: forward().backward(grad), repeats=repeats * 10, warmup=3, clock=clock)
        rows.append({"what": f"site fwd + bwd: {name}", "us": seconds * 1e6,
                     "saved for backward KiB": saved_bytes(inputs, lambda _: forward(), None) / 2 ** 10})
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


def dropout_main(repeats: int, clock, notes: str) -> None:
    """The dropout issue's tables: its step figures on the benchmark Llama and on an MHA Llama, and the masks."""
    ids = token_batch()
    rows = [row for name, kv_heads in (("Llama (GQA 8/4)", 4), ("Llama (MHA 8/8)", 8))
            for row in dropout_rows(name, llama(kv_heads=kv_heads), ids, repeats, clock)]
    write_results("train_floor_dropout", f"What dropout 0.05 costs a training step (Llama hidden 512 x 4 layers, "
                                         f"batch {BATCH} x {SEQ}, all-linear r={RANK}, AdamW)", rows, notes)
    write_results("train_floor_dropout_goals", "The dropout issue's figures (from train_floor_dropout.md)",
                  dropout_goals(rows), notes)
    write_results("train_floor_masks", f"Dropout noise for one 512 x 512 site ({BATCH * SEQ} x 512 elements, p = "
                                       f"0.05) and one site's dropout + shrink forward and backward (microseconds)",
                  mask_rows(repeats, clock), notes)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--alone", help="measure one variant in this process (used by the fresh-process rows)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dropout", action="store_true", help="only the dropout tables (train_floor_dropout*.md, "
                                                               "train_floor_masks.md)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-time", action="store_true", help="time this process's CPU time, not wall time")
    args = parser.parse_args()
    if args.alone:
        print(json.dumps(measure_alone(args.alone)))
        return
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    clock = time.process_time if args.cpu_time else time.perf_counter
    notes = (f"Load average before the run: {load:.2f} ({os.cpu_count()} cores); {'CPU' if args.cpu_time else 'wall'} "
             f"time, {args.threads} torch thread(s). Machine: {machine()}.")
    if args.dropout:
        dropout_main(args.repeats, clock, notes)
        return
    model, ids = llama(), token_batch()
    steps = step_table(model, ids, args.repeats, clock)
    print("fresh processes", flush=True)
    alone = fresh_process_rows()
    print("growth", flush=True)
    growth = growth_rows(max(3, args.repeats // 3))
    print("profile", flush=True)
    profiled = profile_rows(model, ids)
    fused = one_gemm_study(args.repeats)
    layouts = layout_study(args.repeats)
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
