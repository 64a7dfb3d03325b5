"""Run the whole zoo and write benchmarks/results/zoo.md (+ .json): architecture x check, with the first line of
the error for every failure, and the machine and versions named.

    python -m tests.zoo.report            # every architecture
    python -m tests.zoo.report llama t5   # some: their rows in the committed table are replaced
"""

from __future__ import annotations

import json
import sys
import time
import warnings

import peft
import transformers

from benchmarks.common import RESULTS, write_results
from tests.zoo.architectures import ARCHITECTURES, BY_NAME
from tests.zoo.checks import CHECKS, Outcome, problems, run

MARKS = {"pass": "✓", "fail": "✗", "fixed": "fixed", "skip": "–", "refused": "refused"}


def cell(outcome: Outcome) -> str:
    text = f"{MARKS[outcome.status]} {outcome.detail}".strip()
    return text.replace("|", "\\|").replace("\n", " ")


def main(names: list[str]) -> None:
    warnings.filterwarnings("ignore")
    chosen = [BY_NAME[name] for name in names] if names else ARCHITECTURES
    rows, failures, started = [], {}, time.perf_counter()
    for arch in chosen:
        model_class = type(arch.model()).__name__
        outcomes = run(arch)
        failures[arch.name] = problems(outcomes)
        row = {"architecture": arch.name, "model": model_class}
        row.update({name: cell(outcomes[name]) for name in CHECKS})
        row["seconds"] = float(outcomes["seconds"].detail)
        rows.append(row)
        print(" | ".join(str(value) for value in row.values()), flush=True)
    every = sum(not found for found in failures.values())
    failing = [f"{name} ({', '.join(found)})" for name, found in failures.items() if found]
    notes = (f"transformers {transformers.__version__}, peft {peft.__version__}; {len(rows)} architectures, "
             f"{every} without a failure or a refused capture; {time.perf_counter() - started:.0f} s in all.\n\n"
             f"Failing: {', '.join(failing) or 'none'}.\n\n" + LEGEND)
    if names:
        rows, failures = _merged_with_the_committed_table(rows, failures)
        every = sum(not found for found in failures.values())
        failing = [f"{name} ({', '.join(found)})" for name, found in failures.items() if found]
        notes = (f"transformers {transformers.__version__}, peft {peft.__version__}; {len(rows)} architectures, "
                 f"{every} without a failure or a refused capture; {sum(row['seconds'] for row in rows):.0f} s of "
                 f"checks in all.\n\nFailing: {', '.join(failing) or 'none'}.\n\n" + LEGEND)
    print(write_results("zoo", "Model zoo: lora_fx vs PEFT, all-linear, rank 4", rows, notes))


def _merged_with_the_committed_table(rows: list[dict], failures: dict) -> tuple[list[dict], dict]:
    """The committed rows, those of `rows` replaced; failures recomputed from every row's cells."""
    fresh = {row["architecture"]: row for row in rows}
    committed = json.loads((RESULTS / "zoo.json").read_text())["rows"]
    merged = [fresh.get(row["architecture"], row) for row in committed]
    merged += [row for row in rows if row["architecture"] not in {r["architecture"] for r in committed}]
    found = {row["architecture"]: failures.get(row["architecture"]) or
             [name for name in CHECKS if row[name].startswith("✗") or (name == "capture" and
                                                                        row[name].startswith("refused"))]
             for row in merged}
    return merged, found


