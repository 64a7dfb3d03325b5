"""How a graph of the cache runs as a module's forward.

- `GraphView`: a graph its owner does not show as its own forward (a decoding program, a shape variant), run on
  the owner's tensors;
- `LoraBlock`: one of the model's repeated blocks (a decoder layer) running its part of the owner's graph;
- `show`: make a module run a graph, recompiling it once and restoring that code when it is shown again;
- `wrap_generated`: the generated forward as lora_fx runs it — shape checks and the calling convention
  (`lora_fx.calling`).
"""

from __future__ import annotations

import copy

from torch import fx, nn

from lora_fx.calling import ShapeMismatch, calling_convention, guarded
from lora_fx.graph_cache import CachedGraph, GraphKey
from lora_fx.state import META_KEY, GraphState
from lora_fx.shape_warnings import fixed_dims

_COMPILED_ATTRIBUTES = ("_code", "_lineno_map", "_prologue_start", "_in_spec", "_out_spec")
_MODULE_ATTRIBUTES = tuple(nn.Module().__dict__)         # what a plain container of the module tree holds


class GraphView(fx.GraphModule):
    """A graph of the cache that its owner does not show as its own forward (a decoding program, a shape variant).
    It runs on the owner's tensors and submodules — the same dicts, so what the owner registers later is seen — and
    is never copied or pickled: the owner makes it again when asked."""

    @classmethod
    def over(cls, owner: fx.GraphModule, key: GraphKey) -> "GraphView":
        view = cls(nn.Module(), fx.Graph(), class_name=f"{type(owner).__name__}_{key.program.name}")
        view.__dict__.update(_modules=owner._modules, _parameters=owner._parameters, _buffers=owner._buffers,
                             _lora_fx_owner=owner, _lora_fx_key=key)
        view.meta[META_KEY] = owner.meta[META_KEY]
        view.show(owner._lora_fx_graphs[key])
        return view

    def show(self, entry: CachedGraph) -> None:
        owner = self.__dict__["_lora_fx_owner"]
        self.meta[META_KEY] = owner.meta[META_KEY]
        self.__dict__.update({name: owner.__dict__[name] for name in owner._lora_fx_artifacts
                              if name in owner.__dict__})
        self._graph = entry.graph
        entry.graph.owning_module = self
        entry.compiled = show_graph(self, entry.compiled)

    def recompile(self):
        python_code = super().recompile()
        if "_lora_fx_owner" in self.__dict__:
            wrap_generated(type(self), self._graph, self.meta[META_KEY], self._lora_fx_key)
        return python_code

    def lora_fx_shape_variant(self, key: GraphKey, mismatch: ShapeMismatch, args: tuple, kwargs: dict):
        return self._lora_fx_owner.lora_fx_shape_variant(key, mismatch, args, kwargs)

    def __deepcopy__(self, memo):
        raise TypeError("a GraphView runs on its owner's tensors and is not copied: copy the owner")

    def __reduce__(self):
        raise TypeError("a GraphView runs on its owner's tensors and is not pickled: save the owner")


class LoraBlock(fx.GraphModule):
    """A repeated block of the model (a decoder layer) that runs as its own module: its forward runs the block's part
    of the graph (see `lora_fx.passes.split_blocks`), and it holds the block's tensors — LoRA factors included —
    under the model's own names, so `fully_shard`, checkpointing and `torch.compile` can take it per block.
    Copied or pickled, it is a plain container again: its graph module rebuilds the structure."""

    @classmethod
    def adopt(cls, container: nn.Module, class_name: str) -> "LoraBlock":
        """A block sharing `container`'s parameters, buffers, submodules and hooks (the same dicts)."""
        block = cls(nn.Module(), fx.Graph(), class_name=class_name)
        block.__dict__.update({name: container.__dict__[name] for name in _MODULE_ATTRIBUTES})
        return block

    def show(self, graph: fx.Graph, compiled: dict) -> None:
        """Run `graph`; `compiled` caches what recompiling it sets (filled on first use)."""
        self._graph = graph
        graph.owning_module = self
        compiled.update(show_graph(self, compiled or None))

    def _as_container(self) -> nn.Module:
        container = nn.Module()
        container.__dict__.update({name: self.__dict__[name] for name in _MODULE_ATTRIBUTES})
        return container

    def __deepcopy__(self, memo):
        copied = copy.deepcopy(self._as_container(), memo)
        memo[id(self)] = copied
        return copied

    def __reduce__(self):
        return self._as_container().__reduce__()


def show_graph(module: fx.GraphModule, compiled: dict | None) -> dict:
    """Make `module` run its `_graph`: recompile it the first time, else restore what recompiling set (`compiled`,
    as returned the first time)."""
    cls = type(module)
    if compiled is None:
        module.recompile()
        compiled = {name: module.__dict__.get(name) for name in _COMPILED_ATTRIBUTES}
        compiled.update(forward=cls.forward, lora_fx_run=getattr(cls, "lora_fx_run", None))
    else:
        module.__dict__.update({name: compiled[name] for name in _COMPILED_ATTRIBUTES})
        cls.forward, cls.lora_fx_run = compiled["forward"], compiled["lora_fx_run"]
    return compiled


def wrap_generated(cls: type, graph: fx.Graph, state: GraphState, key: GraphKey) -> None:
    """The generated forward of `cls` as lora_fx runs it: `lora_fx_run` checks the graph's shapes (see
    `lora_fx.calling`), `forward` adds the calling convention and hands other shapes to the owner's variants."""
    why = ("captured with dynamic=False" if not state.dynamic
           else "torch.export specialized it (see the capture warning)")
    cls.lora_fx_run = guarded(cls.forward, fixed_dims(graph), why)
    cls.forward = calling_convention(cls.lora_fx_run, key.program.constants(state),
                                     lambda module, mismatch, args, kwargs:
                                     module.lora_fx_shape_variant(key, mismatch, args, kwargs))
