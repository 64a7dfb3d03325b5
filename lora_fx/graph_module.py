"""`LoraGraphModule`: what `capture` and `apply` return — a graph that behaves like the module it replaces.

It is an `fx.GraphModule` whose module tree holds the model's tensors under the model's own names (base weights
frozen, sharing the user's storage; buffers its own copies, since a forward may update them) and the LoRA state.
Beside it live:

- the *template*: a copy of the user's module structure whose tensors are this module's own, so any mode, dtype or
  device can be captured again without touching the user's model (not even its mode flags);
- one *plain graph* per mode, captured lazily: `train()`/`eval()` switch to the graph torch.export (or torch.fx)
  records with the model in that mode, so every mode-dependent op (dropout in all its forms, SDPA's `dropout_p`,
  batch norm, code paths that branch on `self.training`) is the model's own, never a guess. A model whose
  submodules were in mixed modes at capture keeps that graph until `train()`/`eval()` is called;
- one *built graph* per mode, `build(plain, state)`, rebuilt by `lora_fx.commit` whenever the state changes.

`.to()`/`.half()`/`.cuda()` that change a dtype or device capture the model again in its new dtype/device (its
graphs bake both into casts and asserts); `copy.deepcopy` gives an independent copy; `torch.save` stores the
tensors, the template and the state, and `torch.load` captures again. Calls are checked against the captured inputs,
and grad mode is restored on every exit path of a forward.
"""

from __future__ import annotations

import copy
import functools
import inspect
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from lora_fx.build import build, copy_graph, structure
from lora_fx.commit import Journal, check_targets
from lora_fx.distributed import refuse_if_sharded
from lora_fx.errors import CallError
from lora_fx.model_like import ModelLike
from lora_fx.quantize import is_quantized, stand_in
from lora_fx.state import META_KEY, GraphState, is_lora_state_name
from lora_fx.trace import fixed_dims, has_tensor, trace

AS_CAPTURED = "as captured"         # the mode key of a model captured with submodules in mixed modes
_OWN = ("_lora_fx_template", "_lora_fx_modes", "_lora_fx_key", "_lora_fx_flags", "_lora_fx_artifacts",
        "_lora_fx_lock")


@dataclass
class ModeGraph:
    plain: fx.Graph                 # as captured in that mode, no LoRA
    graph: fx.Graph                 # built from `plain` and the state: the root graph
    blocks: dict = field(default_factory=dict)      # block path -> the block's graph (empty: the graph is flat)
    compiled: dict | None = None    # what `recompile()` set for `graph`, restored when the mode is switched back to
    compiled_blocks: dict = field(default_factory=dict)    # block path -> the same, for the block's graph


