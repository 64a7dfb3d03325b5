"""commit: the one routine that changes a lora_fx graph module — whole, or not at all.

Every public operation first *plans* a :class:`Change`, purely: the state it leads to, the tensors to register and
the tensors to remove. `commit` then registers the new tensors, rebuilds every captured mode's graph from its plain
capture (see `lora_fx.build`), checks that every graph reads only what will exist, swaps in the new state and graphs,
writes the scale buffers and removes what is gone. Each step is recorded in a :class:`Journal`; an exception at any
point (KeyboardInterrupt included) replays it backwards, so graph code, node meta, parameters, buffers, state dict,
adapter list and tags are exactly as before the call.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import fx, nn

from lora_fx.errors import AdapterError
from lora_fx.sites import tensor_names
from lora_fx.state import LORA_CONTAINERS, GraphState


@dataclass(frozen=True)
class Change:
    """What an operation does, planned before anything is touched."""

    state: GraphState
    add: Mapping[str, torch.Tensor] = field(default_factory=dict)   # name -> Parameter, or Tensor (buffer)
    remove: tuple[str, ...] = ()                                   # names of tensors to unregister


class Journal:
    """An undo log: each edit of a module tree registers how to revert it."""

    def __init__(self):
        self._undo: list[Callable[[], None]] = []

    def record(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def set_item(self, mapping, key, value) -> None:
        had, old = key in mapping, mapping.get(key)
        mapping[key] = value
        self.record(lambda: mapping.__setitem__(key, old) if had else mapping.pop(key, None))

    def pop_item(self, mapping, key) -> None:
        items = list(mapping.items())               # restored whole, so the order of the keys is kept
        mapping.pop(key)
        self.record(lambda: (mapping.clear(), mapping.update(items)))

    def set_add(self, members: set, item) -> None:
        if item not in members:
            members.add(item)
            self.record(lambda: members.discard(item))

    def write(self, tensor: torch.Tensor, value) -> None:
        """Write `value` (a tensor or a number) into `tensor` in place."""
        old = tensor.detach().clone()
        self.record(lambda: _copy_no_grad(tensor, old))
        _copy_no_grad(tensor, value)

    def rollback(self) -> None:
        while self._undo:
            self._undo.pop()()


def _copy_no_grad(target: torch.Tensor, source) -> None:
    with torch.no_grad():
        target.copy_(source) if isinstance(source, torch.Tensor) else target.fill_(source)


def container(root: nn.Module, path: str, journal: Journal) -> nn.Module:
    """The module at dotted `path`, creating empty containers along the way (recorded in `journal`)."""
    module = root
    for part in filter(None, path.split(".")):
        child = module._modules.get(part)
        if child is None:
            child = nn.Module()
            journal.set_item(module._modules, part, child)
        module = child
    return module


def register(root: nn.Module, name: str, tensor: torch.Tensor, journal: Journal) -> None:
    """Register `tensor` at `name`: a Parameter as a parameter, any other tensor as a non-persistent buffer."""
    path, _, attr = name.rpartition(".")
    owner = container(root, path, journal)
    if attr in owner._parameters or attr in owner._buffers or attr in owner._modules or hasattr(owner, attr):
        raise AdapterError(f"cannot register {name!r}: the name is already taken")
    if isinstance(tensor, nn.Parameter):
        journal.set_item(owner._parameters, attr, tensor)
    else:
        journal.set_item(owner._buffers, attr, tensor)
        journal.set_add(owner._non_persistent_buffers_set, attr)


def unregister(root: nn.Module, name: str, journal: Journal) -> None:
    """Remove the tensor `name`, and the LoRA containers this leaves empty."""
    parts = name.split(".")
    chain = [root]
    for part in parts[:-1]:
        chain.append(chain[-1]._modules[part])
    owner, attr = chain[-1], parts[-1]
    journal.pop_item(owner._parameters if attr in owner._parameters else owner._buffers, attr)
    for depth in range(len(parts) - 1, 0, -1):
        module, parent = chain[depth], chain[depth - 1]
        inside_lora = any(part in LORA_CONTAINERS for part in parts[:depth])
        if not inside_lora or module._parameters or module._buffers or module._modules:
            break
        journal.pop_item(parent._modules, parts[depth - 1])


def write_scales(root: nn.Module, state: GraphState, journal: Journal) -> None:
    """Each scale buffer holds its adapter's scale while the adapter is active and enabled, else 0."""
    for adapter, keys in state.sites.items():
        for key in keys:
            scale = tensor_names(state.site_info[key], adapter)[2]
            journal.write(root.get_buffer(scale), state.scale_value(adapter, key))


def check_targets(root: nn.Module, graph: fx.Graph, blocks: dict | None = None) -> None:
    """Every `get_attr` / `call_module` target of `graph`, and of each block's graph (relative to its path), exists."""
    for prefix, checked in [("", graph), *((path + ".", block) for path, block in (blocks or {}).items())]:
        for node in checked.nodes:
            if node.op in ("get_attr", "call_module"):
                value = root
                for part in (prefix + node.target).split("."):
                    value = getattr(value, part, None)
                    if value is None:
                        raise AdapterError(f"internal error: the new graph reads {prefix + node.target!r}, which "
                                           f"does not exist")


@contextlib.contextmanager
def transaction(gm):
    """Everything done to the lora_fx graph module `gm` in the block, whole or not at all: edits recorded in the
    yielded journal are replayed backwards, and state, graphs and mode put back, if the block raises (anything,
    KeyboardInterrupt included)."""
    journal = Journal()
    restore = gm.lora_fx_snapshot()
    try:
        yield journal
    except BaseException:
        journal.rollback()
        restore()
        raise


def commit(gm, change: Change) -> None:
    """Apply `change` to the lora_fx graph module `gm` (see the module docstring)."""
    with transaction(gm) as journal:
        for name, tensor in change.add.items():
            register(gm, name, tensor, journal)
        graphs = gm.lora_fx_build_all(change.state)
        for name in change.remove:
            unregister(gm, name, journal)
        for root, blocks in graphs.values():
            check_targets(gm, root, blocks)
        gm.lora_fx_install(change.state, graphs)
        write_scales(gm, change.state, journal)


def set_scales(gm, state: GraphState) -> None:
    """Switch which adapters contribute (no graph change): the new state and its scale values, whole or not at all."""
    with transaction(gm) as journal:
        gm.lora_fx_install(state, None)
        write_scales(gm, state, journal)


def write_tensors(writes: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write each value into its tensor in place, all of them or (on any exception) none."""
    journal = Journal()
    try:
        for tensor, value in writes:
            journal.write(tensor, value)
    except BaseException:
        journal.rollback()
        raise
