"""`LoraGraphModule`: what `capture` and `apply` return — a graph that behaves like the module it replaces.

It is an `fx.GraphModule` whose module tree holds the model's tensors under the model's own names (base weights
frozen, sharing the user's storage; buffers its own copies, since a forward may update them) and the LoRA state.
Beside it live:

- the *template*: a copy of the user's module structure whose tensors are this module's own, so any mode, program,
  shape, dtype or device can be captured again without touching the user's model (not even its mode flags);
- the *graph cache*: one entry per `GraphKey` (mode, program, shape variant), each a plain capture and the graph
  built from it and the state, `build(plain, state)`, rebuilt by `lora_fx.commit` whenever the state changes.
  Entries are captured lazily, on first use: `train()`/`eval()` switch to the graph torch.export (or torch.fx)
  records with the model in that mode, so every mode-dependent op (dropout in all its forms, SDPA's `dropout_p`,
  batch norm, code paths that branch on `self.training`) is the model's own, never a guess; the decoding programs
  (`lora_fx.generation`) are captured when `generate` first needs them; a call outside the shapes a graph runs
  captures a *shape variant* for them (see `lora_fx.calling`). A model whose submodules were in mixed modes at
  capture keeps that graph until `train()`/`eval()` is called.

The module itself runs the current mode's forward graph (cut into the model's blocks, see `lora_fx.blocks`); every
other entry runs as a `GraphView` over the same tensors. `.to()`/`.half()`/`.cuda()` that change a dtype or device
capture the current graph again in its new dtype/device (graphs bake both into casts and asserts; other entries are
captured again when used); `copy.deepcopy` gives an independent copy; `torch.save` stores the tensors, the template
and the state, and `torch.load` captures again.
"""

from __future__ import annotations

import copy
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from lora_fx.build import build, copy_graph, structure
from lora_fx.calling import ShapeMismatch, calling_convention, guarded
from lora_fx.commit import Journal, check_targets, transaction
from lora_fx.distributed import refuse_if_sharded
from lora_fx.errors import CallError, CaptureWarning
from lora_fx.model_like import ModelLike
from lora_fx.module_tree import (bind_tensors, follow, placement, put, release_tensors, restore_tensor_refs,
                                 tensor_refs)
from lora_fx.programs import FORWARD, Program
from lora_fx.quantize import is_quantized
from lora_fx.state import META_KEY, GraphState, is_lora_state_name
from lora_fx.trace import first_caller_outside_lora_fx, fixed_dims

AS_CAPTURED = "as captured"         # the mode of a model captured with submodules in mixed modes
_OWN = ("_lora_fx_template", "_lora_fx_graphs", "_lora_fx_views", "_lora_fx_key", "_lora_fx_flags",
        "_lora_fx_artifacts", "_lora_fx_lock")
_COMPILED_ATTRIBUTES = ("_code", "_lineno_map", "_prologue_start", "_in_spec", "_out_spec")
_MODULE_ATTRIBUTES = tuple(nn.Module().__dict__)         # what a plain container of the module tree holds


@dataclass(frozen=True)
class GraphKey:
    """Which graph of a model: the mode it runs in (True: training, False: eval, or AS_CAPTURED), the program it
    computes (see `lora_fx.programs`), and its shape variant (0: the example's shapes; n: the n-th shape region a
    call needed since)."""

    mode: bool | str
    program: Program = FORWARD
    variant: int = 0

    @property
    def shown_by_owner(self) -> bool:
        """Whether the graph runs as the module's own forward, cut into the model's blocks (the module's block
        submodules run it); any other graph runs flat in a `GraphView`."""
        return self.program.blocks and self.variant == 0

    def describe(self) -> str:
        mode = {True: "training", False: "eval"}.get(self.mode, AS_CAPTURED)
        program = "" if self.program == FORWARD else f" {self.program.name}"
        return mode + program + (f" (shape variant {self.variant})" if self.variant else "")


@dataclass
class CachedGraph:
    plain: fx.Graph                 # as captured, no LoRA
    graph: fx.Graph                 # built from `plain` and the state: the root graph
    blocks: dict = field(default_factory=dict)      # block path -> the block's graph (empty: the graph is flat)
    compiled: dict | None = None    # what `recompile()` set for `graph` where it was shown, restored when shown again
    compiled_blocks: dict = field(default_factory=dict)    # block path -> the same, for the block's graph