LEGEND = """\
Each model is built from a tiny config (seeded, eval mode), captured once with `lora_fx.capture(model,
example_kwargs=...)` (with `use_cache=False` where the model takes it), given `LoraSpec(targets="all-linear",
rank=4, alpha=8.0)`, its adapters set to random non-identity values, and compared with HF PEFT
(`target_modules="all-linear"`) on a copy of the model holding the same adapter weights. Run:
`python -m tests.zoo.report` (this table); `python3 -m pytest -q -m zoo tests/zoo` (all but the `ci` subset; the
default test run checks the `ci` subset: llama, gpt2, qwen3_moe, mamba2, t5, vit).

- **capture**: `capture` + `apply` work; *refused*: a `CaptureError` naming the cause (the code line, the module).
- **sites**: the adapted module FQNs equal PEFT's (their count). On the MoE families whose experts transformers 5
  fused into 3-D parameters (Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V2/V3, Qwen3-Next) both resolve `all-linear` as
  PEFT 0.21 does (`lora_fx.moe_all_linear`): the experts' `gate_up_proj` (rank 2r, alpha 2α) and `down_proj` and
  the router's `gate.weight` too, and no module whose name is a transformers-4 expert name.
- **forward**: the main output (logits, or the last hidden state) equals PEFT's, atol = rtol = 1e-5 (the largest
  difference), and differs from the base model's (the adapters are live). **gradients**: every LoRA parameter's
  gradient of mean(output²) equals PEFT's (the largest difference). **merge**: `lora_fx.merge(gm)` equals `gm`.
  **keys**: `save_adapter` writes exactly PEFT's `save_pretrained` keys with equal tensors (their count).
- **dynamic**: the graph runs an input of another shape than the example (batch 3 instead of 2, length + 3): ✓
  names that shape; *fixed* quotes the `CaptureWarning` of a dim torch.export specialized or bounded (Mamba2,
  Falcon-H1 and Bamba: the SSD chunked scan on an example shorter than one chunk runs only lengths up to the chunk
  size), and the checks then use the example's shape. Vision models keep the image size their config fixes, so only their batch changes.
- **kinds**: every `nn.Embedding`/`nn.ConvNd` module as targets: the sites per kind lora_fx adapts; *refused*: the
  modules it refuses, each tried alone and refused with a `TargetError` naming it (the first quoted) — embeddings
  tied to the output layer (the graph reads the tied weight through the output layer) and grouped/dilated convs
  (Mamba's depthwise conv1d, wav2vec2's positional conv). **kinds_parity**: the accepted ones against PEFT with the
  same targets and weights: forward / gradients / merge differences / saved keys.
- Mamba-type models: PEFT refuses `out_proj` there (its LoRA is dead in the fused training kernel, PEFT issue
  2274); in eval mode transformers calls `out_proj` as a module, so the oracle is PEFT with that refusal lifted.
  Mamba, FalconMamba and Jamba read `dt_proj.weight` directly (`self.dt_proj.weight @ time_step`), so PEFT's LoRA on
  `dt_proj` is dead (the output equals the base model's): lora_fx adapts that read; the oracle there is the eager
  model with W + s·B·A, and the LoRA gradients follow from that weight's gradient G (∂L/∂A = s·Bᵀ·G, ∂L/∂B = s·G·Aᵀ).
- SigLIP: its pooling head's `nn.MultiheadAttention` reads `out_proj.weight` directly, so PEFT's LoRA on that
  `out_proj` is dead; eager oracle there too.
- OPT: its positional embedding (an `nn.Embedding` subclass) takes the attention mask, which PEFT's embedding
  wrapper looks up as ids; the oracle there is the eager model with W + s·(B·A)ᵀ, gradients by the chain rule.
- Failing, and why (each listed as `known` in tests/zoo/architectures.py, so the zoo test fails when one starts
  passing): DBRX and Qwen2.5-VL are refused at capture with a `CaptureError` naming the data-dependent code
  (DBRX loops over the experts hit whatever `_experts_implementation` says; Qwen2.5-VL's vision window index turns
  grid sizes into Python ints). BART, mBART, Pegasus, Marian (`embed_positions`) and Whisper
  (`conv1`): PEFT's wrappers fail on these modules (positional embeddings called with something other than ids; the
  encoder reads `conv1.stride`), so PEFT cannot be the oracle there and lora_fx's side is not yet checked by
  another one.
- PhiMoE: its router is an `nn.Linear` subclass whose forward returns a tuple; PEFT's LoRA wrapper fails on it, so
  the router is excluded on both sides (lora_fx adapts its linear read).
- MoE models use `config._experts_implementation = "batched_mm"` (the eager per-expert loop does not export)."""


if __name__ == "__main__":
    main(sys.argv[1:])
