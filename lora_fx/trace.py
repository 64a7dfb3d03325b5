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

import contextlib
import inspect
import io
import linecache
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from lora_fx.build import copy_graph
from lora_fx.errors import CaptureError
from lora_fx.ops import opaque_fused_calls
from lora_fx.passes.inline_grad_regions import inline_grad_regions
from lora_fx.shape_warnings import shape_log, warn_about_guarded_dims, warn_about_specialized_dims
from lora_fx.sites.experts import uncapturable_message

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


def dynamic_shapes_for(forward, args: tuple, kwargs: dict) -> dict:
    """Every dim of every tensor input dynamic (`Dim.AUTO`), keyed by `forward`'s parameter names as torch.export
    wants them: inputs bound to `*args` / `**kwargs` nest under that parameter's name, whatever the call order."""
    every_dim = lambda x: {i: Dim.AUTO for i in range(x.dim())} if isinstance(x, torch.Tensor) else None
    signature = inspect.signature(forward)
    shapes = {}
    for name, value in signature.bind(*args, **kwargs).arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {key: pytree.tree_map(every_dim, item) for key, item in value.items()}
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(pytree.tree_map(every_dim, item) for item in value)
        else:
            shapes[name] = pytree.tree_map(every_dim, value)
    return shapes


def trace(template: nn.Module, tracer: str, args: tuple, kwargs: dict, dynamic: bool) -> Traced:
    """`template` as a plain graph, in whatever mode its flags are in. Tracing holds a process-wide lock:
    torch.export keeps global tracing state, so two threads capturing at once take turns."""
    with _TRACING:
        traced = _export(template, args, kwargs, dynamic) if tracer == "export" else _trace_fx(template)
    return _with_artifacts(template, traced)


def trace_step(template: nn.Module, step, args: tuple, dynamic_shapes, deferred: bool = False) -> Traced:
    """`step(template, forward, *args)` as a plain graph, where `forward` is the template's own forward: a function
    of the model other than its forward (a decoding step), with the model's parameter names. With `deferred`,
    torch.export's guards on the `dynamic_shapes` (named `Dim`s) become run-time asserts inside the graph, so the
    ranges given hold; without, they are the graph's input guards (a call that fails one gets a shape variant)."""
    forward = type(template).forward.__get__(template)
    names = list(inspect.signature(step).parameters)[2:]

    def stepped(*inputs):
        return step(template, forward, *inputs)
    stepped.__signature__ = inspect.Signature([inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                               for name in names])
    template.forward = stepped
    try:
        with _TRACING, opaque_fused_calls(), _without_partial_graph_dump():
            program = torch.export.export(template, args, dynamic_shapes=dynamic_shapes, strict=False,
                                          prefer_deferred_runtime_asserts_over_guards=deferred)
    except Exception as err:  # torch.export raises many types; re-raise one with the model named
        raise CaptureError(_capture_message(template, err)) from None
    finally:
        del template.forward
    exported = program.module()
    inline_grad_regions(exported)
    return _with_artifacts(template, exported)


def _with_artifacts(template: nn.Module, traced: fx.GraphModule) -> Traced:
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
    refused = uncapturable_message(model)
    if refused is not None:
        raise CaptureError(f"torch.export cannot capture {type(model).__name__}: {refused}")
    try:
        with opaque_fused_calls(), shape_log() as log, _without_partial_graph_dump(), \
                _explicit_signature(model, args, kwargs) as forward:
            dynamic_shapes = dynamic_shapes_for(forward, args, kwargs) if dynamic else None
            program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as err:  # torch.export raises many types; re-raise one with the model named
        raise CaptureError(_capture_message(model, err)) from None
    exported = program.module()
    inline_grad_regions(exported)
    if dynamic:
        warn_about_specialized_dims(model, exported.graph, args, kwargs, log)
        warn_about_guarded_dims(model, exported.graph, getattr(program, "_guards_code", []), args, kwargs)
    return exported


