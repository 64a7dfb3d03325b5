"""merge: a new graph module with adapters folded into the base weights, and no LoRA left.

For each adapted site and each chosen adapter a, with the base weight W0:

    W' = W0 + sum_a s_a · ΔW_a        (ΔW = B·A in the weight's own layout, as the site's kind lays it out)

(a DoRA adapter adds g·(W0 + s·ΔW) - W0 instead, see `lora_fx.sites.dora`; a quantized W0 is dequantized first)

computed in fp32 and cast back to W0's dtype (PEFT upcasts the same way on CPU). Every read of the weight saw that
delta in its own layout, so the merged module equals the unmerged one however the weight is read. Like PEFT's
`safe_merge`, a merged weight that is not finite is refused.

The result is built from the same plain captures, so its graphs are the plain capture's (a fused op lowered for
LoRA reads its merged weight again). Neither the source graph nor the user's model is touched, so no `unmerge` is
needed: keep the unmerged graph. The result's parameters are its own objects (flags never couple); unchanged
weights share storage with the source while frozen, or are copied with `copy=True` — use that before training the
merged model, so an optimizer never writes weights the source (and the user's model) share.
"""

from __future__ import annotations

import torch
from torch import fx

from lora_fx.adapters import adapter_weights
from lora_fx.commit import Change, commit
from lora_fx.derived.derive import derive
from lora_fx.distributed import refuse_if_sharded
from lora_fx.errors import AdapterError
from lora_fx.quantize import as_seen, dense, format_of, is_quantized
from lora_fx.sites import adapter_tensor_names, variant_of
from lora_fx.state import require_adapters, state_of


def merged_weights(gm: fx.GraphModule, adapters: list[str], progress: bool = False) -> dict[str, torch.Tensor]:
    """{weight name: W'} for every site any of `adapters` adapts. Raises if a result is not finite."""
    from tqdm import tqdm

    state = state_of(gm)
    weights = {adapter: adapter_weights(gm, adapter) for adapter in adapters}
    keys = list(dict.fromkeys(key for adapter in adapters for key in state.sites[adapter]))
    merged, broken = {}, []
    for key in tqdm(keys, desc="merging", unit="site", disable=not progress):
        site = state.site_info[key]
        base = gm.get_parameter(site.weight)
        dense_base = dense(base).float()
        weight = dense_base
        for adapter in adapters:
            if key in weights[adapter]:
                lora_A, lora_B, scale = weights[adapter][key]     # each adapter's delta against the base W
                weight = weight + variant_of(state.specs[adapter]).merged_delta(
                    gm, adapter, site, dense_base, lora_A.float(), lora_B.float(), scale)
        if not torch.isfinite(weight).all():
            broken.append(key)
        merged[site.weight] = weight.to(as_seen(base).dtype)
    if broken:
        raise AdapterError(f"merging {adapters} gives non-finite weights at {broken}; refusing to build a broken "
                           f"model (check those adapters' lora_A/lora_B for NaN or Inf)")
    return merged


def without_adapters(gm: fx.GraphModule, replace: dict[str, torch.Tensor] | None = None, *,
                     copy: bool = False) -> fx.GraphModule:
    """A new graph module computing `gm`'s base model, with the weights in `replace` swapped in: every parameter
    its own frozen object (sharing `gm`'s storage unless `copy`), every buffer its own copy, no adapter. A
    quantized weight replaced by a dense one is dense in the result."""
    result = derive(gm, replace, copy=copy)
    state = state_of(result)
    removed = tuple(tensor for adapter, keys in state.sites.items() for key in keys
                    for tensor in adapter_tensor_names(state.site_info[key], state.specs[adapter]))
    quantized = {name: fmt for name, fmt in state.quantized.items() if is_quantized(result.get_parameter(name))}
    commit(result, Change(state.evolve(specs={}, sites={}, site_info={}, active=(), quantized=quantized),
                          remove=removed))
    return result


def merge(gm: fx.GraphModule, adapters: list[str] | str | None = None, *, copy: bool = False,
          progress: bool = False, requantize: bool = False) -> fx.GraphModule:
    """A new graph module computing `gm` with `adapters` (default: the active ones) merged in and no LoRA left.

    On a quantized base (`lora_fx.quantize_base`) every quantized weight is dequantized, and the merged ones are
    W' = dequantize(W) + ΔW, so the result equals the unmerged graph. `requantize=True` stores the merged weights
    in their format again (and keeps the other quantized weights as they are): smaller, but W' then carries a new
    quantization error, so it differs from the unmerged graph by that much."""
    state = state_of(gm)
    refuse_if_sharded(gm, "merge", "merge needs whole weights: merge before sharding, or save_adapter (collective) and "
                                   "merge it into the model in one process")
    chosen = list(state.active) if adapters is None else require_adapters(state, adapters)
    merged = merged_weights(gm, chosen, progress)
    if requantize:
        replace = {name: format_of(state.quantized[name]).quantize(weight, like=gm.get_parameter(name))
                   if name in state.quantized else weight for name, weight in merged.items()}
    else:
        replace = {**{name: dense(gm.get_parameter(name)) for name in state.quantized}, **merged}
    return without_adapters(gm, replace, copy=copy)
