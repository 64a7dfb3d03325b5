"""MoE training step, side by side in one process: LoRA on the experts' 3-D weights (`gate_up_proj`, `down_proj`) by
PEFT's `target_parameters` (which materialises W + s·B·A for every expert on every step) and by lora_fx (rank-r
grouped matmuls on the routed tokens), eager and compiled, on a Qwen3-MoE-like model with 8 and 64 experts, top-2
routing, transformers' `grouped_mm` experts. Reports the median step time and the peak tensor memory of one step
(every allocation the step makes, from the profiler's memory timeline; weights and optimizer state excluded), and as
the floor of any experts LoRA the eager step with the experts frozen (PEFT with one LoRA on layer 0's q_proj, so the
backward still runs through every expert layer's input).

    python -m benchmarks.moe_step            # writes benchmarks/results/moe_step.{json,md}
"""

from __future__ import annotations

import copy

import peft
import torch
import transformers
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action

import lora_fx
from benchmarks.common import median_seconds, training_step, write_results
from lora_fx import LoraSpec

BATCH, SEQ, RANK, HIDDEN, EXPERT_WIDTH, VOCAB = 4, 64, 8, 256, 256, 1000
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
FLOOR = "floor: experts frozen (PEFT, one LoRA on layer 0's q_proj), eager"
NOTES = """Peak step MiB: the most memory the step's own allocations hold at once. PEFT's grows with E·in·out (it
materialises W + s·B·A for every expert). lora_fx's grows with E·r·(in+out) only, the LoRA factors' gradients
(0.6 MiB at E = 8, 5 MiB at E = 64 here): its graphs read the frozen experts with `lora_fx::grouped_mm`, which
computes no gradient for them (transformers' fp32 `grouped_mm_fallback`, which the plain capture runs, allocates and
computes one at every read). The floor row is the same step with no LoRA on the experts, its backward still running
through them: no experts LoRA can be faster, and at E = 8 the floor itself is near 0.7x PEFT's step (its ratio),
which bounds what the goal of 0.7x can reach there in eager. PEFT compiled hits dynamo's recompile limit in its
parametrisation code and runs partly eager. Timings on a 2-core machine are noisy: compare ratios within one row
pair."""


def model(num_experts: int) -> transformers.Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                                         moe_intermediate_size=EXPERT_WIDTH, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, num_experts=num_experts,
                                         num_experts_per_tok=2, max_position_embeddings=SEQ)
    config._experts_implementation = "grouped_mm"
    return transformers.Qwen3MoeForCausalLM(config).train()


def peak_step_bytes(step) -> int:
    """The most bytes the step's own allocations hold at once (tensors that exist before it are not counted)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        live += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, live)
    return peak


def variants(base, ids):
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=[], target_parameters=TARGETS,
                                                                          r=RANK, lora_alpha=2 * RANK))
    gm = lora_fx.apply(base, LoraSpec(target_parameters=TARGETS, rank=RANK, alpha=2.0 * RANK),
                       (ids[:2, :16],), {"use_cache": False})
    for module in (reference, gm):                      # non-identity adapters, the same in both
        torch.manual_seed(1)
        with torch.no_grad():
            for name, param in sorted(module.named_parameters()):
                if param.requires_grad and "lora_B" in name:
                    param.normal_(std=0.01)
    floor = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["q_proj"], layers_to_transform=[0],
                                                                     r=RANK, lora_alpha=2 * RANK))
    hf = lambda m: (lambda x: m(input_ids=x, use_cache=False).logits)
    compiled = torch.compile(gm)
    return {
        FLOOR: training_step(floor, hf(floor), ids),
        "PEFT target_parameters, eager": training_step(reference, hf(reference), ids),
        "PEFT target_parameters, compiled": training_step(reference, hf(torch.compile(reference)), ids),
        "lora_fx, eager": training_step(gm, lambda x: gm(x).logits, ids),
        "lora_fx, compiled": training_step(gm, lambda x: compiled(x).logits, ids),
    }


def main() -> None:
    torch.set_num_threads(2)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    rows = []
    for num_experts in (8, 64):
        steps = variants(model(num_experts), ids)
        best = {}
        for _ in range(2):                               # interleaved, best of two medians
            for name, step in steps.items():
                best[name] = min(median_seconds(step, repeats=10, warmup=3), best.get(name, float("inf")))
        peaks = {name: peak_step_bytes(step) for name, step in steps.items()}
        for mode in ("eager", "compiled"):
            peft_name, ours = f"PEFT target_parameters, {mode}", f"lora_fx, {mode}"
            rows += [{"experts": num_experts, "variant": name, "ms": best[name] * 1e3,
                      "vs PEFT (same mode)": best[name] / best[peft_name], "peak step MiB": peaks[name] / 2 ** 20}
                     for name in (peft_name, ours) + ((FLOOR,) if mode == "eager" else ())]
    title = (f"MoE training step: LoRA r={RANK} on the experts (gate_up_proj + down_proj), Qwen3-MoE-like (hidden "
             f"{HIDDEN}, expert width {EXPERT_WIDTH}, 2 layers, top-2), batch {BATCH} x {SEQ}, AdamW, fp32, "
             f"grouped_mm experts")
    path = write_results("moe_step", title, rows, NOTES)
    print(path.read_text())


if __name__ == "__main__":
    main()