def _capture_message(model: nn.Module, err: Exception) -> str:
    text = str(err).strip()
    if "DataDependent" in type(err).__name__:
        return _data_dependent_message(model, text)
    first_lines = "\n".join(text.splitlines()[:3])
    hints = [hint for needle, hint in _HINTS if needle in text] or [
        "check that example inputs run through model(*example_args, **example_kwargs) eagerly."]
    return (f"torch.export could not capture {type(model).__name__} ({type(err).__name__}): {first_lines}\n"
            f"hint: {' '.join(hints)}")


def _data_dependent_message(model: nn.Module, text: str) -> str:
    """Where the model branched on tensor values: the user code torch names, and the modules whose forward it is."""
    where = (re.search(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<function>\w+)', text)
             or re.search(r"Caused by: \((?P<file>[^\s:(]+):(?P<line>\d+) in (?P<function>\w+)\)", text))
    if where is None:
        location, modules = "", []
    else:
        modules, path = _modules_running(model, where["file"], int(where["line"]))
        code = linecache.getline(path or where["file"], int(where["line"])).strip()
        location = (f" at {Path(where['file']).name}:{where['line']} in {where['function']}"
                    + (f": `{code}`" if code else ""))
    named = f" (module {', '.join(modules[:3])}{' ...' if len(modules) > 3 else ''})" if modules else ""
    return (f"torch.export could not capture {type(model).__name__}: its code branches on tensor values "
            f"(data-dependent control flow){location}{named}. A graph must run the same ops whatever the data. For "
            f"transformers MoE models pick a traceable experts implementation: config._experts_implementation = "
            f"'batched_mm' or 'grouped_mm' (the eager per-expert loop is data-dependent); elsewhere, rewrite that code "
            f"without a Python branch on tensor values, or exclude it from the captured model.")


def _modules_running(model: nn.Module, file: str, line: int) -> tuple[list[str], str | None]:
    """(FQNs of the modules whose class's `forward` holds `file:line`, that source file's full path). torch may
    shorten `file` from the left, so it is matched as a suffix."""
    names, found = [], None
    for name, module in model.named_modules():
        try:
            source, start = inspect.getsourcelines(type(module).forward)
            path = inspect.getsourcefile(type(module).forward)
        except (OSError, TypeError):
            continue
        if path and str(Path(path).resolve()).endswith(file) and start <= line < start + len(source):
            names.append(name or type(model).__name__)
            found = path
    return names, found


@contextlib.contextmanager
def _explicit_signature(model: nn.Module, args: tuple, kwargs: dict):
    """While exporting, the template's `forward` takes exactly the example inputs as named parameters — inputs that
    land in the model's `**kwargs` too — so the `dynamic_shapes` torch.export matches against the signature line up
    however the model's forward is written (torch.export mis-pairs inputs routed through `**kwargs`)."""
    signature = inspect.signature(model.forward)
    try:
        signature.bind(*args, **kwargs)
    except TypeError as err:
        raise CaptureError(f"the example inputs do not fit {type(model).__name__}.forward: {err}") from None
    named = [p for p in signature.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(named):                  # inputs bound to *args: keep the model's own signature
        yield model.forward
        return
    original = model.forward

    def forward(*inputs, **keyword_inputs):
        return original(*inputs, **keyword_inputs)
    forward.__signature__ = inspect.Signature([inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                               for name in [p.name for p in named[:len(args)]] + list(kwargs)])
    model.forward = forward                     # the template is lora_fx's own copy of the model
    try:
        yield forward
    finally:
        del model.forward


@contextlib.contextmanager
def _without_partial_graph_dump():
    """torch.export prints the partial graph of a failed trace to stderr (hundreds of lines); our error names the
    failing code instead. Everything else written to stderr meanwhile is passed on unchanged."""
    buffer, stderr = io.StringIO(), sys.stderr
    sys.stderr = buffer
    try:
        yield
    except Exception as err:
        dump = getattr(err, "partial_fx_graph", None)
        stderr.write(buffer.getvalue().replace(f"{dump}\n", "") if dump else buffer.getvalue())
        raise
    else:
        stderr.write(buffer.getvalue())
    finally:
        sys.stderr = stderr


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
