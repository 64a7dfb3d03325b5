"""`apply`: the one verb. Capture (if needed), match, insert tagged LoRA branches.

Applying is idempotent: the same spec again changes nothing. A spec with another adapter name adds branches on the
same base linears, in parallel with the existing ones (never on `lora_A`/`lora_B`). Every check runs before the
graph is touched, so a failed call leaves the model and the graph as they were.
"""

from __future__ import annotations

from torch import fx, nn

from lora_fx.adapters import sync_scales
from lora_fx.capture import capture
from lora_fx.errors import AdapterError
from lora_fx.match import LOWERINGS, Site, match
from lora_fx.passes.insert_lora import insert_lora
from lora_fx.spec import LoraSpec
from lora_fx.state import is_lora_graph, state_of


def apply(model: nn.Module, spec: LoraSpec, example_args=None, example_kwargs: dict | None = None, *,
          dynamic: bool = True) -> fx.GraphModule:
    """Add the adapter `spec` describes; returns the graph (a new one for a model, `model` itself for a graph).

    `model` is a user model (captured first, see `lora_fx.capture`; it is never mutated) or a graph returned by
    `capture`/`apply`, which is extended in place. The new adapter is active. Only LoRA parameters require grad.
    """
    if not isinstance(spec, LoraSpec):
        raise TypeError(f"spec must be a lora_fx.LoraSpec, got {type(spec).__name__}")
    if is_lora_graph(model):
        if example_args is not None or example_kwargs is not None:
            raise TypeError("this graph is already captured: call apply(gm, spec) without example inputs")
        gm = model
    else:
        gm = capture(model, example_args, example_kwargs, dynamic=dynamic)
    sites = plan(gm, spec)
    if sites is not None:
        add_adapter(gm, spec, sites)
    return gm


def plan(gm: fx.GraphModule, spec: LoraSpec) -> list[Site] | None:
    """The sites `spec` would adapt in `gm`, or None when it is already applied. Raises on any problem."""
    state = state_of(gm)
    existing = state.specs.get(spec.adapter)
    if existing is not None:
        if existing == spec:
            return None
        raise AdapterError(f"adapter {spec.adapter!r} already exists with a different spec (fields "
                           f"{existing.differences(spec)} differ); use another `adapter` name, or "
                           f"lora_fx.delete_adapter(gm, {spec.adapter!r}) first")
    found = match(gm, spec, state)
    found.raise_problems()
    if found.to_lower:      # fused ops reading targeted weights: lower them, then those weights are sites
        for node in found.to_lower:
            LOWERINGS[node.target].lower(gm, node)
        found = match(gm, spec, state)
        found.raise_problems()
    return found.sites


def add_adapter(gm: fx.GraphModule, spec: LoraSpec, sites: list[Site], *, activate: bool = True) -> None:
    """Insert `spec.adapter`'s branches at `sites` (from `plan`) and record it."""
    state = state_of(gm)
    insert_lora(gm, sites, spec)
    state.specs[spec.adapter] = spec
    state.sites[spec.adapter] = tuple(site.fqn for site in sites)
    if activate:
        state.active.append(spec.adapter)
    sync_scales(gm)
