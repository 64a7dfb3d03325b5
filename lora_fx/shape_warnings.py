"""What torch.export did to the dims a capture asked to be dynamic, said at capture time.

torch.export fixes a dim the model's code needs constant, and bounds others by guards (Mamba2's chunked scan). The
graph checks both at every call, and a call outside them captures a shape variant (see `lora_fx.calling`); these
warnings say at capture which sizes run, reading torch's symbolic-shape log and export's guards.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import sys
import warnings

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from lora_fx.errors import CaptureWarning


@contextlib.contextmanager
def shape_log():
    """Collect what torch's symbolic-shape engine logs while exporting (symbols created, guards added), instead of
    printing it: it is how a specialized dim is explained, and export's own printout of it is noise here."""
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    records: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield records
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]


def fixed_dims(graph: fx.Graph) -> dict[str, dict[int, int]]:
    """{input name: {dim: size}} of the graph's top-level tensor inputs whose sizes the graph fixes."""
    fixed = {}
    for node in graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor):
            dims = {dim: int(size) for dim, size in enumerate(value.shape) if is_concrete_int(size)}
            if dims:
                fixed[node.name] = dims
    return fixed


_WEIGHT_SHAPE_CHECKS = (" in conv", " in meta_mm", " in meta_addmm", " in meta_bmm", " in linear")


def warn_about_specialized_dims(model, graph: fx.Graph, args: tuple, kwargs: dict, log: list[str]) -> None:
    """torch.export fixes a dim asked to be dynamic when the model's code needs a constant there; say so now, naming
    the dim and the guard, rather than at the next call with another size. A dim fixed by the weights (features,
    channels: expected) is not reported — one whose guard is a matmul or conv shape check, or a dim of a floating
    input as large as some dim of a parameter — nor are dims of size 0 or 1 (torch.export always fixes those); every
    fixed dim is checked when the graph is called. Integer inputs (token ids, masks) have no feature dims, so a
    fixed sequence length is reported even when it happens to equal a weight's dim."""
    examples = dict(zip(inspect.signature(model.forward).parameters, args)) | kwargs
    weight_sizes = {size for param in model.parameters() for size in param.shape}
    for name, dims in fixed_dims(graph).items():
        example = examples.get(name)
        for dim, size in dims.items():
            if not isinstance(example, torch.Tensor) or example.shape[dim] < 2:
                continue
            expression, where = _guard(log, name, dim)
            if any(check in where for check in _WEIGHT_SHAPE_CHECKS) or (example.is_floating_point()
                                                                          and size in weight_sizes):
                continue
            because = f" (guard {expression} at {where})" if expression else ""
            warnings.warn(CaptureWarning(
                f"torch.export fixed dim {dim} of input {name!r} at {size}{because}: the graph runs only that size "
                f"there: a call with another size captures a graph for it on first use (a CallError with "
                f"strict_shapes=True). Capture with that dim at the size you will use to avoid that."),
                stacklevel=first_caller_outside_lora_fx())


_PROBED_SIZES = range(2, 65)
_SIZE_IN_GUARD = r"L\['(?P<name>\w+)'\]\.size\(\)\[(?P<dim>\d+)\]"


