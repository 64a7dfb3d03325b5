"""`capture`: a model as a GraphModule that lora_fx passes can rewrite.

With example inputs the model is captured by `torch.export` (non-strict, training IR: `aten.linear` is kept), every
tensor dim dynamic by default, and unlifted with `ep.module()` so parameters keep the user's FQNs. Without example
inputs it is traced with `torch.fx` (every submodule traced through, so linear layers appear as `F.linear` calls).

The user's model is never mutated: base parameters are re-wrapped as new frozen Parameters that share storage
(`ep.module()` would otherwise hand back the user's own Parameter objects), and the model's train/eval mode is
only read.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from lora_fx.errors import CaptureError
from lora_fx.modes import enable_train_eval
from lora_fx.ops import opaque_fused_calls
from lora_fx.passes.inline_grad_regions import inline_grad_regions
from lora_fx.state import META_KEY, GraphState, is_lora_graph

_HINTS = (
    ("DynamicCache", "transformers models return a cache object torch.export cannot flatten: pass "
                     "example_kwargs={'use_cache': False}."),
    ("Constraints violated", "an input dim cannot be dynamic for this model: pass dynamic=False, or example "
                             "inputs whose dims are all >= 2."),
    ("got an unexpected keyword", "example_kwargs must match the model's forward() signature."),
)


def capture(model: nn.Module, example_args=None, example_kwargs: dict | None = None, *,
            dynamic: bool = True) -> fx.GraphModule:
    """Capture `model` as a GraphModule with no LoRA yet.

    The result is called like the model was in the example (same tensors positionally and by keyword; non-tensor
    example keywords such as `use_cache=False` may be repeated with the same value or left out) and returns the
    same output structure. With `dynamic=True` every tensor dim is dynamic (dims of size 0 or 1 in the example are
    specialized by torch.export, so use examples whose dims are >= 2).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture expects an nn.Module, got {type(model).__name__}")
    if is_lora_graph(model):
        raise TypeError("this GraphModule was already captured by lora_fx: pass it to lora_fx.apply directly")
    if example_args is None and example_kwargs is None:
        gm = _trace_fx(model)
        tracer, args, kwargs = "fx", (), {}
    else:
        args = example_args if isinstance(example_args, (tuple, list)) else (
            () if example_args is None else (example_args,))
        # views of other tensors would make torch.export guard on that aliasing, which new inputs never satisfy
        args, kwargs = pytree.tree_map(_own_storage, (tuple(args), dict(example_kwargs or {})))
        if not all(isinstance(k, str) for k in kwargs):
            raise TypeError("example_kwargs must be a dict keyed by argument names")
        # tensor keywords first, so the non-tensor ones (which may be left out when calling) come last
        kwargs = dict(sorted(kwargs.items(), key=lambda item: not has_tensor(item[1])))
        gm = _export(model, args, kwargs, dynamic)
        tracer = "export"
    _freeze_base_parameters(gm)
    gm.meta[META_KEY] = GraphState(tracer=tracer, model_class=(type(model).__name__, type(model).__module__),
                                   output_layers=_output_layers(model), dynamic=dynamic, example_args=args,
                                   example_kwargs=kwargs)
    gm.training = model.training
    install_conventions(gm)
    gm._register_deepcopy_hook(install_conventions)
    return gm


def install_conventions(gm: fx.GraphModule) -> None:
    """How our graphs are called, which `GraphModule.__deepcopy__` does not keep: working `train()`/`eval()`,
    and non-tensor example keywords that may be left out."""
    enable_train_eval(gm, gm.training)
    kwargs = gm.meta[META_KEY].example_kwargs
    constants = {k: v for k, v in kwargs.items() if not has_tensor(v)}
    if constants:
        first_position = len(gm.meta[META_KEY].example_args) + len(kwargs) - len(constants)
        gm.register_forward_pre_hook(_FillConstantKwargs(constants, first_position), with_kwargs=True, prepend=True)


def _own_storage(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) and value._base is not None else value


def has_tensor(value: Any) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))


def dynamic_shapes_for(args: tuple, kwargs: dict) -> tuple:
    """Every dim of every tensor input dynamic (`Dim.AUTO`), in torch.export's `dynamic_shapes` layout."""
    every_dim = lambda x: {i: Dim.AUTO for i in range(x.dim())} if isinstance(x, torch.Tensor) else None
    return tuple(pytree.tree_map(every_dim, value) for value in (*args, *kwargs.values()))


def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool) -> fx.GraphModule:
    dynamic_shapes = dynamic_shapes_for(args, kwargs) if dynamic else None
    try:
        with opaque_fused_calls():
            program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as err:  # torch.export raises many types; re-raise one with the model named
        raise CaptureError(_capture_message(model, err)) from None
    gm = program.module()
    inline_grad_regions(gm)
    return gm


def _capture_message(model: nn.Module, err: Exception) -> str:
    text = str(err).strip()
    first_lines = "\n".join(text.splitlines()[:3])
    hints = [hint for needle, hint in _HINTS if needle in text] or [
        "check that example inputs run through model(*example_args, **example_kwargs) eagerly."]
    return (f"torch.export could not capture {type(model).__name__} ({type(err).__name__}): {first_lines}\n"
            f"hint: {' '.join(hints)}")


class _FillConstantKwargs:
    """Forward pre-hook: the non-tensor example keywords may be left out when calling the captured graph."""

    def __init__(self, constants: dict, first_position: int):
        self.constants = constants
        self.first_position = first_position

    def __call__(self, module, args, kwargs):
        for position, (name, value) in enumerate(self.constants.items(), self.first_position):
            if name not in kwargs and len(args) <= position:
                kwargs[name] = value
        return args, kwargs


class _TraceThroughModules(fx.Tracer):
    """Traces into every submodule: linears become `F.linear(x, weight)` calls on `get_attr` weights, and no
    user module object ends up inside the GraphModule (a leaf would be shared, and `gm.train()` would flip it)."""

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


def _freeze_base_parameters(gm: fx.GraphModule) -> None:
    """Replace every parameter by a frozen Parameter sharing its storage (tied parameters stay tied)."""
    frozen: dict[int, nn.Parameter] = {}
    for module in gm.modules():
        for name, param in module._parameters.items():
            if param is not None:
                if id(param) not in frozen:
                    frozen[id(param)] = nn.Parameter(param.detach(), requires_grad=False)
                module._parameters[name] = frozen[id(param)]


def _output_layers(model: nn.Module) -> tuple[str, ...]:
    """FQNs of the model's output embedding (e.g. `lm_head`), which "all-linear" skips, as PEFT does."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is None:
        return ()
    return tuple(name for name, module in model.named_modules(remove_duplicate=False) if module is output)