def mode_name(key) -> str:
    return {True: "training", False: "eval"}.get(key, AS_CAPTURED)


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
                    _put(gm, prefix + name, param, persistent=True)
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    _put(gm, prefix + name, buffer, persistent=name not in module._non_persistent_buffers_set)
        flags = {path: module.training for path, module in template.named_modules(remove_duplicate=False)}
        key = flags[""] if len(set(flags.values())) == 1 else AS_CAPTURED
        gm._setup(template, state, flags, key, artifacts=set())
        gm.training = flags[""]
        gm._capture_modes([key])
        return gm

    def _setup(self, template, state, flags, key, artifacts) -> None:
        self.__dict__.update(_lora_fx_template=template, _lora_fx_modes={}, _lora_fx_key=key,
                             _lora_fx_flags=flags, _lora_fx_artifacts=artifacts, _lora_fx_lock=threading.RLock())
        self.meta[META_KEY] = state

    # ---- modes ---------------------------------------------------------------------------------------------------

    def plain_graph(self) -> fx.Graph:
        """The current mode's plain capture (no LoRA): what matching reads."""
        return self._lora_fx_modes[self._lora_fx_key].plain

    def train(self, mode: bool = True) -> "LoraGraphModule":
        """Switch to the graph of `mode`, capturing it the first time. On failure the mode stays as it was."""
        if not isinstance(mode, bool):
            raise ValueError(f"training mode must be a bool, got {mode!r}")
        if "_lora_fx_modes" in self.__dict__ and self._lora_fx_key != mode:
            if mode not in self._lora_fx_modes:
                self._capture_modes([mode])
            self._activate(mode)
        return super().train(mode)

    def _training_of(self, key) -> bool:
        return key if isinstance(key, bool) else self._lora_fx_flags[""]

    def _capture_modes(self, keys: list, state: GraphState | None = None, replace: bool = False) -> None:
        """Capture and build `keys` (all modes anew with `replace`), whole or not at all."""
        state = self.meta[META_KEY] if state is None else state
        journal = Journal()
        restore = self.lora_fx_snapshot()
        try:
            if replace:
                for name in sorted(self._lora_fx_artifacts):
                    journal.pop_item(self.__dict__ if name in self.__dict__ else self._modules, name)
                self.__dict__["_lora_fx_artifacts"] = set()
                self.__dict__["_lora_fx_modes"] = {}
            modes = {}
            for key in keys:
                traced = self._trace(key, state)
                plain = self._adopt_artifacts(traced.graph, traced.artifacts, journal)
                modes[key] = ModeGraph(plain, *self._build(plain, state, key))
                check_targets(self, modes[key].graph, modes[key].blocks)
            self.__dict__["_lora_fx_modes"] = {**self._lora_fx_modes, **modes}
            self.meta[META_KEY] = state
            self._activate(self._lora_fx_key)
        except BaseException:
            journal.rollback()
            restore()
            raise

    def _trace(self, key, state: GraphState):
        refuse_if_sharded(self, f"capturing the {mode_name(key)} mode (or a new dtype or device)",
                          "lora_fx.shard captures both modes first; change dtype or device before sharding")
        with self._lora_fx_lock:
            template = self._lora_fx_template
            _bind_tensors(template, self)
            for path, module in template.named_modules(remove_duplicate=False):
                module.training = key if isinstance(key, bool) else self._lora_fx_flags.get(path, module.training)
            try:
                return trace(template, state.tracer, state.example_args, dict(state.example_kwargs), state.dynamic)
            finally:
                _release_tensors(template)

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

    # ---- commit protocol (see lora_fx.commit) --------------------------------------------------------------------

    def lora_fx_snapshot(self):
        """A function that puts state, modes and the active graph back as they are now."""
        state, modes, key = self.meta[META_KEY], dict(self._lora_fx_modes), self._lora_fx_key
        artifacts = set(self._lora_fx_artifacts)
        training = self.training

        def restore():
            self.meta[META_KEY] = state
            self.__dict__.update(_lora_fx_modes=modes, _lora_fx_key=key, _lora_fx_artifacts=artifacts)
            self.training = training
            if key in modes:
                self._activate(key)
        return restore

    def graphs(self) -> dict[str, fx.Graph]:
        """The current mode's graphs: the root's ("") and each block's, by path."""
        mode = self._lora_fx_modes[self._lora_fx_key]
        return {"": mode.graph, **mode.blocks}

    def blocks(self) -> list["LoraBlock"]:
        """The model's repeated blocks that run as their own modules, in order (empty when the graph is flat)."""
        return [self.get_submodule(path) for path in self._lora_fx_modes[self._lora_fx_key].blocks]

    def _build(self, plain: fx.Graph, state: GraphState, key) -> tuple[fx.Graph, dict]:
        return structure(build(self, plain, state, self._training_of(key), mode_name(key)), state, mode_name(key))

    def lora_fx_build_all(self, state: GraphState) -> dict:
        """Every captured mode's graphs for `state`: {mode: (root graph, {block path: graph})}."""
        return {key: self._build(mode.plain, state, key) for key, mode in self._lora_fx_modes.items()}

    def lora_fx_install(self, state: GraphState, graphs: dict | None) -> None:
        """Make `state` (and, unless None, `graphs`, as `lora_fx_build_all` returns them) current."""
        self.meta[META_KEY] = state
        if graphs is not None:
            self.__dict__["_lora_fx_modes"] = {key: ModeGraph(mode.plain, *graphs[key])
                                               for key, mode in self._lora_fx_modes.items()}
        self._activate(self._lora_fx_key)

    def _activate(self, key) -> None:
        mode = self._lora_fx_modes[key]
        self.__dict__["_lora_fx_key"] = key
        self._graph = mode.graph
        mode.graph.owning_module = self
        if mode.compiled is None:
            self.recompile()
            mode.compiled = {name: self.__dict__.get(name) for name in _COMPILED_ATTRIBUTES}
            mode.compiled["forward"] = type(self).forward
        else:
            self.__dict__.update({name: mode.compiled[name] for name in _COMPILED_ATTRIBUTES})
            type(self).forward = mode.compiled["forward"]
        for path, graph in mode.blocks.items():
            self._block(path).show(graph, mode.compiled_blocks.setdefault(path, {}))

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
        state = self.meta.get(META_KEY) if hasattr(self, "meta") else None
        if isinstance(state, GraphState):
            cls = type(self)
            cls.forward = _with_calling_convention(cls.forward, state, fixed_dims(self._graph))
        return python_code

    # ---- tensors: moves, copies, saving --------------------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        if "_lora_fx_modes" not in self.__dict__:
            return super()._apply(fn, recurse)
        before, saved = _placement(self), _tensor_refs(self)
        result = super()._apply(fn, recurse)
        if _placement(self) != before:
            try:
                state = self.meta[META_KEY]
                moved = state.evolve(example_args=_follow(self, state.example_args),
                                     example_kwargs=_follow(self, dict(state.example_kwargs)))
                self._capture_modes([self._lora_fx_key], moved, replace=True)
            except BaseException:
                _restore_tensor_refs(saved)
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
        copied.__dict__["_lora_fx_modes"] = {
            key: ModeGraph(copy_graph(mode.plain), copy_graph(mode.graph),
                           {path: copy_graph(graph) for path, graph in mode.blocks.items()})
            for key, mode in self._lora_fx_modes.items()}
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
        own = {"template": self._lora_fx_template, "flags": self._lora_fx_flags, "key": self._lora_fx_key}
        return _unpickle, (type(self).__name__, attributes, own)


