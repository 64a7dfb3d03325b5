"""`add_weighted_adapter`: a linear combination of adapters as a new adapter, exactly.

PEFT's "cat" combination: at each site the new factors stack the inputs' factors,

    A' = [w_1·s_1·A_1; w_2·s_2·A_2; ...]  (rows),   B' = [B_1, B_2, ...]  (columns),   s' = 1

so B'·A' = sum_i w_i·s_i·B_i·A_i for any ranks. A site that some input does not adapt contributes nothing from it.
"""

from __future__ import annotations

import re

import torch
from torch import fx

from lora_fx.apply import add_adapter, plan
from lora_fx.errors import AdapterError
from lora_fx.spec import LoraSpec
from lora_fx.state import LORA_A, LORA_B, factor_name, require_adapters, state_of


def add_weighted_adapter(gm: fx.GraphModule, adapters: list[str], weights: list[float], name: str) -> None:
    """Add adapter `name` = sum_i weights[i] · adapters[i]. Like PEFT, the new adapter is not made active."""
    state = state_of(gm)
    adapters = require_adapters(state, adapters)
    if not adapters or len(weights) != len(adapters) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        raise AdapterError(f"need one numeric weight per adapter: got adapters {adapters} and weights {weights!r}")
    if name in state.specs:
        raise AdapterError(f"adapter {name!r} already exists; choose a new name for the combination")
    fqns = list(dict.fromkeys(fqn for a in adapters for fqn in state.sites[a]))
    ranks = {fqn: sum(state.specs[a].rank_for(fqn) for a in adapters if fqn in state.sites[a]) for fqn in fqns}
    uniform = len(set(ranks.values())) == 1
    rank = next(iter(ranks.values()))
    patterns = None if uniform else {re.escape(fqn): r for fqn, r in ranks.items()}
    spec = LoraSpec(targets=fqns, rank=rank, alpha=float(rank), dropout=state.specs[adapters[0]].dropout,
                    adapter=name, rank_pattern=patterns, alpha_pattern=patterns and {k: float(v) for k, v in
                                                                                     patterns.items()})
    sites = plan(gm, spec)
    stacked = {}
    for fqn in fqns:
        blocks_A, blocks_B = [], []
        for adapter, weight in zip(adapters, weights):
            if fqn in state.sites[adapter]:
                scale = state.specs[adapter].scale_for(fqn)
                blocks_A.append(gm.get_parameter(factor_name(fqn, LORA_A, adapter)).detach() * (weight * scale))
                blocks_B.append(gm.get_parameter(factor_name(fqn, LORA_B, adapter)).detach())
        stacked[fqn] = torch.cat(blocks_A, dim=0), torch.cat(blocks_B, dim=1)
    add_adapter(gm, spec, sites, activate=False)
    with torch.no_grad():
        for fqn, (lora_A, lora_B) in stacked.items():
            gm.get_parameter(factor_name(fqn, LORA_A, name)).copy_(lora_A)
            gm.get_parameter(factor_name(fqn, LORA_B, name)).copy_(lora_B)
