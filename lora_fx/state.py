"""What lora_fx records on a captured graph, and the names of the state it registers.

`gm.meta["lora_fx"]` holds a :class:`GraphState`. It survives `recompile()`, `deepcopy` and re-export (node meta
does not), so it is the source of truth for which adapters exist and which are active.

LoRA state is registered under the adapted module's FQN with PEFT's names, so `gm.state_dict()` holds
``<fqn>.lora_A.<adapter>.weight`` / ``<fqn>.lora_B.<adapter>.weight`` exactly as PEFT does (minus its
``base_model.model.`` prefix). The per-site scale is a non-persistent 0-d buffer ``<fqn>.lora_scaling.<adapter>``:
a tensor, so switching adapters never recompiles under torch.compile, and absent from the state dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from lora_fx.errors import AdapterError
from lora_fx.spec import LoraSpec

META_KEY = "lora_fx"
LORA_A, LORA_B, LORA_SCALING = "lora_A", "lora_B", "lora_scaling"
LORA_CONTAINERS = (LORA_A, LORA_B, LORA_SCALING)


@dataclass
class GraphState:
    """Adapters applied to one graph, in the order they were applied."""

    tracer: str                                  # "export" or "fx"
    model_class: tuple[str, str] = ("", "")      # (class name, module) of the captured model
    output_layers: tuple[str, ...] = ()          # FQNs that "all-linear" skips (the model's output embedding)
    dynamic: bool = True                         # whether every tensor dim was captured dynamic
    example_args: tuple = ()
    example_kwargs: dict = field(default_factory=dict)
    specs: dict[str, LoraSpec] = field(default_factory=dict)        # adapter -> spec
    sites: dict[str, tuple[str, ...]] = field(default_factory=dict)  # adapter -> adapted FQNs
    active: list[str] = field(default_factory=list)
    enabled: bool = True


def is_lora_graph(obj) -> bool:
    return isinstance(obj, fx.GraphModule) and isinstance(getattr(obj, "meta", {}).get(META_KEY), GraphState)


def state_of(gm) -> GraphState:
    if not is_lora_graph(gm):
        raise TypeError(f"expected a GraphModule made by lora_fx.capture or lora_fx.apply, got {type(gm).__name__}")
    return gm.meta[META_KEY]


def require_adapters(state: GraphState, names) -> list[str]:
    """`names` (a str or a list of str) as a list, each checked to exist."""
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in state.specs]
    if unknown:
        raise AdapterError(f"unknown adapter(s) {unknown}; this graph has {list(state.specs)}")
    return names


def factor_name(fqn: str, kind: str, adapter: str) -> str:
    """`<fqn>.lora_A.<adapter>.weight` (kind LORA_A or LORA_B), PEFT's key for the factor."""
    return f"{fqn}.{kind}.{adapter}.weight"


def scaling_name(fqn: str, adapter: str) -> str:
    return f"{fqn}.{LORA_SCALING}.{adapter}"


def is_lora_state_name(name: str) -> bool:
    """Whether a parameter or buffer name belongs to a LoRA branch (structural check; survives re-export)."""
    return any(part in LORA_CONTAINERS for part in name.split("."))


def tag_of(node: fx.Node) -> dict:
    return node.meta.get(META_KEY, {})


def inherit_meta(new: fx.Node, source: fx.Node) -> None:
    """Give a node a pass inserts the module stack and stack trace of the node it stands in for."""
    new.meta.update({key: source.meta[key] for key in ("nn_module_stack", "stack_trace") if key in source.meta})


def submodule(root: torch.nn.Module, path: str, create: bool = False) -> torch.nn.Module:
    """The module at dotted `path`, optionally creating empty containers along the way."""
    module = root
    for part in filter(None, path.split(".")):
        child = module._modules.get(part)
        if child is None:
            if not create:
                raise AttributeError(f"{type(root).__name__} has no submodule {path!r}")
            child = torch.nn.Module()
            module.add_module(part, child)
        module = child
    return module
