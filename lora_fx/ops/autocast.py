"""Autocast for lora_fx's matmul-like custom ops: under `torch.autocast` they take their floating-point inputs in the
autocast dtype, as `aten.linear` and `aten.mm` do.

A custom op is opaque to autocast, so without this `dropout_linear(x, A)` would get a bf16 activation (the output
of an autocast linear) and the fp32 factor A, and fail. The kernel registered here casts every floating-point
tensor input to the dtype autocast uses at the time of the call (`torch.get_autocast_dtype`: bf16 or fp16, as
the caller chose), then runs the op with autocast off; autograd sees the casts, so the gradients of fp32 factors
come back in fp32 (mixed precision as transformers' Trainer runs it with `bf16=True`).
"""

from __future__ import annotations

import torch

_LIBRARY = torch.library.Library("lora_fx", "IMPL")
DEVICE_TYPES = ("cpu", "cuda")


def cast_under_autocast(name: str) -> None:
    """Register the autocast kernel (see the module docstring) of the op `lora_fx::<name>` for CPU and CUDA."""
    op = getattr(torch.ops.lora_fx, name).default
    for device_type in DEVICE_TYPES:
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        _LIBRARY.impl(name, _kernel(op, device_type, getattr(torch._C.DispatchKey, key)), key, with_keyset=True)


def _kernel(op, device_type: str, key):
    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        cast = [arg.to(dtype) if isinstance(arg, torch.Tensor) and arg.is_floating_point() else arg for arg in args]
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*cast)
    return kernel


def _register() -> None:
    from lora_fx.ops import grouped_mm  # noqa: F401  (defines lora_fx::grouped_mm)
    from lora_fx.ops import dropout_linear  # noqa: F401  (defines lora_fx::dropout_linear)

    for name in ("dropout_linear", "grouped_mm"):
        cast_under_autocast(name)


_register()
