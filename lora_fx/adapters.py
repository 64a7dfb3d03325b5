"""Adapter controls on a captured graph: list, read, activate, disable, delete. None of them re-captures.

Which adapters contribute is held in the per-site scale buffers (`s` for an active adapter, 0 otherwise), so
switching is an in-place write of 0-d tensors: graphs compiled by torch.compile stay valid. An adapter that does
not contribute adds exactly nothing, whatever its weights hold (see `lora_fx.passes.insert_lora`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import fx

from lora_fx.commit import Change, commit, set_scales
from lora_fx.distributed import refuse_if_sharded
from lora_fx.sites import DORA, adapter_tensor_names, dora, tensor_names, variant_of
from lora_fx.state import require_adapters, state_of


def adapters(gm: fx.GraphModule) -> list[str]:
    """Names of the adapters applied to `gm`, in the order they were applied."""
    return list(state_of(gm).specs)


def active_adapters(gm: fx.GraphModule) -> list[str]:
    """Names of the adapters that currently contribute to `gm`'s output."""
    return list(state_of(gm).active)


def blocks(gm: fx.GraphModule) -> list[torch.nn.Module]:
    """The model's repeated blocks (decoder layers) that run as their own modules, at the model's own paths — what
    FSDP2's `fully_shard`, activation checkpointing and per-block `torch.compile` take. Empty when the graph is
    flat (a capture that could not keep them says why)."""
    state_of(gm)
    return gm.blocks()


def adapter_weights(gm: fx.GraphModule, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{site key: (A, B, s)} of adapter `name` (the key is the module's FQN, or the parameter's name for a parameter
    site): A (r, in) and B (out, r) as the site's kind lays them out, detached from autograd (sharing storage), and
    the adapter's own scale s (whether or not it is active). The one read API behind save, merge, export and
    combine."""
    state = state_of(gm)
    require_adapters(state, name)
    spec = state.specs[name]
    weights = {}
    for key in state.sites[name]:
        name_A, name_B, _ = tensor_names(state.site_info[key], name)
        weights[key] = (gm.get_parameter(name_A).detach(), gm.get_parameter(name_B).detach(), spec.scale_for(key))
    return weights


def magnitude_vectors(gm: fx.GraphModule, name: str) -> dict[str, torch.Tensor]:
    """{site key: m} of the DoRA adapter `name` (see `lora_fx.sites.dora`), detached; {} for a LoRA adapter. The
    companion of `adapter_weights`."""
    state = state_of(gm)
    require_adapters(state, name)
    if variant_of(state.specs[name]) is not DORA:
        return {}
    return {key: gm.get_parameter(dora.magnitude_name(state.site_info[key], name)).detach()
            for key in state.sites[name]}


def set_active(gm: fx.GraphModule, names) -> None:
    """Make exactly `names` (a name or a list of names; [] for none) the active adapters."""
    state = state_of(gm)
    names = require_adapters(state, names)
    set_scales(gm, state.evolve(active=tuple(name for name in state.specs if name in names)))


@contextlib.contextmanager
def disabled(gm: fx.GraphModule):
    """Within the block `gm` computes the base model's output; the previous enabled state is restored on exit."""
    previous = state_of(gm).enabled
    set_scales(gm, state_of(gm).evolve(enabled=False))
    try:
        yield gm
    finally:
        set_scales(gm, state_of(gm).evolve(enabled=previous))


def delete_adapter(gm: fx.GraphModule, name: str) -> None:
    """Remove adapter `name`: its branches, parameters and scales. Other adapters are untouched; deleting every
    adapter gives back the plain capture's graph."""
    state = state_of(gm)
    if not isinstance(name, str):
        raise TypeError(f"delete_adapter takes one adapter name (a str), got {name!r}")
    require_adapters(state, name)
    refuse_if_sharded(gm, "delete_adapter", "delete adapters before sharding, or zero a slot with hotswap_adapter")
    removed = tuple(tensor for key in state.sites[name]
                    for tensor in adapter_tensor_names(state.site_info[key], state.specs[name]))
    commit(gm, Change(state.without_adapter(name), remove=removed))
