"""Run the zoo's decoder-only language models through `gm.generate` and write benchmarks/results/zoo_generate.md
(+ .json): per architecture, whether greedy decoding equals the oracle's `generate` token for token, and for those
that do not decode, the first line of the error.

    python -m tests.zoo.generate_report              # every decoder-only architecture
    python -m tests.zoo.generate_report llama gpt2   # some: their rows in the committed table are replaced

The architectures are the zoo's whose model `can_generate()` and is not an encoder-decoder; the vision-language
ones (LLaVA, Qwen2.5-VL) are captured and decode from text alone (input_ids without pixels, no image tokens).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
import warnings

import peft
import torch
import transformers
from transformers.pytorch_utils import Conv1D

import lora_fx
from benchmarks.common import RESULTS, write_results
from tests.conftest import randomize_lora
from tests.zoo.architectures import ARCHITECTURES, BY_NAME, VOCAB, Arch
from tests.zoo.checks import SPEC, first_line, hold_adapter, is_direct_read, lora_fqns, peft_fqns, peft_model

NEW_TOKENS = 8
STD = 0.2                            # the LoRA factors' std: every adapter changes the tokens it decodes
CHECKS = ("greedy", "padded")
CLOCK = time.process_time            # this process's CPU seconds: they do not grow while other jobs hold the cores


def decoder_only(arch: Arch) -> bool:
    model = arch.model()
    return model.can_generate() and not getattr(model.config, "is_encoder_decoder", False)


def prompt(batch: int, length: int, seed: int) -> torch.Tensor:
    """Text tokens, none of them special (no pad, BOS, EOS, nor the vision-language models' image tokens)."""
    return torch.randint(3, VOCAB - 3, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`prompt`'s rows with the first 3 and 1 tokens of rows 0 and 1 made padding (pad id 0, mask 0)."""
    ids, mask = prompt(batch, length, seed), torch.ones(batch, length, dtype=torch.long)
    mask[0, :3], mask[1, :1] = 0, 0
    return ids.masked_fill(mask == 0, 0), mask


@dataclasses.dataclass
class Result:
    status: str            # "pass" | "fail" (tokens differ) | "refused" (a lora_fx error) | "error" | "skip"
    detail: str = ""


MARKS = {"pass": "✓", "fail": "✗", "refused": "refused", "error": "error", "skip": "–"}


def cell(result: Result) -> str:
    return f"{MARKS[result.status]} {result.detail}".strip().replace("|", "\\|").replace("\n", " ")


def merged_eager(model, gm):
    """The eager model with every adapted weight W + s·B·A (GPT-2's Conv1D stores W as (in, out): its transpose)."""
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for fqn, (lora_A, lora_B, scale) in lora_fx.adapter_weights(gm, "default").items():
            module = merged.get_submodule(fqn)
            delta = scale * lora_B @ lora_A
            module.weight += delta.T if isinstance(module, Conv1D) else delta
    return merged


def peft_oracle(model, gm, arch: Arch):
    """(PEFT with gm's adapter weights, what it holds) or (None, why not). Modules PEFT cannot serve
    (`arch.eager_oracle`: a weight read directly) get W + s·B·A written into the PEFT copy's own weight. PEFT
    targets "all-linear" (on transformers-5 MoE models its expert parameters too, as lora_fx's all-linear does), and
    where that adds modules gm's graph never runs (a vision tower), gm's sites by name."""
    ours = lora_fqns(gm)
    served = [fqn for fqn in ours if not is_direct_read(arch, fqn)]
    for targets in ("all-linear", served):
        reference = peft_model(model, arch, targets)
        if peft_fqns(reference) == served:
            break
    else:
        return None, f"PEFT adapts other modules: {sorted(set(peft_fqns(reference)) ^ set(served))[:2]}"
    direct = hold_adapter(gm, reference, arch)
    held = "PEFT" + (" (`target_modules`: lora_fx's sites; its all-linear adds modules the text-only graph never "
                     "runs)" if isinstance(targets, list) else "")
    held += f" (+ W + s·B·A on {', '.join(arch.eager_oracle)}: read directly)" if direct else ""
    return reference, held


def compare(ours, theirs) -> Result:
    """Tokens of two `generate` results (return_dict_in_generate, output_logits): equal, or the first new token
    where a row differs, with the largest logit difference up to there (a near tie, or a real difference)."""
    worst = lambda steps: max((a - b).abs().max().item() for a, b in zip(ours.logits[:steps], theirs.logits[:steps]))
    if torch.equal(ours.sequences, theirs.sequences):
        return Result("pass", f"{ours.sequences.shape[0]}×{len(ours.logits)} tokens, max |Δ logits| "
                              f"{worst(len(ours.logits)):.1e}")
    new = min(len(ours.logits), len(theirs.logits))
    start = ours.sequences.shape[1] - len(ours.logits)
    differ = (ours.sequences[:, start:start + new] != theirs.sequences[:, start:start + new]).nonzero()
    if not len(differ):
        return Result("fail", f"{len(ours.logits)} new tokens against {len(theirs.logits)} (a stop differs)")
    row, step = (int(i) for i in differ[differ[:, 1].argmin()])
    return Result("fail", f"from new token {step + 1} (row {row}: {int(ours.sequences[row, start + step])} vs "
                          f"{int(theirs.sequences[row, start + step])}); max |Δ logits| up to there "
                          f"{worst(step + 1):.1e}")


def decode(gm, oracle, base, ids, mask) -> tuple[Result, float]:
    """`gm.generate` against the oracle's greedy `generate` on `ids` (with `mask`), and gm's seconds."""
    settings = dict(max_new_tokens=NEW_TOKENS, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    masked = {} if mask is None else {"attention_mask": mask}
    started = CLOCK()
    try:
        ours = gm.generate(ids, **masked, **settings)
    except (lora_fx.CaptureError, lora_fx.CallError) as err:
        return Result("refused", first_line(err)), CLOCK() - started
    except Exception as err:
        return Result("error", first_line(err)), CLOCK() - started
    seconds = CLOCK() - started
    try:
        theirs = oracle.generate(input_ids=ids, **masked, do_sample=False, **settings)
    except Exception as err:
        return Result("skip", "the oracle cannot: " + first_line(err)), seconds
    result = compare(ours, theirs)
    if result.status == "pass" and torch.equal(ours.sequences, base.generate(input_ids=ids, **masked, do_sample=False,
                                                                               **settings).sequences):
        return Result("fail", "the adapters change no token: the comparison would be vacuous"), seconds
    return result, seconds


def run(arch: Arch) -> dict:
    started = CLOCK()
    model = arch.model()
    row = {"architecture": arch.name, "model": type(model).__name__, "oracle": "", **dict.fromkeys(CHECKS, ""),
           "capture s": 0.0, "first generate s": 0.0, "ms/token": 0.0, "seconds": 0.0}   # CPU time
    try:
        gm = lora_fx.apply(model, dataclasses.replace(SPEC, exclude=list(arch.exclude) or None),
                           example_kwargs={"input_ids": prompt(2, arch.length, 0), **arch.constants(model)})
    except lora_fx.CaptureError as err:
        row.update(greedy=cell(Result("refused", "capture: " + first_line(err))), padded=cell(Result("skip")))
        row["seconds"] = round(CLOCK() - started, 1)
        return row
    row["capture s"] = round(CLOCK() - started, 1)
    gm.eval()
    randomize_lora(gm, std=STD)
    try:
        oracle, held = peft_oracle(model, gm, arch)
        if oracle is not None:
            oracle.generate(input_ids=prompt(1, 2, 0), max_new_tokens=1, do_sample=False, pad_token_id=0)
    except Exception as err:
        oracle, held = None, "PEFT cannot: " + first_line(err)
    if oracle is None:
        oracle, held = merged_eager(model, gm), f"W + s·B·A ({held})"
    row["oracle"] = held

    greedy, row["first generate s"] = decode(gm, oracle, model, prompt(2, 6, 1), None)
    if greedy.status in ("refused", "error"):
        padded = Result("skip")
    else:
        padded, seconds = decode(gm, oracle, model, *left_padded(2, 6, 2))
        row["ms/token"] = 1e3 * seconds / NEW_TOKENS
    row.update(greedy=cell(greedy), padded=cell(padded), seconds=CLOCK() - started)
    return {name: round(value, 1) if isinstance(value, float) else value for name, value in row.items()}


def outcome(row: dict) -> str:
    """The row's category: "decodes" (every comparison ✓), "differs" (one ✗), "refused" or "error"."""
    cells = (row["greedy"], row["padded"])
    for mark, name in (("refused", "refused"), ("error", "error"), ("✗", "differs")):
        if any(text.startswith(mark) for text in cells):
            return name
    return "decodes"


def headline(rows: list[dict]) -> str:
    found: dict[str, list[str]] = {}
    for row in rows:
        found.setdefault(outcome(row), []).append(row["architecture"])
    named = lambda name: f" ({', '.join(found[name])})" if found.get(name) else ""
    return (f"transformers {transformers.__version__}, peft {peft.__version__}; {len(rows)} decoder-only "
            f"architectures: {len(found.get('decodes', []))} decode the oracle's tokens (greedy, and left-padded "
            f"with an attention mask), {len(found.get('differs', []))} differ{named('differs')}, "
            f"{len(found.get('refused', []))} refused{named('refused')}, {len(found.get('error', []))} fail with "
            f"another error{named('error')}; {sum(row['seconds'] for row in rows):.0f} s in all.")


def main(names: list[str]) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)         # two threads on shared cores spin while waiting for each other: CPU time is noise
    chosen = [BY_NAME[name] for name in names] if names else [arch for arch in ARCHITECTURES if decoder_only(arch)]
    rows = []
    for arch in chosen:
        rows.append(run(arch))
        print(" | ".join(str(value) for value in rows[-1].values()), flush=True)
    if names:
        rows = _merged_with_the_committed_table(rows)
    print(write_results("zoo_generate", "Model zoo through generate: lora_fx vs the oracle, greedy, all-linear, "
                                        "rank 4", rows, headline(rows) + "\n\n" + LEGEND))


def _merged_with_the_committed_table(rows: list[dict]) -> list[dict]:
    """The committed rows, those of `rows` replaced (and new ones appended), in the zoo's order."""
    path = RESULTS / "zoo_generate.json"
    committed = json.loads(path.read_text())["rows"] if path.exists() else []
    by_name = {row["architecture"]: row for row in committed} | {row["architecture"]: row for row in rows}
    return [by_name[arch.name] for arch in ARCHITECTURES if arch.name in by_name]


LEGEND = """\
Each decoder-only model of the zoo (tests/zoo/architectures.py: `can_generate()` and not an encoder-decoder; LLaVA
and Qwen2.5-VL from text alone: input_ids without pixels or image tokens) is built from its tiny config (seeded,
eval mode), given `lora_fx.apply(model, LoraSpec(targets="all-linear", rank=4, alpha=8.0), example_kwargs=
{"input_ids": ids, "use_cache": False})` and random LoRA factors (std 0.2), and
`gm.generate(x, max_new_tokens=8)` is compared with the oracle's `generate(input_ids=x, max_new_tokens=8,
do_sample=False)` token for token. Run: `python -m tests.zoo.generate_report [names...]` (names: those rows
replaced in this table).

- **oracle**: HF PEFT's `generate` on a copy of the model holding the same LoRA weights,
  `target_modules="all-linear"` (for the MoE families PEFT 0.21 converts for transformers 5, without that
  conversion, as in zoo.md; for LLaVA and Qwen2.5-VL, `target_modules` = lora_fx's sites by name, since PEFT's
  all-linear also adapts the vision tower, which a text-only graph never runs). Mamba, FalconMamba and Jamba read
  `dt_proj.weight` directly (`self.dt_proj.weight @ time_step`), so PEFT's LoRA there is dead: the oracle writes
  W + s·B·A into that weight and PEFT serves the other modules. Where PEFT cannot decode a model, or adapts other
  modules than lora_fx, the oracle would be the eager model with W + s·B·A written into every adapted weight (as
  tests/lora_fx/generation does for Mamba2's `out_proj`); no row needs it.
- **greedy**: a batch of 2 prompts of 6 tokens, 8 new tokens. ✓: the same tokens (with the largest logit
  difference over the steps); ✗: the first new token where a row differs, and the largest logit difference up to
  there (a near tie tells float noise from a wrong step); *refused*: a lora_fx error naming the cause (its first
  line); *error*: any other exception. A ✓ also needs the base model to decode other tokens (adapters live, the
  comparison not vacuous). **padded**: the same with the rows left-padded (3 and 1 pad tokens, id 0) and the
  attention mask.
- Times are this process's CPU seconds (`time.process_time`, one torch thread; the cores were shared with other
  jobs, so wall clock would measure them, and two threads spin while waiting for each other): **capture s**:
  capture and apply (the forward graph); **first generate s**: the first `generate`, which traces the prefill and
  decode programs and builds their graphs with the adapters; **ms/token**: the second (padded) call, prefill and
  8 eager decode steps, per new token; **seconds**: the whole row, oracle included. Sizes, not a benchmark
  (benchmarks/results/generate.md is one).
- Covered by these rows: grouped-query and multi-query attention (GPT-BigCode, Falcon), absolute, rotary (GPT-J's
  and CodeGen's partial `rotary_dim`) and ALiBi (Bloom, MPT) positions, Conv1D (GPT-2), sliding-window layers
  (Gemma2/3, GPT-OSS, GPT-Neo's local attention; window 4 < the 14 positions decoded: the cache keeps every token
  and the model's mask hides the old ones), MLA (DeepSeek-V2/V3), MoE models (their module sites; experts through
  `target_parameters` are checked in tests/lora_fx/generation), state-space caches (Mamba, Mamba2, FalconMamba:
  conv and SSM states) and hybrids (Jamba, Falcon-H1, Bamba, Qwen3-Next's linear attention), and Qwen2.5-VL's
  multimodal rotary positions (from text alone).

Why the others do not decode:
- **DBRX** is refused at capture (zoo.md lists it as known): its experts loop over the experts the router hit
  (`for expert_idx in expert_hit:`), data-dependent control flow, whatever `_experts_implementation` says, so
  torch.export cannot capture the forward, nor the decoding steps. Not a generation limitation: a traceable experts
  path for DBRX (its stacked `w1`/`v1`/`w2` as batched matmuls, as `batched_mm` does for the other MoE families)
  would make the capture, and so decoding, work.
- The zoo's encoder-decoders (T5, mT5, BART, mBART, Pegasus, Marian, Whisper) are not rows: `generate` refuses them
  by name (`CallError: cannot generate: ... is an encoder-decoder model; lora_fx decodes decoder-only language
  models`), and the encoders, vision and audio models have no language-model head (`can_generate()` is False:
  refused by name too).
- Fixed with this table (lora_fx/generation/programs.py, a test each in tests/lora_fx/generation/test_generate.py):
  LLaVA was refused because its forward takes `use_cache` through `**kwargs` (passed on to its language model) and
  the check looked for the name; GPT-Neo's decode step did not export (`Constraints violated (past)`): its
  attention slices the (context × context) causal-mask buffer by the past length, so the past dim needs the
  context bound. The decode step's past length now runs from 0 to `max_position_embeddings` − 1 (generate never
  goes past the context)."""


if __name__ == "__main__":
    main(sys.argv[1:])
