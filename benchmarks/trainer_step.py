"""transformers' Trainer with a lora_fx graph against the Trainer with the PEFT model, side by side in one process:
checkpoint bytes and save time, steps/s eager and with `torch_compile=True`; and a QLoRA training step on a model
loaded in 4 bits by bitsandbytes, lora_fx against PEFT on the same loaded model (time and peak step memory).

    python -m benchmarks.trainer_step             # writes benchmarks/results/trainer_{checkpoint,step,qlora,goals}
    python -m benchmarks.trainer_step qlora       # that table again (and the goals)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import peft
import torch
import transformers

import lora_fx
from benchmarks.common import RESULTS, training_step, write_results
from benchmarks.models import BATCH, SEQ, llama, token_batch
from benchmarks.moe_step import peak_step_bytes
from benchmarks.qlora_dora import interleaved_times
from benchmarks.qlora_dora import model as qlora_model
from lora_fx import LoraSpec
from lora_fx.integrations.transformers import Trainer

RANK, DROPOUT, VOCAB = 8, 0.05, 2000
STEPS, WARMUP, SAVES, ROUNDS = 14, 4, 5, 2


def rows_of(count: int = 64) -> list[dict]:
    tokens = token_batch(VOCAB, count, SEQ, seed=1)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in tokens]


def lora_fx_graph(model):
    example = token_batch(VOCAB, 2, 16)
    return lora_fx.apply(model, LoraSpec(targets="all-linear", rank=RANK, alpha=2.0 * RANK, dropout=DROPOUT),
                         example_kwargs={"input_ids": example, "attention_mask": torch.ones_like(example),
                                         "labels": example, "use_cache": False})


def peft_model(model):
    return peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules="all-linear", r=RANK,
                                                                      lora_alpha=2 * RANK, lora_dropout=DROPOUT))


def arguments(directory: str, **overrides) -> transformers.TrainingArguments:
    settings = dict(per_device_train_batch_size=BATCH, max_steps=STEPS, save_strategy="no", logging_strategy="no",
                    learning_rate=1e-4, report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    return transformers.TrainingArguments(directory, **{**settings, **overrides})


class StepTimes(transformers.TrainerCallback):
    def __init__(self):
        self.times, self.started = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.started)


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def checkpoint_rows(model) -> list[dict]:
    """Bytes of one checkpoint, and the median time to write it (`Trainer._save_checkpoint`, SAVES times)."""
    variants = {"lora_fx.integrations Trainer, graph": (Trainer, lora_fx_graph(model)),
                "stock Trainer, PEFT model": (transformers.Trainer, peft_model(model)),
                "stock Trainer, graph (before this integration)": (transformers.Trainer, lora_fx_graph(model))}
    rows = []
    for name, (trainer_class, module) in variants.items():
        with tempfile.TemporaryDirectory() as directory:
            trainer = trainer_class(model=module, args=arguments(directory, max_steps=1), train_dataset=rows_of(8))
            trainer.train()                                  # optimizer state exists
            seconds = []
            for save in range(SAVES):
                trainer.state.global_step = save + 1
                started = time.perf_counter()
                trainer._save_checkpoint(trainer.model, trial=None)
                seconds.append(time.perf_counter() - started)
            checkpoint = Path(directory) / "checkpoint-1"
            weights = [p for p in checkpoint.iterdir() if p.suffix == ".safetensors"]
            rows.append({"variant": name, "checkpoint MiB": directory_bytes(checkpoint) / 2 ** 20,
                         "weights file MiB": sum(p.stat().st_size for p in weights) / 2 ** 20,
                         "save s (median)": statistics.median(seconds)})
    reference = next(row for row in rows if row["variant"].startswith("stock Trainer, PEFT"))
    for row in rows:
        row["bytes vs PEFT"] = row["checkpoint MiB"] / reference["checkpoint MiB"]
        row["save time vs PEFT"] = row["save s (median)"] / reference["save s (median)"]
    return rows


def step_rows(model) -> list[dict]:
    """Median Trainer step (forward, loss, backward, AdamW, the Trainer's own work) after WARMUP steps, the best of
    ROUNDS runs; the runs alternate lora_fx / PEFT, so that a change in the machine's load hits both alike."""
    rows = []
    for compiled in (False, True):
        variants = (("lora_fx", Trainer, lora_fx_graph(model)), ("PEFT", transformers.Trainer, peft_model(model)))
        medians, first = {name: [] for name, _, _ in variants}, {}
        for _ in range(ROUNDS):
            for name, trainer_class, module in variants:
                timer = StepTimes()
                with tempfile.TemporaryDirectory() as directory:
                    trainer = trainer_class(model=module, args=arguments(directory, torch_compile=compiled),
                                            train_dataset=rows_of(), callbacks=[timer])
                    trainer.train()
                medians[name].append(statistics.median(timer.times[WARMUP:]))
                first.setdefault(name, timer.times[0])
        for name, _, _ in variants:
            step = min(medians[name])
            rows.append({"variant": f"{name}, {'torch_compile=True' if compiled else 'eager'}",
                         "step ms (median, best run)": 1e3 * step, "steps/s": 1 / step,
                         "first step s": first[name]})
    for row in rows:
        mode = row["variant"].split(", ")[1]
        reference = next(r for r in rows if r["variant"] == f"PEFT, {mode}")
        row["steps/s vs PEFT (same mode)"] = row["steps/s"] / reference["steps/s"]
    return rows


def qlora_rows(base, ids, model_name: str, torchao_nf4: bool) -> list[dict]:
    """A training step on the same model loaded with BitsAndBytesConfig(load_in_4bit, nf4): lora_fx on it, PEFT on
    it; with `torchao_nf4`, lora_fx's torchao nf4 (`quantize_base`) from the full-precision model too, as in
    qlora_dora.md (torchao's nf4 needs element counts that divide by 16384)."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    spec = LoraSpec(targets=targets, rank=RANK, alpha=2.0 * RANK)
    with tempfile.TemporaryDirectory() as directory:
        base.save_pretrained(directory)
        transformers.logging.set_verbosity_error()
        loaded = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                                   quantization_config=transformers.BitsAndBytesConfig(
                                                                       load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                       bnb_4bit_compute_dtype=torch.float32)).train()
    graph = lora_fx.apply(loaded, spec, (ids[:2, :16],), {"use_cache": False}).train()
    reference = peft.get_peft_model(loaded, peft.LoraConfig(target_modules=targets, r=RANK,
                                                            lora_alpha=2 * RANK)).train()
    graph_call = lambda module: (lambda x: module(x).logits)
    steps = {"lora_fx, bitsandbytes nf4 (loaded)": training_step(graph, graph_call(graph), ids),
             "PEFT, bitsandbytes nf4 (loaded)": training_step(reference, lambda x: reference(
                 input_ids=x, use_cache=False).logits, ids)}
    if torchao_nf4:
        torchao = lora_fx.quantize_base(lora_fx.apply(base, spec, (ids[:2, :16],), {"use_cache": False}), "nf4")
        steps["lora_fx, torchao nf4 (quantize_base)"] = training_step(torchao, graph_call(torchao.train()), ids)
    times = interleaved_times(steps)
    rows = [{"model": model_name, "variant": name, "step ms (median)": 1e3 * times[name][0],
             "step ms (best)": 1e3 * times[name][1],
             "peak step MiB": peak_step_bytes(step) / 2 ** 20} for name, step in steps.items()]
    reference_row = next(row for row in rows if row["variant"].startswith("PEFT"))
    for row in rows:
        row["best vs PEFT + bitsandbytes"] = row["step ms (best)"] / reference_row["step ms (best)"]
        row["peak vs PEFT + bitsandbytes"] = row["peak step MiB"] / reference_row["peak step MiB"]
    return rows


def goal_rows(checkpoints: list[dict], steps: list[dict], qlora: list[dict]) -> list[dict]:
    """Each figure of the issue against its goal, from this run's tables."""
    ours = lambda rows, variant, key: next(row[key] for row in rows if row["variant"] == variant)
    figures = [("checkpoint bytes vs PEFT's", "<= 1.05", ours(checkpoints, "lora_fx.integrations Trainer, graph",
                                                             "bytes vs PEFT"), lambda x: x <= 1.05)]
    figures += [(f"Trainer steps/s vs PEFT's, {mode}, dropout {DROPOUT}", ">= 1.1",
                 ours(steps, f"lora_fx, {mode}", "steps/s vs PEFT (same mode)"), lambda x: x >= 1.1)
                for mode in ("eager", "torch_compile=True")]
    for row in (row for row in qlora if row["variant"] == "lora_fx, bitsandbytes nf4 (loaded)"):
        figures += [(f"QLoRA step vs PEFT + bitsandbytes ({row['model']})", "<= 1.0",
                     row["best vs PEFT + bitsandbytes"], lambda x: x <= 1.0),
                    (f"QLoRA peak step memory vs PEFT + bitsandbytes ({row['model']})", "<= 1.0",
                     row["peak vs PEFT + bitsandbytes"], lambda x: x <= 1.0)]
    return [{"figure": name, "goal": goal, "measured": value, "met": "yes" if met(value) else "no"}
            for name, goal, value, met in figures]


PARTS = {"checkpoints": ("trainer_checkpoint", "Trainer checkpoints: lora_fx graph vs PEFT model"),
         "steps": ("trainer_step", "Trainer steps/s: lora_fx graph vs PEFT model"),
         "qlora": ("trainer_qlora", "QLoRA step on a bitsandbytes-loaded nf4 model: lora_fx vs PEFT")}


def part_rows(part: str, model) -> list[dict]:
    if part == "checkpoints":
        return checkpoint_rows(model)
    if part == "steps":
        return step_rows(model)
    return (qlora_rows(qlora_model(), token_batch(1000, 4, 32), "qlora_dora.md's, batch 4 x 32", True)
            + qlora_rows(model, token_batch(VOCAB, BATCH, SEQ), f"Llama 512 x 4, batch {BATCH} x {SEQ}", False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="*", help=f"tables to run again, of {list(PARTS)} (default: all); the goals "
                                                  f"table is made from the tables written")
    chosen = parser.parse_args().parts or list(PARTS)
    if set(chosen) - set(PARTS):
        parser.error(f"unknown tables {sorted(set(chosen) - set(PARTS))}; choose from {list(PARTS)}")
    model = llama()
    for part in chosen:
        load = os.getloadavg()[0]
        rows = part_rows(part, model)
        name, title = PARTS[part]
        print(write_results(name, title, rows, f"Load average before this table: {load:.2f}, after: "
                                               f"{os.getloadavg()[0]:.2f} ({os.cpu_count()} cores). {NOTES}"))
    checkpoints, steps, qlora = (json.loads((RESULTS / f"{PARTS[part][0]}.json").read_text())["rows"]
                                 for part in PARTS)
    print(write_results("trainer_goals", "Trainer, checkpoints and QLoRA against the issue's goals",
                        goal_rows(checkpoints, steps, qlora), NOTES))
    print((RESULTS / "trainer_goals.md").read_text())


NOTES = (f"Trainer: Llama hidden 512 x 4 layers, vocab {VOCAB}, batch {BATCH} x {SEQ}, all-linear r={RANK}, dropout "
         f"{DROPOUT}, AdamW; a step is timed from the Trainer's on_step_begin to on_step_end (forward, loss, "
         f"backward, optimizer, scheduler), median of steps {WARMUP + 1}..{STEPS} (the first ones compile), the best "
         f"of {ROUNDS} runs, lora_fx and PEFT in turn. A checkpoint is `Trainer._save_checkpoint` after one step: "
         f"weights (the adapter, or the whole model), optimizer, scheduler, RNG and trainer state; median of {SAVES} "
         f"saves. QLoRA: the qlora_dora.md model (hidden 256, 2 layers, vocab 1000, batch 4 x 32) and the Trainer's "
         f"Llama, r={RANK} on q/k/v/o/gate/up/down (no dropout), loaded with BitsAndBytesConfig(load_in_4bit=True, "
         f"bnb_4bit_quant_type='nf4') for both libraries; eager fp32 compute; 15 interleaved steps after 2 warm-up "
         f"steps; peak step MiB = the most bytes the step's own tensor allocations hold at once.")


if __name__ == "__main__":
    main()
