"""`add_weighted_adapter`: a linear combination of adapters as a new adapter, exactly.

PEFT's "cat" combination: at each site the new factors stack the inputs' factors,

    A' = [w_1·s_1·A_1; w_2·s_2·A_2; ...]  (rows),   B' = [B_1, B_2, ...]  (columns),   s' = 1

so B'·A' = sum_i w_i·s_i·B_i·A_i for any ranks. A site that some input does not adapt contributes nothing from it.
"""

from __future__ import annotations

import math
import re

import torch
from torch import fx

from lora_fx.adapters import adapter_weights
from lora_fx.apply import plan
from lora_fx.commit import commit
from lora_fx.distributed import refuse_if_sharded
from lora_fx.errors import AdapterError
from lora_fx.sites import kind_of, variant_of
from lora_fx.spec import LoraSpec
from lora_fx.state import require_adapters, state_of


def add_weighted_adapter(gm: fx.GraphModule, adapters: list[str], weights: list[float], name: str) -> None:
    """Add adapter `name` = sum_i weights[i] · adapters[i]. Like PEFT, the new adapter is not made active."""
    state = state_of(gm)
    refuse_if_sharded(gm, "add_weighted_adapter", "combine adapters before sharding")
    adapters = require_adapters(state, adapters)
    if not adapters or not isinstance(weights, (list, tuple)) or len(weights) != len(adapters) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        raise AdapterError(f"need one numeric weight per adapter: got adapters {adapters} and weights {weights!r}")
    if not all(math.isfinite(w) for w in weights):
        raise AdapterError(f"combination weights must be finite, got {list(weights)}")
    if name in state.specs:
        raise AdapterError(f"adapter {name!r} already exists; choose a new name for the combination")
    unstackable = [a for a in adapters if variant_of(state.specs[a]).unstackable]
    if unstackable:
        variant = variant_of(state.specs[unstackable[0]])
        raise AdapterError(f"add_weighted_adapter combines LoRA adapters, and {unstackable} are {variant.name} "
                           f"adapters ({variant.unstackable})")
    fqns = list(dict.fromkeys(fqn for a in adapters for fqn in state.sites[a]))
    kinds = {fqn: kind_of(state.site_info[fqn]) for fqn in fqns}
    if any(kind.selected_by == "parameters" for kind in kinds.values()):
        raise AdapterError("add_weighted_adapter combines module sites only; these adapters adapt parameters "
                           f"{[f for f, k in kinds.items() if k.selected_by == 'parameters']}")
    ranks = {fqn: sum(state.specs[a].rank_for(fqn) for a in adapters if fqn in state.sites[a]) for fqn in fqns}
    rank = next(iter(ranks.values()))
    # "^fqn" keys match exactly that FQN under PEFT's `(.*\.)?(key)$` pattern rule
    patterns = None if len(set(ranks.values())) == 1 else {"^" + re.escape(fqn): r for fqn, r in ranks.items()}
    spec = LoraSpec(targets=_exact(fqns), rank=rank, alpha=float(rank),
                    dropout=state.specs[adapters[0]].dropout, adapter=name, rank_pattern=patterns,
                    alpha_pattern=patterns and {k: float(v) for k, v in patterns.items()})
    factors = {adapter: adapter_weights(gm, adapter) for adapter in adapters}
    stacked, broken = {}, []
    for fqn in fqns:
        parts = [(weight, *factors[a][fqn]) for a, weight in zip(adapters, weights) if fqn in factors[a]]
        dim_A, dim_B = kinds[fqn].rank_dims
        lora_A = torch.cat([A * (weight * scale) for weight, A, _, scale in parts], dim=dim_A)     # (sum r, in)
        lora_B = torch.cat([B for _, _, B, _ in parts], dim=dim_B)                                # (out, sum r)
        if not (torch.isfinite(lora_A).all() and torch.isfinite(lora_B).all()):
            broken.append(fqn)
        stacked[fqn] = lora_A, lora_B
    if broken:
        raise AdapterError(f"the combination has non-finite weights at {broken}; check those adapters' "
                           f"lora_A/lora_B for NaN or Inf")
    commit(gm, plan(gm, spec, stacked, activate=False))


def _exact(fqns: list[str]) -> str:
    """A regex full-matching exactly `fqns`."""
    return "|".join(re.escape(fqn) for fqn in fqns)