def mode_name(key) -> str:
    """How errors name a mode (a GraphKey, or a bare mode)."""
    return key.describe() if isinstance(key, GraphKey) else GraphKey(key).describe()


class LoraGraphModule(ModelLike, fx.GraphModule):
    """A captured model, with or without LoRA adapters. See the module docstring."""

    @classmethod
    def create(cls, template: nn.Module, state: GraphState, class_name: str) -> "LoraGraphModule":
        """A graph module over `template`'s tensors, captured in the template's current mode."""
        gm = cls(nn.Module(), fx.Graph(), class_name=class_name)
        for path, module in template.named_modules(remove_duplicate=False):
            prefix = f"{path}." if path else ""
            for name, param in module._parameters.items():
                if param is not None:
                    put(gm, prefix + name, param, persistent=True)
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    put(gm, prefix + name, buffer, persistent=name not in module._non_persistent_buffers_set)
        flags = {path: module.training for path, module in template.named_modules(remove_duplicate=False)}
        mode = flags[""] if len(set(flags.values())) == 1 else AS_CAPTURED
        gm._setup(template, state, flags, GraphKey(mode), artifacts=set())
        gm.training = flags[""]
        gm._capture([gm._lora_fx_key])
        return gm

    def _setup(self, template, state, flags, key, artifacts) -> None:
        self.__dict__.update(_lora_fx_template=template, _lora_fx_graphs={}, _lora_fx_views={}, _lora_fx_key=key,
                             _lora_fx_flags=flags, _lora_fx_artifacts=artifacts, _lora_fx_lock=threading.RLock())
        self.meta[META_KEY] = state

    # ---- modes ---------------------------------------------------------------------------------------------------

    def plain_graph(self) -> fx.Graph:
        """The current mode's plain capture (no LoRA): what matching reads."""
        return self._lora_fx_graphs[self._lora_fx_key].plain

    def train(self, mode: bool = True) -> "LoraGraphModule":
        """Switch to the graph of `mode`, capturing it the first time. On failure the mode stays as it was."""
        if not isinstance(mode, bool):
            raise ValueError(f"training mode must be a bool, got {mode!r}")
        if "_lora_fx_graphs" in self.__dict__ and self._lora_fx_key.mode != mode:
            key = GraphKey(mode)
            if key not in self._lora_fx_graphs:
                self._capture([key])
            self._activate(key)
        return super().train(mode)

    def _training_of(self, mode) -> bool:
        return mode if isinstance(mode, bool) else self._lora_fx_flags[""]

    def graph_view(self, key: GraphKey) -> "GraphView":
        """The module that runs the graph of `key` (a decoding program, a shape variant) on this module's tensors,
        capturing and building it the first time."""
        if key not in self._lora_fx_graphs:
            self._capture([key])
        view = self._lora_fx_views.get(key)
        if view is None:
            view = self._lora_fx_views[key] = GraphView.over(self, key)
        return view

    def _capture(self, keys: list[GraphKey], state: GraphState | None = None, replace: bool = False,
                 examples: dict | None = None) -> None:
        """Capture and build `keys` (on `examples[key]` = (args, kwargs) where given, else their program's
        examples), whole or not at all. `replace` drops every other entry first (a new dtype or device)."""
        state = self.meta[META_KEY] if state is None else state
        with transaction(self) as journal:
            if replace:
                for name in sorted(self._lora_fx_artifacts):
                    journal.pop_item(self.__dict__ if name in self.__dict__ else self._modules, name)
                self.__dict__.update(_lora_fx_artifacts=set(), _lora_fx_graphs={}, _lora_fx_views={})
            captured = {}
            for key in keys:
                args, kwargs = (examples or {}).get(key) or key.program.examples(self, state)
                traced = self._trace(key, state, args, kwargs)
                plain = self._adopt_artifacts(traced.graph, traced.artifacts, journal)
                captured[key] = CachedGraph(plain, *self._build(plain, state, key))
                check_targets(self, captured[key].graph, captured[key].blocks)
            self.__dict__["_lora_fx_graphs"] = {**self._lora_fx_graphs, **captured}
            self.meta[META_KEY] = state
            self._activate(self._lora_fx_key)

    def _trace(self, key: GraphKey, state: GraphState, args: tuple, kwargs: dict):
        refuse_if_sharded(self, f"capturing the {key.describe()} graph (or a new dtype or device)",
                          "lora_fx.shard captures both modes first; change dtype or device, and generate, before "
                          "sharding")
        with self._lora_fx_lock:
            template = self._lora_fx_template
            bind_tensors(template, self)
            for path, module in template.named_modules(remove_duplicate=False):
                module.training = (key.mode if isinstance(key.mode, bool)
                                   else self._lora_fx_flags.get(path, module.training))
            try:
                return key.program.trace(template, state, args, kwargs)
            finally:
                release_tensors(template)

    def _adopt_artifacts(self, graph: fx.Graph, artifacts: dict[str, Any], journal: Journal) -> fx.Graph:
        """Register what the graph reads besides the model's tensors (constants, input guards) under root-level
        names of their own, and point the graph at them."""
        names = {}
        for target, value in artifacts.items():
            name = base = target.replace(".", "_")
            index = 0
            while hasattr(self, name) and getattr(self, name) is not value:
                index += 1
                name = f"{base}_{index}"
            if not hasattr(self, name):
                if isinstance(value, nn.Module):
                    journal.set_item(self._modules, name, value)
                else:
                    journal.set_item(self.__dict__, name, value)
                journal.set_add(self._lora_fx_artifacts, name)
            names[target] = name
        for node in graph.nodes:
            if node.op in ("get_attr", "call_module") and node.target in names:
                node.target = names[node.target]
        return graph

    # ---- shape variants ------------------------------------------------------------------------------------------

    def lora_fx_shape_variant(self, key: GraphKey, mismatch: ShapeMismatch, args: tuple, kwargs: dict):
        """Run the inputs that left the graph of `key` (see `lora_fx.calling`) on the first variant of its mode and
        program whose shapes they fit, capturing a new variant on them when none does."""
        if self.meta[META_KEY].strict_shapes:
            raise CallError(f"{mismatch.reason}. This graph was captured with strict_shapes=True; call with sizes "
                            f"that pass, or capture without strict_shapes to get a graph per shape region")
        family = sorted((other for other in self._lora_fx_graphs
                         if (other.mode, other.program) == (key.mode, key.program) and other != key),
                        key=lambda other: other.variant)
        for other in family:
            runner = self._runner(other)
            try:
                return type(runner).lora_fx_run(runner, *args, **kwargs)
            except ShapeMismatch:
                continue
        new = GraphKey(key.mode, key.program, 1 + max(other.variant for other in [key, *family]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CaptureWarning)     # the variant's own limits: handled the same way
            self._capture([new], examples={new: (args, kwargs)})
        warnings.warn(CaptureWarning(
            f"{mismatch.reason}; lora_fx captured the {new.describe()} graph for these shapes, once (as "
            f"torch.compile recompiles), with the same adapters and parameters. Capture with strict_shapes=True to "
            f"make such a call an error instead"), stacklevel=first_caller_outside_lora_fx())
        runner = self._runner(new)
        try:
            return type(runner).lora_fx_run(runner, *args, **kwargs)
        except ShapeMismatch as again:
            raise CallError(f"{mismatch.reason}; a graph captured on these very inputs does not run them either "
                            f"({again.reason})") from None

    def _runner(self, key: GraphKey) -> fx.GraphModule:
        return self if key == self._lora_fx_key else self.graph_view(key)

    # ---- commit protocol (see lora_fx.commit) --------------------------------------------------------------------

    def lora_fx_snapshot(self):
        """A function that puts state, graphs and the shown graph back as they are now."""
        state, graphs, views, key = (self.meta[META_KEY], dict(self._lora_fx_graphs), dict(self._lora_fx_views),
                                     self._lora_fx_key)
        artifacts = set(self._lora_fx_artifacts)
        training = self.training

        def restore():
            self.meta[META_KEY] = state
            self.__dict__.update(_lora_fx_graphs=graphs, _lora_fx_views=views, _lora_fx_key=key,
                                 _lora_fx_artifacts=artifacts)
            self.training = training
            if key in graphs:
                self._activate(key)
        return restore

    def graphs(self) -> dict[str, fx.Graph]:
        """The current mode's graphs: the root's ("") and each block's, by path."""
        entry = self._lora_fx_graphs[self._lora_fx_key]
        return {"": entry.graph, **entry.blocks}

    def blocks(self) -> list["LoraBlock"]:
        """The model's repeated blocks that run as their own modules, in order (empty when the graph is flat)."""
        return [self.get_submodule(path) for path in self._lora_fx_graphs[self._lora_fx_key].blocks]

    def _build(self, plain: fx.Graph, state: GraphState, key: GraphKey) -> tuple[fx.Graph, dict]:
        graph = build(self, plain, state, self._training_of(key.mode), key.describe())
        return structure(graph, state, key.describe()) if key.shown_by_owner else (graph, {})

    def lora_fx_build_all(self, state: GraphState) -> dict:
        """Every cached graph for `state`: {key: (root graph, {block path: graph})}."""
        return {key: self._build(entry.plain, state, key) for key, entry in self._lora_fx_graphs.items()}

    def lora_fx_install(self, state: GraphState, graphs: dict | None) -> None:
        """Make `state` (and, unless None, `graphs`, as `lora_fx_build_all` returns them) current."""
        self.meta[META_KEY] = state
        if graphs is not None:
            self.__dict__["_lora_fx_graphs"] = {key: CachedGraph(entry.plain, *graphs[key])
                                                for key, entry in self._lora_fx_graphs.items()}
        self._activate(self._lora_fx_key)

    def _activate(self, key: GraphKey) -> None:
        """Show `key`'s graph (and its blocks' graphs) as this module's forward, and every view's graph in it."""
        entry = self._lora_fx_graphs[key]
        self.__dict__["_lora_fx_key"] = key
        self._graph = entry.graph
        entry.graph.owning_module = self
        entry.compiled = _show(self, entry.compiled)
        for path, graph in entry.blocks.items():
            self._block(path).show(graph, entry.compiled_blocks.setdefault(path, {}))
        for view_key, view in self._lora_fx_views.items():
            view.show(self._lora_fx_graphs[view_key])

    def _block(self, path: str) -> "LoraBlock":
        """The module at `path` as a LoraBlock (a container of the tree becomes one, keeping its tensors)."""
        parent_path, _, name = path.rpartition(".")
        parent = self.get_submodule(parent_path)
        module = parent._modules[name]
        if not isinstance(module, LoraBlock):
            class_name = type(self._lora_fx_template.get_submodule(path)).__name__
            module = parent._modules[name] = LoraBlock.adopt(module, class_name)
        return module

    def recompile(self):
        python_code = super().recompile()
        if isinstance(getattr(self, "meta", {}).get(META_KEY), GraphState) and "_lora_fx_key" in self.__dict__:
            _wrap_generated(type(self), self._graph, self.meta[META_KEY], self._lora_fx_key)
        return python_code

    # ---- generation ----------------------------------------------------------------------------------------------

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Decode from `input_ids` with a KV cache, as transformers' `generate` does (its names, meanings and
        results); see `lora_fx.generation.generate`."""
        from lora_fx.generation import generate
        return generate(self, input_ids, attention_mask, **kwargs)

    # ---- tensors: moves, copies, saving --------------------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        if "_lora_fx_graphs" not in self.__dict__:
            return super()._apply(fn, recurse)
        before, saved = placement(self), tensor_refs(self)
        result = super()._apply(fn, recurse)
        if placement(self) != before:
            try:
                state = self.meta[META_KEY]
                moved = state.evolve(example_args=follow(self, state.example_args),
                                     example_kwargs=follow(self, dict(state.example_kwargs)))
                self._capture([GraphKey(self._lora_fx_key.mode)], moved, replace=True)
            except BaseException:
                restore_tensor_refs(saved)
                raise
        return result

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """`nn.Module.load_state_dict`, except that a base weight is never written in place: one that would change
        first gets storage of its own, so the user's model (which shares it) is never written."""
        for name, value in state_dict.items():
            if is_lora_state_name(name) or not isinstance(value, torch.Tensor):
                continue
            try:
                param = self.get_parameter(name)
            except AttributeError:
                continue
            if is_quantized(param):         # quantized weights are this module's own, never the user's
                continue
            if value.shape == param.shape and not torch.equal(value.to(param.device, param.dtype), param):
                param.data = param.data.clone()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def __deepcopy__(self, memo):
        copied = LoraGraphModule(nn.Module(), fx.Graph(), class_name=type(self).__name__)
        memo[id(self)] = copied
        skip = {"_graph", "_code", "_in_spec", "_out_spec", "_lineno_map", "_prologue_start", *_OWN}
        for name, value in self.__dict__.items():
            if name not in skip:
                copied.__dict__[name] = copy.deepcopy(value, memo)
        copied._setup(copy.deepcopy(self._lora_fx_template, memo), copied.meta[META_KEY],
                      dict(self._lora_fx_flags), self._lora_fx_key, set(self._lora_fx_artifacts))
        copied.__dict__["_lora_fx_graphs"] = {
            key: CachedGraph(copy_graph(entry.plain), copy_graph(entry.graph),
                             {path: copy_graph(graph) for path, graph in entry.blocks.items()})
            for key, entry in self._lora_fx_graphs.items()}
        copied._activate(self._lora_fx_key)
        return copied

    def __reduce__(self):
        """Pickled: the module tree and attributes without capture artifacts, the template, the state and the
        mode. Unpickling captures the current mode again (graphs are not a stable file format; code is)."""
        artifacts = self._lora_fx_artifacts
        skip = {"_graph", "_code", "_in_spec", "_out_spec", "_lineno_map", "_prologue_start", "_wrapped_call",
                *_OWN, *artifacts}
        attributes = {name: value for name, value in self.__dict__.items() if name not in skip}
        attributes["_modules"] = {name: m for name, m in self._modules.items() if name not in artifacts}
        own = {"template": self._lora_fx_template, "flags": self._lora_fx_flags, "mode": self._lora_fx_key.mode}
        return _unpickle, (type(self).__name__, attributes, own)


