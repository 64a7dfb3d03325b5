"""How a captured graph is called: the inputs it was captured with, checked, and its shape region.

A graph's generated `forward` takes the flattened inputs torch.export recorded. `calling_convention` wraps it so that
a lora_fx graph module is called the way the model was: the same positional tensors and tensor keywords, the
non-tensor example keywords (`use_cache=False`) optional but never different, any other input a `CallError` naming
it. Grad mode is restored however a forward exits (a no-grad region inlined in the graph sets it).

Every graph also runs only the shapes it was captured for: dims torch.export fixed, and guards it put on the others
(Mamba2's chunked scan bounds the length by the chunk size). `guarded` turns a call outside them into
`ShapeMismatch` before any op runs, and the graph's owner decides: capture a *shape variant* for the new region and
run that (the default, as torch.compile recompiles), or raise a `CallError` (`capture(..., strict_shapes=True)`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch

from lora_fx.errors import CallError


class ShapeMismatch(Exception):
    """The inputs leave the shapes a graph runs (raised before any op runs). `reason` says which dim or guard."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def guarded(generated, fixed: dict, why: str):
    """`generated`, raising `ShapeMismatch` for inputs whose sizes the graph `fixed` ({input: {dim: size}}, `why`
    says why) or that fail one of export's input guards (checked first in the graph, before any op)."""
    parameters = tuple(list(inspect.signature(generated).parameters)[1:])

    @functools.wraps(generated)
    def run(self, *args, **kwargs):
        inputs = dict(zip(parameters, args)) | kwargs
        for name, dims in fixed.items():
            value = inputs.get(name)
            if isinstance(value, torch.Tensor):
                wrong = {dim: size for dim, size in dims.items() if dim >= value.dim() or value.shape[dim] != size}
                if wrong:
                    raise ShapeMismatch(f"input {name!r} has shape {tuple(value.shape)}, but the graph fixes dims "
                                        f"{wrong} (dim: size) of it: {why}")
        try:
            return generated(self, *args, **kwargs)
        except AssertionError as err:
            if not str(err).startswith("Guard failed"):
                raise
            raise ShapeMismatch(f"these inputs fail a guard torch.export put on the captured graph ({err}): the "
                                f"model's code needs it for the graph to be valid (see the capture warning)") from None
    run.lora_fx_parameters = parameters
    return run


def calling_convention(run, constants: dict, on_mismatch):
    """`run` (see `guarded`) called as the model was captured: inputs checked against the captured ones, omitted
    non-tensor keywords (`constants`) filled in, grad mode restored on every exit, and a `ShapeMismatch` handed to
    `on_mismatch(module, mismatch, args, kwargs)`, whose result is returned."""
    parameters = run.lora_fx_parameters

    @functools.wraps(run)
    def forward(self, *args, **kwargs):
        kwargs = checked_call(parameters, constants, args, kwargs)
        if torch.compiler.is_compiling():
            return run.__wrapped__(self, *args, **kwargs)
        with grad_mode_restored():
            try:
                return run(self, *args, **kwargs)
            except ShapeMismatch as mismatch:
                return on_mismatch(self, mismatch, args, kwargs)
    return forward


@contextlib.contextmanager
def grad_mode_restored():
    grad_enabled = torch.is_grad_enabled()
    try:
        yield
    finally:
        torch._C._set_grad_enabled(grad_enabled)


def checked_call(parameters: tuple, constants: dict, args: tuple, kwargs: dict) -> dict:
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
