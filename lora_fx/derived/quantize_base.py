"""quantize_base: a new graph module whose frozen base weights are stored quantized (QLoRA).

    qgm = lora_fx.quantize_base(gm, "nf4")          # or "int8", "bnb-nf4"; modules="all-linear" for every linear

returns a new graph module (`gm` is untouched) whose chosen base weights are stored quantized (torchao tensors, or
bitsandbytes' 4-bit weights; see `lora_fx.quantize`); LoRA factors stay in the compute dtype. Its state records
them (`GraphState.quantized`), and every graph built for it reads them through `lora_fx.passes.dequantize_reads`
(not a bitsandbytes base after pickling: its weights lose their quant state). Capture sees a storage-free stand-in
of each quantized weight (its shape, dtype and device), so capturing again never materialises the dense model.
"""

from __future__ import annotations

import torch
from torch import fx

from lora_fx.commit import Change, commit
from lora_fx.derived.derive import derive
from lora_fx.distributed import refuse_if_sharded
from lora_fx.errors import QuantizeError
from lora_fx.match import analyse
from lora_fx.quantize import format_of, require_library
from lora_fx.state import state_of

MODULE_CHOICES = ("adapted", "all-linear")


def quantize_base(gm: fx.GraphModule, fmt: str = "nf4", *, modules: str = "adapted") -> fx.GraphModule:
    """A new graph module computing `gm` with the base weights of `modules` stored in `fmt` ("nf4" or "int8").

    `modules="adapted"`: the weights of the linear sites `gm`'s adapters adapt; `"all-linear"`: every linear
    module's weight except the output layer (what "all-linear" targets). Every weight is checked before anything
    is made, and `gm` is never changed."""
    state = state_of(gm)
    refuse_if_sharded(gm, "quantize_base", "quantize the base before sharding, and shard the quantized graph")
    quant = format_of(fmt)
    if modules not in MODULE_CHOICES:
        raise QuantizeError(f"`modules` must be one of {MODULE_CHOICES}, got {modules!r}")
    if state.quantized:
        names = sorted(state.quantized)
        raise QuantizeError(f"this graph's base is already quantized ({len(names)} weights, e.g. module "
                            f"{names[0].rpartition('.')[0]!r} as {state.quantized[names[0]]}: loaded quantized, or "
                            f"by quantize_base); quantize_base takes a graph with a full-precision base: quantize "
                            f"the graph of the full-precision model, or train this one as it is")
    require_library(quant)
    uses = analyse(gm)
    if modules == "adapted":
        chosen = [site.fqn for site in state.adapted_sites() if site.kind == "linear" and site.key == site.fqn]
        if not chosen:
            raise QuantizeError("this graph has no adapted linear site to quantize: apply an adapter first, or pass "
                                "modules='all-linear'")
    else:
        chosen = [fqn for fqn, entry in uses.items() if entry.weight_site is not None
                  and entry.weight_site.kind == "linear" and state.module_kinds.get(fqn) in ("linear", "conv1d_hf")
                  and fqn not in state.output_layers]
    problems = []
    for fqn in chosen:
        weight = gm.get_parameter(f"{fqn}.weight")
        entry = uses.get(fqn)
        if entry is not None and entry.foreign:
            problems.append(f"module {fqn!r}: its weight is also read by "
                            f"{sorted({str(n.target) for n in entry.foreign})} (a tied weight?); quantize_base "
                            f"quantizes weights read only by linear ops")
        elif not weight.is_floating_point() or weight.dim() != 2:
            problems.append(f"module {fqn!r}: its weight is {weight.dtype} with shape {tuple(weight.shape)}; "
                            f"quantize_base quantizes 2-D floating-point weights")
        elif problem := quant.shape_problem(tuple(weight.shape)):
            problems.append(f"module {fqn!r} (weight {tuple(weight.shape)}): {problem}")
    if problems:
        raise QuantizeError(f"cannot quantize the base as {fmt}; nothing was changed:\n  - " + "\n  - ".join(problems))
    with torch.no_grad():
        stored = {f"{fqn}.weight": quant.quantize(gm.get_parameter(f"{fqn}.weight").detach()) for fqn in chosen}
    result = derive(gm, stored)
    commit(result, Change(state.evolve(quantized={name: fmt for name in stored})))
    return result