class GraphView(fx.GraphModule):
    """A graph of the cache that its owner does not show as its own forward (a decoding program, a shape variant).
    It runs on the owner's tensors and submodules — the same dicts, so what the owner registers later is seen — and
    is never copied or pickled: the owner makes it again when asked."""

    @classmethod
    def over(cls, owner: LoraGraphModule, key: GraphKey) -> "GraphView":
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
        entry.compiled = _show(self, entry.compiled)

    def recompile(self):
        python_code = super().recompile()
        if "_lora_fx_owner" in self.__dict__:
            _wrap_generated(type(self), self._graph, self.meta[META_KEY], self._lora_fx_key)
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
        compiled.update(_show(self, compiled or None))

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


def _show(module: fx.GraphModule, compiled: dict | None) -> dict:
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


def _wrap_generated(cls: type, graph: fx.Graph, state: GraphState, key: GraphKey) -> None:
    """The generated forward of `cls` as lora_fx runs it: `lora_fx_run` checks the graph's shapes (see
    `lora_fx.calling`), `forward` adds the calling convention and hands other shapes to the owner's variants."""
    why = ("captured with dynamic=False" if not state.dynamic
           else "torch.export specialized it (see the capture warning)")
    cls.lora_fx_run = guarded(cls.forward, fixed_dims(graph), why)
    cls.forward = calling_convention(cls.lora_fx_run, key.program.constants(state),
                                     lambda module, mismatch, args, kwargs:
                                     module.lora_fx_shape_variant(key, mismatch, args, kwargs))


def _unpickle(class_name: str, attributes: dict, own: dict) -> LoraGraphModule:
    gm = LoraGraphModule(nn.Module(), fx.Graph(), class_name=class_name)
    gm.__dict__.update(attributes)
    gm._setup(own["template"], attributes["meta"][META_KEY], own["flags"], GraphKey(own["mode"]), artifacts=set())
    gm._capture([gm._lora_fx_key])
    return gm
