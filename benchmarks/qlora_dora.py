"""Quantized bases and DoRA, side by side in one process: training step time, bytes of the adapted base weights and
bytes kept for backward, for an fp32 base vs nf4 vs int8 (lora_fx, torchao) and vs PEFT + bitsandbytes nf4; and the
DoRA / LoRA step-time ratio for lora_fx and PEFT. All eager, fp32 compute (bf16 matmuls are slow on CPU).

    python -m benchmarks.qlora_dora            # writes benchmarks/results/qlora_dora.{json,md}
"""

from __future__ import annotations

import copy
import statistics
import time

import peft
import torch
import transformers

import lora_fx
from benchmarks.common import training_step, write_results
from benchmarks.models import token_batch
from lora_fx import LoraSpec

RANK, VOCAB, BATCH, SEQ, ROUNDS = 8, 1000, 4, 32, 15
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model() -> transformers.LlamaForCausalLM:
    """Llama-like, hidden 256, 2 layers; every linear weight's element count divides by nf4's 64·256."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config)


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a weight occupies, through tensor subclasses (torchao) and bitsandbytes' quant state."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    total = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)             # bitsandbytes Params4bit: absmax, nested state
    while state is not None:
        total += state.absmax.numel() * state.absmax.element_size()
        state = getattr(state, "state2", None)
    return total


def base_bytes(module) -> int:
    return sum(stored_bytes(m.weight) for name, m in module.named_modules()
               if name.rsplit(".", 1)[-1] in TARGETS and hasattr(m, "weight"))


def ours(base, fmt: str | None, dora: bool):
    gm = lora_fx.apply(copy.deepcopy(base), LoraSpec(targets=TARGETS, rank=RANK, alpha=2.0 * RANK, use_dora=dora),
                       example_args=(token_batch(VOCAB, 2, 16),), example_kwargs={"use_cache": False})
    if fmt is not None:
        gm = lora_fx.quantize_base(gm, fmt)
    gm.train()
    weights = {site.weight for site in gm.meta["lora_fx"].adapted_sites()}
    return gm, (lambda ids: gm(ids).logits), sum(stored_bytes(gm.get_parameter(name)) for name in weights)


def bnb_nf4(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with each targeted nn.Linear replaced by bitsandbytes' Linear4bit (nf4, double-quantized), as
    transformers' BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True) loads it."""
    import bitsandbytes as bnb
    for name, child in list(module.named_modules()):
        if name.rsplit(".", 1)[-1] in TARGETS and isinstance(child, torch.nn.Linear):
            quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
            quantized.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True)
            parent, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(parent), leaf, quantized.to("cpu"))       # .to quantizes
    return module


def theirs(base, bnb: bool, dora: bool):
    model_copy = copy.deepcopy(base)
    if bnb:
        model_copy = bnb_nf4(model_copy)
    reference = peft.get_peft_model(model_copy, peft.LoraConfig(target_modules=TARGETS, r=RANK, lora_alpha=2 * RANK,
                                                                use_dora=dora))
    reference.train()
    return reference, (lambda ids: reference(input_ids=ids, use_cache=False).logits), base_bytes(reference)


def saved_bytes(module, call, ids) -> int:
    """Bytes autograd saves for backward in one forward: distinct storages, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters() if type(p.data) is torch.Tensor}
    saved = {}

    def pack(tensor):
        if type(tensor) is torch.Tensor and tensor.untyped_storage().data_ptr() not in params:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        call(ids)
    return sum(saved.values())


def interleaved_times(steps: dict, rounds: int = ROUNDS, warmup: int = 2, clock=time.perf_counter) -> dict:
    """{key: (median, best) seconds per step} of each of `steps` (wall time, or the `clock` given), timed in turn
    round after round, so that a change in the machine's load hits every variant alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {key: [] for key in steps}
    for _ in range(rounds):
        for key, step in steps.items():
            started = clock()
            step()
            times[key].append(clock() - started)
    return {key: (statistics.median(values), min(values)) for key, values in times.items()}


def main() -> None:
    base = model()
    ids = token_batch(VOCAB, BATCH, SEQ)
    variants = {
        ("lora_fx", "fp32", "LoRA"): lambda: ours(base, None, False),
        ("lora_fx", "nf4 (torchao)", "LoRA"): lambda: ours(base, "nf4", False),
        ("lora_fx", "int8 (torchao)", "LoRA"): lambda: ours(base, "int8", False),
        ("lora_fx", "fp32", "DoRA"): lambda: ours(base, None, True),
        ("lora_fx", "nf4 (torchao)", "DoRA"): lambda: ours(base, "nf4", True),
        ("PEFT", "fp32", "LoRA"): lambda: theirs(base, False, False),
        ("PEFT", "nf4 (bitsandbytes)", "LoRA"): lambda: theirs(base, True, False),
        ("PEFT", "fp32", "DoRA"): lambda: theirs(base, False, True),
        ("PEFT", "nf4 (bitsandbytes)", "DoRA"): lambda: theirs(base, True, True),
    }
    built = {key: make() for key, make in variants.items()}
    times = interleaved_times({key: training_step(module, call, ids) for key, (module, call, _) in built.items()})
    rows = []
    for (library, base_format, variant), (module, call, weight_bytes) in built.items():
        rows.append({"library": library, "base": base_format, "adapter": variant,
                     "step ms (median)": 1e3 * times[library, base_format, variant][0],
                     "step ms (best)": 1e3 * times[library, base_format, variant][1],
                     "adapted base weights MB": weight_bytes / 2**20,
                     "saved for backward MB": saved_bytes(module, call, ids) / 2**20})
    for row in rows:
        lora = times.get((row["library"], row["base"], "LoRA"))
        best = times[row["library"], row["base"], row["adapter"]][1]
        row["best / same with LoRA"] = best / lora[1] if lora else "-"
        row["best / same on fp32 base"] = best / times[row["library"], "fp32", row["adapter"]][1]
    notes = (f"Llama-like model, hidden 256, intermediate 768, 2 layers, vocab {VOCAB}; batch {BATCH} x {SEQ} "
             f"tokens; rank {RANK} on {', '.join(TARGETS)}; training step = forward, loss, backward, AdamW step; "
             f"eager, fp32 compute; "
             f"15 timed steps after 2 warm-up steps, the variants timed in turn step by step; ratios use the best "
             f"step (the least disturbed by other jobs). 'adapted base weights' = bytes of the "
             f"adapted linear weights as stored (quantization scales included); 'saved for backward' = distinct "
             f"storages autograd keeps in one forward, parameters excluded (a kept dequantized weight would show "
             f"here). PEFT's nf4 base is bitsandbytes'.")
    print(write_results("qlora_dora", "Quantized bases and DoRA: training step", rows, notes))


if __name__ == "__main__":
    main()
