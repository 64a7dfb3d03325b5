"""`capture`: a model as a `LoraGraphModule` that lora_fx passes can rewrite.

With example inputs the model is captured by `torch.export` (non-strict, training IR), every tensor dim dynamic
by default; without, it is traced with `torch.fx` (see `lora_fx.trace`). Parameters keep the user's FQNs.

The user's model is never mutated, not even its mode flags. Its structure is copied into a *template* whose
tensors are the graph module's own: base parameters re-wrapped as new frozen Parameters that share the user's
storage (so flags never couple and no weight is copied), buffers cloned (a training forward updates batch-norm
statistics in place; those updates must land in the graph's copies, never the user's). Tied parameters stay tied.

A model loaded quantized by transformers (`BitsAndBytesConfig(load_in_4bit=True)`, `TorchAoConfig` with int8
weight-only) is captured as it is: its quantized weights stay quantized (the full-precision model never exists), are
recorded in the graph state like `quantize_base`'s, and every graph reads them through the format's dequantize or
its own linear (`lora_fx.quantize`, `lora_fx.passes.dequantize_reads`). A quantized format lora_fx does not read is a
`CaptureError` naming the weight.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from lora_fx.errors import CaptureError, QuantizeError
from lora_fx.graph_module import LoraGraphModule
from lora_fx.quantize import frozen, plain_quantized_linears, quantized_weights
from lora_fx.state import GraphState, is_lora_graph
from lora_fx.trace import has_tensor


def capture(model: nn.Module, example_args=None, example_kwargs: dict | None = None, *, dynamic: bool = True,
            blocks: bool = True, strict_shapes: bool = False) -> LoraGraphModule:
    """Capture `model` as a graph module with no LoRA yet.

    The result is called like the model was in the example (same tensors positionally and by keyword; non-tensor
    example keywords such as `use_cache=False` may be repeated with the same value or left out) and returns the
    same output structure. With `dynamic=True` every tensor dim is dynamic (dims of size 0 or 1 in the example are
    specialized by torch.export, so use examples whose dims are >= 2). With `blocks=True` the model's repeated blocks
    run as modules of their own (see `lora_fx.blocks`); `blocks=False` keeps one flat graph.

    A call with shapes the graph does not run (a dim torch.export fixed, or a size outside a guard the model's code
    needs, such as Mamba2's chunk size) captures a graph for that shape region on first use, with a
    `CaptureWarning`, as torch.compile recompiles; with `strict_shapes=True` such a call is a `CallError` instead.
    """
    if not isinstance(strict_shapes, bool):
        raise TypeError(f"strict_shapes must be True or False, got {strict_shapes!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture expects an nn.Module, got {type(model).__name__}")
    if is_lora_graph(model):
        raise TypeError("this GraphModule was already captured by lora_fx: pass it to lora_fx.apply directly")
    if example_kwargs is not None and not (isinstance(example_kwargs, dict)
                                           and all(isinstance(k, str) for k in example_kwargs)):
        raise TypeError("example_kwargs must be a dict keyed by argument names")
    if example_args is None and example_kwargs is None:
        tracer, args, kwargs = "fx", (), {}
    else:
        args = example_args if isinstance(example_args, (tuple, list)) else (
            () if example_args is None else (example_args,))
        # views of other tensors would make torch.export guard on that aliasing, which new inputs never satisfy
        args, kwargs = pytree.tree_map(_own_storage, (tuple(args), dict(example_kwargs or {})))
        # tensor keywords first, so the non-tensor ones (which may be left out when calling) come last
        kwargs = dict(sorted(kwargs.items(), key=lambda item: not has_tensor(item[1])))
        tracer = "export"
    try:
        quantized = quantized_weights(model)
    except QuantizeError as err:
        raise CaptureError(str(err)) from None
    state = GraphState(tracer=tracer, model_class=(type(model).__name__, type(model).__module__),
                       output_layers=_output_layers(model), module_kinds=module_kinds(model),
                       block_paths=block_paths(model) if blocks else (), dynamic=dynamic,
                       strict_shapes=strict_shapes, example_args=args, example_kwargs=kwargs, quantized=quantized)
    return LoraGraphModule.create(_template(model), state, class_name=type(model).__name__)


def _own_storage(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) and value._base is not None else value


def _template(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules whose parameters are frozen Parameters sharing the user's storage and whose
    buffers are clones, and whose bitsandbytes `Linear4bit` modules are `QuantizedLinear`s (see the module
    docstring)."""
    memo: dict[int, Any] = {}
    for param in model.parameters():
        memo.setdefault(id(param), frozen(param))
    for buffer in model.buffers():
        memo.setdefault(id(buffer), buffer.detach().clone())
    try:
        template = copy.deepcopy(model, memo)
    except Exception as err:
        raise CaptureError(
            f"lora_fx copies {type(model).__name__}'s module structure (sharing its weights) so that it can capture "
            f"each mode without touching your model, and copy.deepcopy of it failed ({type(err).__name__}: "
            f"{err}); make the model deep-copyable (e.g. drop unpicklable attributes such as locks)") from None
    plain_quantized_linears(template)
    return template


def module_kinds(model: nn.Module) -> dict[str, str]:
    """{FQN: "linear" | "conv1d_hf" | "embedding" | "conv"} for the modules PEFT knows by type ("all-linear" adapts
    the first two, as PEFT does: nn.Linear and transformers' Conv1D)."""
    kinds = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Linear):
            kinds[name] = "linear"
        elif type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers"):
            kinds[name] = "conv1d_hf"
        elif isinstance(module, nn.Embedding):
            kinds[name] = "embedding"
        elif isinstance(module, nn.modules.conv._ConvNd):
            kinds[name] = "conv"
    return kinds


def block_paths(model: nn.Module) -> tuple[str, ...]:
    """The model's repeated blocks: the entries of its outermost `nn.ModuleList`s that hold parameters (decoder
    layers, encoder blocks). Each is kept as a module of its own in the result (see `lora_fx.blocks`)."""
    paths = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(p + ".") for p in paths):
            paths += [f"{name}.{child}" if name else child for child, entry in module.named_children()
                      if any(True for _ in entry.parameters())]
    return tuple(paths)


def _output_layers(model: nn.Module) -> tuple[str, ...]:
    """FQNs of the model's output embedding (e.g. `lm_head`), which "all-linear" skips, as PEFT does."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is None:
        return ()
    return tuple(name for name, module in model.named_modules(remove_duplicate=False) if module is output)
