"""The tensors of a graph module's module tree: registering them, lending them to the template, moving them back.

A lora_fx graph module holds the model's tensors under the model's own names. Its *template* (a copy of the user's
module structure) is traced with those tensors bound in (`bind_tensors`) and holds storage-free meta tensors
between captures (`release_tensors`), so it never keeps a weight alive.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_fx.quantize import is_quantized, stand_in
from lora_fx.state import is_lora_state_name


def put(root: nn.Module, name: str, tensor: torch.Tensor, persistent: bool) -> None:
    """Register `tensor` at dotted `name` under `root`, creating plain containers on the way."""
    path, _, attr = name.rpartition(".")
    owner = root
    for part in filter(None, path.split(".")):
        owner = owner._modules.setdefault(part, nn.Module())
    if isinstance(tensor, nn.Parameter):
        owner._parameters[attr] = tensor
    else:
        owner.register_buffer(attr, tensor, persistent=persistent)


def bind_tensors(template: nn.Module, root: nn.Module) -> None:
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


def release_tensors(template: nn.Module) -> None:
    """Swap the template's tensors for meta tensors of the same shape between captures, so it keeps no weight alive
    (after `fully_shard` replaces the graph module's weights by shards, say)."""
    for module in template.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None and tensor.device.type != "meta":
                    meta = tensor.detach().to("meta")
                    store[name] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta


def placement(root: nn.Module) -> dict:
    """{tensor name: (dtype, device)}: what `.to()` may change."""
    return {name: (t.dtype, t.device) for name, t in [*root.named_parameters(), *root.named_buffers()]}


def tensor_refs(root: nn.Module) -> list:
    """Enough to undo `_apply`: each module's parameter and buffer dicts, and each parameter's data."""
    return [(module, dict(module._parameters), {n: p.data for n, p in module._parameters.items() if p is not None},
             dict(module._buffers)) for module in root.modules()]


def restore_tensor_refs(saved: list) -> None:
    for module, parameters, data, buffers in saved:
        module._parameters.clear()
        module._parameters.update(parameters)
        for name, value in data.items():
            parameters[name].data = value
        module._buffers.clear()
        module._buffers.update(buffers)


def follow(root: nn.Module, examples):
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
