"""merge: a new graph with adapters folded into the base weights, and no LoRA left.

For each adapted site and each chosen adapter a, with the base weight W0 (out × in):

    W' = W0 + sum_a s_a · B_a·A_a          (transposed for HF Conv1D, whose weight is stored (in, out))

computed in fp32 and cast back to W0's dtype (PEFT upcasts the same way on CPU). The result is a deep copy of the
graph that shares every weight it does not change with the source; all adapters' branches are removed from it, so
its graph is the plain capture's. Neither the source graph nor the user's model is touched, so no `unmerge` is
needed: keep the unmerged graph. Fused ops lowered for LoRA (see lower_mamba2) get their merged output projection
back, so they stay one node. Like PEFT's `safe_merge`, a merged weight that is not finite is refused.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from lora_fx.errors import AdapterError
from lora_fx.match import sites_by_fqn
from lora_fx.passes.lower_mamba2 import refuse_outproj
from lora_fx.passes.remove_lora import remove_lora
from lora_fx.state import LORA_A, LORA_B, factor_name, is_lora_state_name, require_adapters, state_of, submodule


def merged_weights(gm: fx.GraphModule, adapters: list[str], progress: bool = False) -> dict[str, torch.Tensor]:
    """{weight name: W'} for every site any of `adapters` adapts. Raises if a result is not finite."""
    from tqdm import tqdm

    state = state_of(gm)
    sites = sites_by_fqn(gm)
    fqns = list(dict.fromkeys(fqn for a in adapters for fqn in state.sites[a]))
    merged, broken = {}, []
    for fqn in tqdm(fqns, desc="merging", unit="site", disable=not progress):
        base = gm.get_parameter(f"{fqn}.weight")
        weight = base.detach().float()
        for adapter in adapters:
            if fqn in state.sites[adapter]:
                lora_A = gm.get_parameter(factor_name(fqn, LORA_A, adapter)).detach().float()   # (r, in)
                lora_B = gm.get_parameter(factor_name(fqn, LORA_B, adapter)).detach().float()   # (out, r)
                delta = state.specs[adapter].scale_for(fqn) * (lora_B @ lora_A)                  # (out, in)
                weight = weight + (delta.T if sites[fqn].fan_in_fan_out else delta)
        if not torch.isfinite(weight).all():
            broken.append(fqn)
        merged[f"{fqn}.weight"] = weight.to(base.dtype)
    if broken:
        raise AdapterError(f"merging {adapters} gives non-finite weights at {broken}; refusing to build a broken "
                           f"model (check those adapters' lora_A/lora_B for NaN or Inf)")
    return merged


def without_adapters(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy of `gm` with every adapter removed, sharing all base weights and buffers with `gm`."""
    shared = {id(t): t for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers()]
              if not is_lora_state_name(name)}
    result = copy.deepcopy(gm, shared)
    state = state_of(result)
    for adapter in list(state.specs):
        remove_lora(result, adapter, state.sites[adapter])
    state.specs.clear(), state.sites.clear(), state.active.clear()
    return result


def merge(gm: fx.GraphModule, adapters: list[str] | str | None = None, *, progress: bool = False) -> fx.GraphModule:
    """A new graph computing `gm` with `adapters` (default: the active ones) merged in and no LoRA nodes left."""
    state = state_of(gm)
    chosen = list(state.active) if adapters is None else require_adapters(state, adapters)
    weights = merged_weights(gm, chosen, progress)
    result = without_adapters(gm)
    for name, weight in weights.items():
        owner, _, attr = name.rpartition(".")
        submodule(result, owner)._parameters[attr] = nn.Parameter(weight, requires_grad=False)
    refuse_outproj(result)     # lowered fused ops read their merged output projection again
    return result
