"""What lora_fx records on a graph module, and the names of the state it registers.

`gm.meta["lora_fx"]` holds a :class:`GraphState`: how the graph was captured, which adapters exist (in the order
they were applied, with the sites each adapts), which are active, and the options that turn optional graph passes
on (sibling fusion, routing rows by adapter, an exporter's rewrites; see `lora_fx.build.PIPELINE`). It is
immutable: every change builds a new state and commits it with the graphs derived from it (see `lora_fx.commit`),
so the graphs are always a function of the plain capture and this state.

LoRA state is registered under the adapted module's FQN with PEFT's names (each site kind names its factors, see
`lora_fx.sites`), so `gm.state_dict()` holds ``<fqn>.lora_A.<adapter>.weight`` / ``<fqn>.lora_B.<adapter>.weight``
exactly as PEFT does (minus its ``base_model.model.`` prefix). The per-site scale is a non-persistent 0-d buffer
``<fqn>.lora_scaling.<adapter>``:
the adapter's scale while it is active and enabled, 0 otherwise — a tensor, so switching adapters never
recompiles under torch.compile, and absent from the state dict. A DoRA adapter also has its magnitude vector
``<fqn>.lora_magnitude_vector.<adapter>.weight`` (PEFT's name; see `lora_fx.sites.dora`).

`quantized` names the base weights held quantized (see `lora_fx.quantize`): each is read through an explicit
dequantize step that `lora_fx.build` adds to every graph it builds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Mapping

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from lora_fx.errors import AdapterError
from lora_fx.sites.base import LORA_CONTAINERS, Site
from lora_fx.spec import LoraSpec

META_KEY = "lora_fx"
BUILDING_KEY = "lora_fx_building"


@dataclass(frozen=True)
class GraphState:
    """How a graph was captured and which adapters it carries. Never mutated: see `evolve`."""

    tracer: str                                  # "export" or "fx"
    model_class: tuple[str, str] = ("", "")      # (class name, module) of the captured model
    output_layers: tuple[str, ...] = ()          # FQNs that "all-linear" skips (the model's output embedding)
    module_kinds: Mapping[str, str] = field(default_factory=dict)        # FQN -> "linear", "conv1d_hf", ...
    block_paths: tuple[str, ...] = ()            # the model's repeated blocks (ModuleList entries), kept as modules
    dynamic: bool = True                         # whether every tensor dim was captured dynamic
    strict_shapes: bool = False                  # a call outside the captured shapes: CallError, not a new variant
    example_args: tuple = ()
    example_kwargs: Mapping = field(default_factory=dict)
    specs: Mapping[str, LoraSpec] = field(default_factory=dict)          # adapter -> spec, in applied order
    sites: Mapping[str, tuple[str, ...]] = field(default_factory=dict)   # adapter -> keys of its sites
    site_info: Mapping[str, Site] = field(default_factory=dict)          # site key -> the site (without reads)
    active: tuple[str, ...] = ()
    enabled: bool = True
    siblings: str = "separate"                   # sibling branches: "separate" | "fused" | "fused_sharing_dropout"
    routed: bool = False                         # rows routed to adapters by `adapter_ids`: lora_fx.mixed_batch
    export_passes: tuple[Callable[[fx.GraphModule], PassResult], ...] = ()   # an exporter's rewrites (exporters/)
    checkpoint: str = "none"                     # activation checkpointing per block (passes/checkpoint_blocks.py)
    dropout_masks: str = "counter"               # where training graphs' LoRA dropout masks come from (lean_dropout)
    quantized: Mapping[str, str] = field(default_factory=dict)           # base weight name -> format ("nf4", ...)

    def evolve(self, **changes) -> "GraphState":
        """A copy with `changes`; mappings and sequences are copied, so the two states share nothing mutable."""
        changes = {key: (dict(value) if isinstance(value, Mapping) else tuple(value) if isinstance(value, list)
                         else value) for key, value in changes.items()}
        return dataclasses.replace(self, **changes)

    def with_adapter(self, spec: LoraSpec, sites, *, activate: bool) -> "GraphState":
        """Add `spec` at `sites` (their reads are not kept)."""
        info = {site.key: dataclasses.replace(site, reads=()) for site in sites}
        return self.evolve(specs={**self.specs, spec.adapter: spec},
                           sites={**self.sites, spec.adapter: tuple(info)}, site_info={**self.site_info, **info},
                           active=self.active + ((spec.adapter,) if activate else ()))

    def without_adapter(self, name: str) -> "GraphState":
        sites = {k: v for k, v in self.sites.items() if k != name}
        kept = {key for keys in sites.values() for key in keys}
        return self.evolve(specs={k: v for k, v in self.specs.items() if k != name}, sites=sites,
                           site_info={k: v for k, v in self.site_info.items() if k in kept},
                           active=tuple(a for a in self.active if a != name))

    def adapted_sites(self) -> list[Site]:
        """Every site some adapter adapts, in first-applied order."""
        return [self.site_info[key] for key in dict.fromkeys(key for keys in self.sites.values() for key in keys)]

    def scale_value(self, adapter: str, key: str) -> float:
        """What the scale buffer of (`adapter`, site `key`) holds: the spec's scale when it contributes, else 0."""
        on = self.enabled and adapter in self.active
        return self.specs[adapter].scale_for(key) if on else 0.0


@dataclass(frozen=True)
class Building:
    """What the passes building one graph may read besides the graph (`building_of(gm)`): the state being built,
    whether the graph trains (dropout on), and how errors name its mode."""

    state: GraphState
    training: bool
    mode: str


def building_of(gm: fx.GraphModule) -> Building:
    return gm.meta[BUILDING_KEY]


def is_lora_graph(obj) -> bool:
    return isinstance(obj, fx.GraphModule) and isinstance(getattr(obj, "meta", {}).get(META_KEY), GraphState)


def state_of(gm) -> GraphState:
    if not is_lora_graph(gm):
        raise TypeError(f"expected a GraphModule made by lora_fx.capture or lora_fx.apply, got {type(gm).__name__}")
    return gm.meta[META_KEY]


def require_adapters(state: GraphState, names) -> list[str]:
    """`names` (a str or a list of str) as a list, each checked to exist."""
    if isinstance(names, str):
        names = [names]
    elif not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise AdapterError(f"adapter names must be a str or a list of str, got {names!r}; this graph has "
                           f"{list(state.specs)}")
    unknown = [n for n in names if n not in state.specs]
    if unknown:
        raise AdapterError(f"unknown adapter(s) {unknown}; this graph has {list(state.specs)}")
    return list(names)


def is_lora_state_name(name: str) -> bool:
    """Whether a parameter or buffer name belongs to a LoRA branch (structural check; survives re-export)."""
    return any(part in LORA_CONTAINERS for part in name.split("."))


def tag_of(node: fx.Node) -> dict:
    return node.meta.get(META_KEY, {})


def inherit_meta(new: fx.Node, source: fx.Node) -> None:
    """Give a node a pass inserts the module stack and stack trace of the node it stands in for."""
    new.meta.update({key: source.meta[key] for key in ("nn_module_stack", "stack_trace") if key in source.meta})