_COMPILED_ATTRIBUTES = ("_code", "_lineno_map", "_prologue_start", "_in_spec", "_out_spec")
_MODULE_ATTRIBUTES = tuple(nn.Module().__dict__)         # what a plain container of the module tree holds


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
        if not compiled:
            self.recompile()
            compiled.update({name: self.__dict__.get(name) for name in _COMPILED_ATTRIBUTES})
            compiled["forward"] = type(self).forward
        else:
            self.__dict__.update({name: compiled[name] for name in _COMPILED_ATTRIBUTES})
            type(self).forward = compiled["forward"]

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


def _unpickle(class_name: str, attributes: dict, own: dict) -> LoraGraphModule:
    gm = LoraGraphModule(nn.Module(), fx.Graph(), class_name=class_name)
    gm.__dict__.update(attributes)
    gm._setup(own["template"], attributes["meta"][META_KEY], own["flags"], own["key"], artifacts=set())
    gm._capture_modes([own["key"]])
    return gm


def _put(root: nn.Module, name: str, tensor: torch.Tensor, persistent: bool) -> None:
    path, _, attr = name.rpartition(".")
    owner = root
    for part in filter(None, path.split(".")):
        owner = owner._modules.setdefault(part, nn.Module())
    if isinstance(tensor, nn.Parameter):
        owner._parameters[attr] = tensor
    else:
        owner.register_buffer(attr, tensor, persistent=persistent)


def _bind_tensors(template: nn.Module, root: nn.Module) -> None:
    """Point the template's parameters and buffers at `root`'s current tensors of the same names (quantized
    weights at storage-free stand-ins of their shape, dtype and device, so capture never sees the subclass; tied
    ones stay tied)."""
    stand_ins = {}
    for path, module in template.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        for name in module._parameters:
            if module._parameters[name] is not None:
                param = root.get_parameter(prefix + name)
                if is_quantized(param):
                    param = stand_ins.setdefault(id(param), stand_in(param))
                module._parameters[name] = param
        for name in module._buffers:
            if module._buffers[name] is not None:
                module._buffers[name] = root.get_buffer(prefix + name)


def _release_tensors(template: nn.Module) -> None:
    """Swap the template's tensors for meta tensors of the same shape between captures, so it keeps no weight alive
    (after `fully_shard` replaces the graph module's weights by shards, say)."""
    for module in template.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None and tensor.device.type != "meta":
                    meta = tensor.detach().to("meta")
                    store[name] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta


def _placement(root: nn.Module) -> dict:
    return {name: (t.dtype, t.device) for name, t in [*root.named_parameters(), *root.named_buffers()]}


def _tensor_refs(root: nn.Module) -> list:
    """Enough to undo `_apply`: each module's parameter and buffer dicts, and each parameter's data."""
    return [(module, dict(module._parameters), {n: p.data for n, p in module._parameters.items() if p is not None},
             dict(module._buffers)) for module in root.modules()]


