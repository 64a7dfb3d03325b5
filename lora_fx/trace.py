"""Tracing: one mode of a model as a plain fx graph (no LoRA), whose `get_attr` targets are the model's FQNs.

With example inputs the model is captured by `torch.export` (non-strict, training IR: `aten.linear` is kept), every
tensor dim dynamic by default. Without, it is traced with `torch.fx` through every submodule (linear layers appear
as `F.linear` calls on `get_attr` weights).

What is traced is the *template*: a copy of the user's module structure whose tensors are the graph module's own
(see `lora_fx.capture`), put into the mode asked for. The user's model is never touched, not even its mode flags.
Everything the graph reads that is not one of the model's parameters or buffers (tensor constants, export's input
guards) comes back as an *artifact* to be registered on the graph module.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from lora_fx.build import copy_graph
from lora_fx.errors import CaptureError
from lora_fx.ops import opaque_fused_calls
from lora_fx.passes.inline_grad_regions import inline_grad_regions

_HINTS = (
    ("DynamicCache", "transformers models return a cache object torch.export cannot flatten: pass "
                     "example_kwargs={'use_cache': False}."),
    ("Constraints violated", "an input dim cannot be dynamic for this model: pass dynamic=False, or example "
                             "inputs whose dims are all >= 2."),
    ("got an unexpected keyword", "example_kwargs must match the model's forward() signature."),
)


_TRACING = threading.RLock()


@dataclass
class Traced:
    graph: fx.Graph                 # the plain graph, owned by no module
    artifacts: dict[str, Any]       # get_attr / call_module targets that are not the model's tensors -> value


def has_tensor(value: Any) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))


def dynamic_shapes_for(args: tuple, kwargs: dict) -> tuple:
    """Every dim of every tensor input dynamic (`Dim.AUTO`), in torch.export's `dynamic_shapes` layout."""
    every_dim = lambda x: {i: Dim.AUTO for i in range(x.dim())} if isinstance(x, torch.Tensor) else None
    return tuple(pytree.tree_map(every_dim, value) for value in (*args, *kwargs.values()))


def trace(template: nn.Module, tracer: str, args: tuple, kwargs: dict, dynamic: bool) -> Traced:
    """`template` as a plain graph, in whatever mode its flags are in. Tracing holds a process-wide lock:
    torch.export keeps global tracing state, so two threads capturing at once take turns."""
    with _TRACING:
        traced = _export(template, args, kwargs, dynamic) if tracer == "export" else _trace_fx(template)
    own = {name for name, _ in template.named_parameters(remove_duplicate=False)}
    own |= {name for name, _ in template.named_buffers(remove_duplicate=False)}
    artifacts = {}
    for node in traced.graph.nodes:
        if node.op in ("get_attr", "call_module") and node.target not in own:
            artifacts[node.target] = _attribute(traced, node.target)
    return Traced(copy_graph(traced.graph), artifacts)     # the copy is owned by no module


def _attribute(root: nn.Module, target: str):
    value = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool) -> fx.GraphModule:
    dynamic_shapes = dynamic_shapes_for(args, kwargs) if dynamic else None
    try:
        with opaque_fused_calls():
            program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as err:  # torch.export raises many types; re-raise one with the model named
        raise CaptureError(_capture_message(model, err)) from None
    exported = program.module()
    inline_grad_regions(exported)
    return exported


def _capture_message(model: nn.Module, err: Exception) -> str:
    text = str(err).strip()
    first_lines = "\n".join(text.splitlines()[:3])
    hints = [hint for needle, hint in _HINTS if needle in text] or [
        "check that example inputs run through model(*example_args, **example_kwargs) eagerly."]
    return (f"torch.export could not capture {type(model).__name__} ({type(err).__name__}): {first_lines}\n"
            f"hint: {' '.join(hints)}")


class _TraceThroughModules(fx.Tracer):
    """Traces into every submodule: linears become `F.linear(x, weight)` calls on `get_attr` weights, and no
    module object ends up inside the graph."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return False


def _trace_fx(model: nn.Module) -> fx.GraphModule:
    try:
        graph = _TraceThroughModules().trace(model)
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise CaptureError(
            f"{type(model).__name__} cannot be traced with torch.fx.symbolic_trace ({type(err).__name__}: "
            f"{first_line}); pass example inputs so torch.export captures it: "
            f"lora_fx.apply(model, spec, example_args=(...,))") from None
    return fx.GraphModule(model, graph, class_name=type(model).__name__)
