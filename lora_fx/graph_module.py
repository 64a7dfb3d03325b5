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

import threading
import warnings
from typing import Any

import torch
from torch import fx, nn

from lora_fx.build import build, structure
from lora_fx.calling import ShapeMismatch
from lora_fx.commit import Journal, check_targets, transaction
from lora_fx.distributed import refuse_if_sharded
from lora_fx.errors import CallError, CaptureWarning
from lora_fx.graph_cache import AS_CAPTURED, CachedGraph, GraphKey
from lora_fx.graph_views import GraphView, LoraBlock, show_graph, wrap_generated
from lora_fx.model_like import ModelLike
from lora_fx.module_tree import bind_tensors, follow, placement, put, release_tensors, restore_tensor_refs, tensor_refs
from lora_fx.persistence import deep_copy, pickled, unshare_changed_base_weights
from lora_fx.state import META_KEY, GraphState
from lora_fx.shape_warnings import first_caller_outside_lora_fx


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
                journal.set_item(self._modules if isinstance(value, nn.Module) else self.__dict__, name, value)
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
        entry.compiled = show_graph(self, entry.compiled)
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
            wrap_generated(type(self), self._graph, self.meta[META_KEY], self._lora_fx_key)
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
        unshare_changed_base_weights(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def __deepcopy__(self, memo):
        return deep_copy(self, LoraGraphModule, memo)

    def __reduce__(self):
        """Pickled: the module tree and attributes without capture artifacts, the template, the state and the
        mode. Unpickling captures the current mode again (graphs are not a stable file format; code is)."""
        return pickled(self, LoraGraphModule)