def _restore_tensor_refs(saved: list) -> None:
    for module, parameters, data, buffers in saved:
        module._parameters.clear()
        module._parameters.update(parameters)
        for name, value in data.items():
            parameters[name].data = value
        module._buffers.clear()
        module._buffers.update(buffers)


def _follow(root: nn.Module, examples):
    """Example inputs moved to the model's device, floating ones cast to its floating dtype."""
    first = next((p for n, p in root.named_parameters() if not is_lora_state_name(n)), None)
    if first is None:
        return examples

    def move(value):
        if not isinstance(value, torch.Tensor):
            return value
        dtype = first.dtype if value.is_floating_point() and first.is_floating_point() else value.dtype
        return value.to(device=first.device, dtype=dtype)
    return torch.utils._pytree.tree_map(move, examples)


def _with_calling_convention(generated, state: GraphState, fixed: dict):
    """The generated forward, called as the model was captured: checked inputs (and the sizes the graph `fixed`),
    omitted non-tensor keywords filled in, grad mode restored however the forward exits (a no-grad region inlined
    in the graph sets it)."""
    parameters = tuple(list(inspect.signature(generated).parameters)[1:])
    constants = {name: value for name, value in state.example_kwargs.items() if not has_tensor(value)}
    why = ("captured with dynamic=False" if not state.dynamic
           else "torch.export specialized it (see the capture warning)")

    @functools.wraps(generated)
    def forward(self, *args, **kwargs):
        kwargs = _checked_call(parameters, constants, args, kwargs)
        if fixed:
            _check_fixed_dims(fixed, dict(zip(parameters, args)) | kwargs, why)
        if torch.compiler.is_compiling():
            return generated(self, *args, **kwargs)
        grad_enabled = torch.is_grad_enabled()
        try:
            return generated(self, *args, **kwargs)
        except AssertionError as err:
            if not str(err).startswith("Guard failed"):      # export's input guards run first, before any op
                raise
            raise CallError(f"these inputs fail a guard torch.export put on the captured graph ({err}): the "
                            f"model's code needs it for the graph to be valid (see the capture warning); call "
                            f"with sizes that pass, or capture with the sizes you will use") from None
        finally:
            torch._C._set_grad_enabled(grad_enabled)
    return forward


def _check_fixed_dims(fixed: dict, inputs: dict, why: str) -> None:
    for name, dims in fixed.items():
        value = inputs.get(name)
        if not isinstance(value, torch.Tensor):
            continue
        wrong = {dim: size for dim, size in dims.items() if dim >= value.dim() or value.shape[dim] != size}
        if wrong:
            raise CallError(f"input {name!r} has shape {tuple(value.shape)}, but the graph fixes dims {wrong} "
                            f"(dim: size) of it: {why}")


def _checked_call(parameters: tuple, constants: dict, args: tuple, kwargs: dict) -> dict:
    """`kwargs` with the omitted captured constants filled in; a clear error for any input the graph was not
    captured with, or without."""
    if len(args) > len(parameters):
        raise CallError(f"got {len(args)} positional inputs, but the graph was captured with {len(parameters)}: "
                        f"{list(parameters)}")
    positional = parameters[:len(args)]
    unknown = [name for name in kwargs if name not in parameters]
    if unknown:
        raise CallError(
            f"the graph was captured without the keyword input(s) {unknown}, and takes exactly the inputs it was "
            f"captured with: {list(parameters)}. Capture with them, e.g. lora_fx.apply(model, spec, "
            f"example_args=(...), example_kwargs={{..., {unknown[0]!r}: <an example like the ones you will "
            f"pass>}})")
    twice = [name for name in kwargs if name in positional]
    if twice:
        raise CallError(f"input(s) {twice} given both by position and by keyword")
    for name, value in constants.items():
        given = args[positional.index(name)] if name in positional else kwargs.get(name, value)
        if not (given is value or (type(given) is type(value) and given == value)):
            raise CallError(f"{name}={given!r} differs from the captured {name}={value!r}: the graph was "
                            f"specialized on it; capture again with {name}={given!r}")
        if name not in positional and name not in kwargs:
            kwargs = {**kwargs, name: value}
    missing = [name for name in parameters if name not in positional and name not in kwargs]
    if missing:
        raise CallError(f"missing input(s) {missing}: the graph was captured with them and needs them on every "
                        f"call")
    return kwargs
