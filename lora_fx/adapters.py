"""Adapter controls on a captured graph: list, activate, disable, delete. None of them re-captures.

Which adapters contribute is held in the per-site scale buffers (`s` for an active adapter, 0 otherwise), so
switching is an in-place write of 0-d tensors: graphs compiled by torch.compile stay valid.
"""

from __future__ import annotations

import contextlib

import torch
from torch import fx

from lora_fx.passes.remove_lora import remove_lora
from lora_fx.state import require_adapters, scaling_name, state_of


def adapters(gm: fx.GraphModule) -> list[str]:
    """Names of the adapters applied to `gm`, in the order they were applied."""
    return list(state_of(gm).specs)


def active_adapters(gm: fx.GraphModule) -> list[str]:
    """Names of the adapters that currently contribute to `gm`'s output."""
    return list(state_of(gm).active)


def set_active(gm: fx.GraphModule, names) -> None:
    """Make exactly `names` (a name or a list of names; [] for none) the active adapters."""
    state = state_of(gm)
    names = require_adapters(state, names)
    state.active = [name for name in state.specs if name in names]
    sync_scales(gm)


@contextlib.contextmanager
def disabled(gm: fx.GraphModule):
    """Within the block `gm` computes the base model's output; the previous state is restored on exit."""
    state = state_of(gm)
    previous, state.enabled = state.enabled, False
    sync_scales(gm)
    try:
        yield gm
    finally:
        state.enabled = previous
        sync_scales(gm)


def delete_adapter(gm: fx.GraphModule, name: str) -> None:
    """Remove adapter `name`: its branches, parameters and scales. Other adapters are untouched."""
    state = state_of(gm)
    require_adapters(state, name)
    remove_lora(gm, name, state.sites[name])
    del state.specs[name], state.sites[name]
    state.active = [a for a in state.active if a != name]


def sync_scales(gm: fx.GraphModule) -> None:
    """Write each site's scale buffer: the spec's scale for enabled, active adapters, else 0."""
    state = state_of(gm)
    with torch.no_grad():
        for adapter, spec in state.specs.items():
            on = state.enabled and adapter in state.active
            for fqn in state.sites[adapter]:
                gm.get_buffer(scaling_name(fqn, adapter)).fill_(spec.scale_for(fqn) if on else 0.0)
