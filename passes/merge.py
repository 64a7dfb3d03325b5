"""merge: a new graph module with adapters folded into the base weights, and no LoRA left.

For each adapted site and each chosen adapter a, with the base weight W0:

    W' = W0 + sum_a s_a · ΔW_a        (ΔW = B·A in the weight's own layout, as the site's kind lays it out)

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

import copy as copying

import torch
from torch import fx, nn

from lora_fx.adapters import adapter_weights
from lora_fx.commit import Change, commit
from lora_fx.distributed import refuse_if_sharded
from lora_fx.errors import AdapterError
from lora_fx.sites import kind_of, tensor_names
from lora_fx.state import is_lora_state_name, require_adapters, state_of


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
        weight = base.detach().float()
        for adapter in adapters:
            if key in weights[adapter]:
                lora_A, lora_B, scale = weights[adapter][key]
                weight = weight + scale * kind_of(site).delta(site, lora_A.float(), lora_B.float())
        if not torch.isfinite(weight).all():
            broken.append(key)
        merged[site.weight] = weight.to(base.dtype)
    if broken:
        raise AdapterError(f"merging {adapters} gives non-finite weights at {broken}; refusing to build a broken "
                           f"model (check those adapters' lora_A/lora_B for NaN or Inf)")
    return merged


def without_adapters(gm: fx.GraphModule, replace: dict[str, torch.Tensor] | None = None, *,
                     copy: bool = False) -> fx.GraphModule:
    """A new graph module computing `gm`'s base model, with the weights in `replace` swapped in: every parameter
    its own frozen object (sharing `gm`'s storage unless `copy`), every buffer its own copy, no adapter."""
    memo = {}
    for name, param in gm.named_parameters(remove_duplicate=False):
        if not is_lora_state_name(name) and id(param) not in memo:
            memo[id(param)] = nn.Parameter(param.detach().clone() if copy else param.detach(), requires_grad=False)
    result = copying.deepcopy(gm, memo)
    for name, weight in (replace or {}).items():
        owner, _, attr = name.rpartition(".")
        result.get_submodule(owner)._parameters[attr] = nn.Parameter(weight, requires_grad=False)
    state = state_of(result)
    removed = tuple(tensor for adapter, keys in state.sites.items() for key in keys
                    for tensor in tensor_names(state.site_info[key], adapter))
    commit(result, Change(state.evolve(specs={}, sites={}, site_info={}, active=()), remove=removed))
    return result


def merge(gm: fx.GraphModule, adapters: list[str] | str | None = None, *, copy: bool = False,
          progress: bool = False) -> fx.GraphModule:
    """A new graph module computing `gm` with `adapters` (default: the active ones) merged in and no LoRA left."""
    state = state_of(gm)
    refuse_if_sharded(gm, "merge", "merge needs whole weights: merge before sharding, or save_adapter (collective) and "
                                   "merge it into the model in one process")
    chosen = list(state.active) if adapters is None else require_adapters(state, adapters)
    return without_adapters(gm, merged_weights(gm, chosen, progress), copy=copy)
