"""`apply`: the one verb. Capture (if needed), match, and commit an adapter's branches.

Applying is idempotent: the same spec again changes nothing. A spec with another adapter name adds branches on the
same base weights, in parallel with the existing ones (never on `lora_A`/`lora_B`). Planning is pure and every
check runs before anything changes; the change then commits whole or not at all (see `lora_fx.commit`).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from lora_fx.capture import capture
from lora_fx.commit import Change, commit
from lora_fx.distributed import refuse_if_sharded
from lora_fx.errors import AdapterError
from lora_fx.match import match
from lora_fx.moe_all_linear import resolved
from lora_fx.passes.checkpoint_blocks import POLICIES
from lora_fx.passes.lean_dropout import DROPOUT_MASKS
from lora_fx.quantize import as_seen, dense
from lora_fx.sites import Site, kind_of, tensor_names, variant_of
from lora_fx.spec import LoraSpec
from lora_fx.state import is_lora_graph, state_of


def apply(model: nn.Module, spec: LoraSpec, example_args=None, example_kwargs: dict | None = None, *,
          dynamic: bool = True, blocks: bool = True, strict_shapes: bool = False) -> fx.GraphModule:
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
        gm = capture(model, example_args, example_kwargs, dynamic=dynamic, blocks=blocks,
                     strict_shapes=strict_shapes)
    change = plan(gm, spec)
    if change is not None:
        commit(gm, change)
    return gm


def plan(gm: fx.GraphModule, spec: LoraSpec, initial: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
         *, activate: bool = True) -> Change | None:
    """The change that adds `spec` to `gm` (factors from `initial` = {site key: (A, B)} where given, else
    initialized), or None when it is already applied. Raises on any problem; changes nothing."""
    state = state_of(gm)
    refuse_if_sharded(gm, "apply", "apply and load adapters before sharding (lora_fx.shard / fully_shard); a sharded "
                                   "model takes new weights with hotswap_adapter into an existing slot")
    spec = resolved(gm, spec)                     # "all-linear" on transformers-5 MoE models: PEFT's sites
    existing = state.specs.get(spec.adapter)
    if existing is not None:
        if existing == spec and initial is None:
            return None
        raise AdapterError(f"adapter {spec.adapter!r} already exists" + (
            f" with a different spec (fields {existing.differences(spec)} differ)" if existing != spec else "") +
            f"; use another `adapter` name, or lora_fx.delete_adapter(gm, {spec.adapter!r}) first")
    found = match(gm, spec, state)
    found.raise_problems()
    sites = found.sites + found.pending
    tensors = {}
    for site in sites:
        tensors.update(adapter_tensors(gm, site, spec, None if initial is None else initial[site.key]))
    return Change(state.with_adapter(spec, sites, activate=activate), add=tensors)


def adapter_tensors(gm: fx.GraphModule, site: Site, spec: LoraSpec, initial=None) -> dict[str, torch.Tensor]:
    """New factors and scale buffer of `spec.adapter` at `site`, on the base weight's device and in its dtype,
    shaped and initialised by the site's kind (as PEFT does), or copied from `initial` = (A, B); a DoRA adapter's
    variant's own tensors too (DoRA's magnitude vector), from `initial` = (A, B, m) or initialised as PEFT does."""
    kind = kind_of(site)
    base = gm.get_parameter(site.weight)
    factory = {"device": base.device, "dtype": as_seen(base).dtype}         # a quantized base: its compute dtype
    rank = spec.rank_for(site.key)
    shape_A, shape_B = kind.factor_shapes(site, rank)
    lora_A, lora_B = torch.empty(shape_A, **factory), torch.empty(shape_B, **factory)
    with torch.no_grad():
        if initial is not None:
            lora_A.copy_(initial[0])
            lora_B.copy_(initial[1])
        else:
            kind.initialize(lora_A, lora_B, dataclasses.replace(spec, rank=rank))
    name_A, name_B, name_scale = tensor_names(site, spec.adapter)
    tensors = {name_A: nn.Parameter(lora_A), name_B: nn.Parameter(lora_B),
               name_scale: torch.zeros((), dtype=torch.float32, device=base.device)}
    own = variant_of(spec).new_tensors(site, spec.adapter, dense(base), lora_A, lora_B, spec.scale_for(site.key),
                                       tuple(initial[2:]) if initial is not None else ())
    tensors.update({name: nn.Parameter(value.to(**factory, copy=True)) for name, value in own.items()})
    return tensors


def fuse_siblings(gm: fx.GraphModule, share_dropout: bool = False) -> PassResult:
    """Turn on sibling fusion for `gm` (see `lora_fx.passes.fuse_siblings`): its branches, and those of adapters
    applied later, share one projection per input. `share_dropout=True` fuses siblings with dropout too, behind one
    dropout mask per input: a different regulariser from PEFT's independent masks, opted into here (False turns it
    off again). `modified` says whether the graph changed."""
    state = state_of(gm)
    if not isinstance(share_dropout, bool):
        raise TypeError(f"share_dropout must be True or False, got {share_dropout!r}")
    refuse_if_sharded(gm, "fuse_siblings", "fuse siblings before sharding")
    siblings = "fused_sharing_dropout" if share_dropout else "fused"
    if siblings == state.siblings:
        return PassResult(gm, modified=False)
    code = gm.code
    commit(gm, Change(state.evolve(siblings=siblings)))
    return PassResult(gm, modified=gm.code != code)


def checkpoint(gm: fx.GraphModule, policy: str = "selective") -> fx.GraphModule:
    """Activation checkpointing per block (see `lora_fx.passes.checkpoint_blocks`): "full" recomputes each block in
    the backward, "selective" keeps its matmul outputs and recomputes the rest, "none" turns it off. Outputs and
    gradients are unchanged; returns `gm`, changed in place."""
    _check_option("checkpoint policy", policy, POLICIES, "policies")
    refuse_if_sharded(gm, "checkpoint", "turn on checkpointing before sharding")
    if policy != "none" and not gm.blocks():
        raise AdapterError("checkpoint works per block, and this graph is flat (captured with blocks=False, or its "
                           "blocks could not be cut: see the capture warning)")
    return _set_option(gm, checkpoint=policy)


def dropout_masks(gm: fx.GraphModule, masks: str) -> fx.GraphModule:
    """Where the LoRA dropout masks of `gm`'s training graphs come from (see `lora_fx.passes.lean_dropout`):
    "counter" (the default) draws them from a counter-based stream, regenerated in the backward instead of kept;
    "peft" draws exactly what `nn.Dropout` draws, so from the same seed the masks are PEFT's (parity checks). Both have
    the distribution of `nn.Dropout`. Returns `gm`, changed in place."""
    _check_option("dropout masks", masks, DROPOUT_MASKS, "values")
    refuse_if_sharded(gm, "dropout_masks", "choose the dropout masks before sharding")
    return _set_option(gm, dropout_masks=masks)


def _check_option(what: str, value, valid, plural: str) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}: valid {plural} are {', '.join(map(repr, valid))}")


def _set_option(gm: fx.GraphModule, **option) -> fx.GraphModule:
    """Commit one option of the graph state (the graphs are built again) unless it already has that value."""
    state = state_of(gm)
    (name, value), = option.items()
    if getattr(state, name) != value:
        commit(gm, Change(state.evolve(**option)))
    return gm