def warn_about_guarded_dims(model, graph: fx.Graph, guards: list[str], args: tuple, kwargs: dict) -> None:
    """torch.export may keep a dim symbolic yet bound it by guards the model's code needs (Mamba2's chunked scan
    pads the length to a multiple of the chunk size and then takes one chunk: `8 >= L + (8 - L % 8) % 8`). The
    graph checks them at every call; say now which sizes pass (probing 2..64 with the other dims as in the
    example), rather than at the first call with a size that does not. Expected bounds are not reported: a floating
    input's dim pinned to a weight's size (features), a minimum size (a conv's kernel), a dim export fixed (see
    `warn_about_specialized_dims`), relations between dims (x.size(0) == bias.size(0)); the call checks them all."""
    examples = dict(zip(inspect.signature(model.forward).parameters, args)) | kwargs
    weight_sizes = {size for param in model.parameters() for size in param.shape}
    by_dim: dict[tuple[str, int], list[str]] = {}             # guards on one input dim alone
    for guard in guards:
        if len(dims := set(re.findall(_SIZE_IN_GUARD, guard))) == 1:
            name, dim = dims.pop()
            by_dim.setdefault((name, int(dim)), []).append(guard)
    fixed = fixed_dims(graph)
    for (name, dim), mentioning in by_dim.items():
        example = examples.get(name)
        if not isinstance(example, torch.Tensor) or dim in fixed.get(name, {}):
            continue
        failing = {guard: [size for size in _PROBED_SIZES if not _holds(guard, _probe(examples, name, dim, size))]
                   for guard in mentioning}
        excluded = {size for sizes in failing.values() for size in sizes}
        passing = [size for size in _PROBED_SIZES if size not in excluded]
        feature_dim = example.is_floating_point() and passing == [example.shape[dim]] and passing[0] in weight_sizes
        lower_bound = passing == list(range(passing[0], _PROBED_SIZES.stop)) if passing else False
        if not excluded or feature_dim or lower_bound:           # features fixed by a weight, a kernel's minimum
            continue
        binding = re.sub(_SIZE_IN_GUARD, r"\g<name>.size(\g<dim>)",
                         min((guard for guard, sizes in failing.items() if sizes), key=len))
        warnings.warn(CaptureWarning(
            f"torch.export kept dim {dim} of input {name!r} dynamic only under guards the model's code needs (e.g. "
            f"{binding}): of sizes {_PROBED_SIZES.start}..{_PROBED_SIZES.stop - 1} it runs "
            f"{_ranges(passing) if passing else 'none'}; "
            f"a call with another size captures a graph for it on first use (a CallError with strict_shapes=True). "
            f"Capture with an example at the size you will use to avoid that (a chunked scan's length stays free "
            f"when the example spans more than one chunk)."),
            stacklevel=first_caller_outside_lora_fx())


def _probe(examples: dict, name: str, dim: int, size: int) -> dict:
    """The example inputs' shapes as meta tensors, input `name`'s dim `dim` set to `size`."""
    shapes = {key: torch.empty(value.shape, device="meta") for key, value in examples.items()
              if isinstance(value, torch.Tensor)}
    shape = list(shapes[name].shape)
    shape[dim] = size
    shapes[name] = torch.empty(shape, device="meta")
    return shapes


def _holds(guard: str, shapes: dict) -> bool:
    try:
        return bool(eval(guard, {"__builtins__": {"max": max, "min": min}}, {"L": shapes}))
    except Exception:       # a guard on something other than input sizes: the call checks it
        return True


def _ranges(sizes: list[int]) -> str:
    """`[2, 3, 4, 7]` as "2..4, 7"."""
    runs, start = [], sizes[0]
    for previous, size in zip(sizes, sizes[1:] + [None]):
        if size != previous + 1:
            runs.append(str(start) if start == previous else f"{start}..{previous}")
            start = size
    return ", ".join(runs)


def _guard(log: list[str], name: str, dim: int) -> tuple[str, str]:
    """(expression, where) of the guard that fixed input `name`'s dim `dim`, as the symbolic-shape log recorded it:
    the last guard on its symbol before the symbol was replaced by a constant. ("", "") if the log does not say."""
    symbols = [m["symbol"] for record in log if (m := re.match(
        rf"create_symbol (?P<symbol>s\d+) = \d+ for L.*\['{re.escape(name)}'\]\.size\(\)\[{dim}\]", record))]
    found = ("", "")
    for record in log:
        guard = re.match(r"eval (?:\[guard suppressed\] )?(?P<expression>.+?) \[guard added\] \((?P<where>[^)]+)\)",
                         record)
        if symbols and guard and re.search(rf"\b{symbols[0]}\b", guard["expression"]):
            found = guard["expression"], guard["where"]
        if symbols and record.startswith(f"set_replacement {symbols[0]} = "):
            return found
    return found


def first_caller_outside_lora_fx() -> int:
    """The `stacklevel` that points a warning raised here at the user's call into lora_fx (through torch's module
    call machinery, where a graph module's forward raises it)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("lora_fx", "torch.")):
        frame, level = frame.f_back, level + 1
    return level
