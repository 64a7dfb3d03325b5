"""mixed_batch: one graph that serves many adapters in one batch — row i through `adapters[adapter_ids[i]]`.

    mixed = lora_fx.mixed_batch(gm, adapters=["a", "b", "c"])
    out = mixed(ids, adapter_ids=torch.tensor([0, 2, -1, 1]))       # -1: the base model

`mixed_batch` derives a new graph module (`lora_fx.derived.derive`); `gm` is untouched. Its state is `routed`, so
every graph built for it routes each row through its own adapter (`lora_fx.passes.route_rows`, which has the
math). The result holds the chosen adapters, in id order (`lora_fx.adapters(mixed)` is the id table: deleting one
renumbers those after it), all active whatever `gm`'s active set or `disabled` state (`set_active`/`disabled` on
`mixed` send the rows of the adapters they switch off to the base), and without sibling fusion (routed branches do
not share projections); its LoRA parameters are `gm`'s own Parameter objects (same PEFT names), so training `mixed`
trains them and `save_adapter(mixed, ...)` works (moving or casting `mixed` moves them in `gm` too); base weights
are frozen objects of its own sharing storage.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.utils import _pytree as pytree

from lora_fx.commit import Change, commit
from lora_fx.derived.derive import derive
from lora_fx.distributed import refuse_if_sharded
from lora_fx.errors import AdapterError
from lora_fx.passes.route_rows import ADAPTER_IDS, check_stackable
from lora_fx.sites import adapter_tensor_names
from lora_fx.state import GraphState, require_adapters, state_of

def mixed_batch(gm: fx.GraphModule, adapters) -> fx.GraphModule:
    """A new graph module whose forward takes `adapter_ids` too; see the module docstring."""
    state = state_of(gm)
    refuse_if_sharded(gm, "mixed_batch", "derive the mixed-batch graph before sharding, and shard that")
    names = _checked_names(state, adapters)
    check_stackable(gm, state, names)
    mixed = routed_copy(gm)
    kept = set(names)
    removed = tuple(tensor for adapter, keys in state.sites.items() if adapter not in kept for key in keys
                    for tensor in adapter_tensor_names(state.site_info[key], state.specs[adapter]))
    sites = {name: state.sites[name] for name in names}
    keys = {key for site_keys in sites.values() for key in site_keys}
    commit(mixed, Change(state.evolve(specs={name: state.specs[name] for name in names}, sites=sites,
                                      site_info={k: v for k, v in state.site_info.items() if k in keys},
                                      active=tuple(names), enabled=True, siblings="separate", routed=True),
                      remove=removed))
    return mixed


def is_mixed(gm: fx.GraphModule) -> bool:
    """Whether `gm` routes rows by `adapter_ids`."""
    state = state_of(gm)
    return state.routed and bool(state.specs)


def routed_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy of `gm` whose LoRA parameters are `gm`'s own objects and whose base parameters are new frozen
    Parameters sharing `gm`'s storage (buffers are copied)."""
    return derive(gm, share_lora=True)


def example_adapter_ids(gm: fx.GraphModule) -> dict:
    """{"adapter_ids": ids} for the captured example batch, cycling through -1 (base) and every adapter."""
    state = state_of(gm)
    first = next(leaf for leaf in pytree.tree_leaves((state.example_args, dict(state.example_kwargs)))
                 if isinstance(leaf, torch.Tensor))
    ids = torch.arange(first.shape[0], device=first.device) % (len(state.specs) + 1) - 1
    return {ADAPTER_IDS: ids}


def _checked_names(state: GraphState, adapters) -> list[str]:
    names = require_adapters(state, adapters)
    if not names:
        raise AdapterError(f"mixed_batch needs at least one adapter; this graph has {list(state.specs)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise AdapterError(f"adapter(s) {repeated} listed more than once: each adapter id names one adapter")
    return names
