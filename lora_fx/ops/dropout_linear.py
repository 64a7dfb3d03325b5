"""`lora_fx::dropout_linear`: LoRA's shrink of a dropped input, h = dropout(x)·Aᵀ, without a saved dropped copy.

    n = Bernoulli(1 - p) / (1 - p)          (drawn as `aten.dropout` draws it: the same numbers, the same RNG use)
    h = (x ⊙ n)·Aᵀ
    ∂A = ∂hᵀ·(x ⊙ n),    ∂x = (∂h·A) ⊙ n

`dropout` followed by `linear` saves, per site, the dropped copy x ⊙ n for ∂A (4 bytes an element in fp32) and the
noise for ∂x. This op saves x, which the base path and sibling sites keep alive anyway, and the mask as bool (1
byte an element), and recomputes x ⊙ n in the backward (one multiply). Regenerating the mask from a seed would
save the mask too, but drawing it costs about half of a base GEMM per site on CPU, and the backward would draw it
again. Outputs equal `linear(dropout(x, p), A)` drawn from the same RNG state, bit for bit; the eager
`torch.autograd` of that pair computes the same gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _noise(mask: Tensor, p: float, dtype: torch.dtype) -> Tensor:
    """`aten.dropout`'s noise (1/(1-p) where kept, else 0), from the kept mask."""
    return mask.to(dtype).div_(1 - p)


@torch.library.custom_op("lora_fx::dropout_linear", mutates_args=())
def dropout_linear(x: Tensor, weight: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """(linear(dropout(x, p), weight), kept mask as bool)."""
    noise = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
    return torch.nn.functional.linear(x * noise, weight), noise.to(torch.bool)        # 5x cheaper than `!= 0`


@dropout_linear.register_fake
def _(x, weight, p):
    return x.new_empty(*x.shape[:-1], weight.shape[0]), torch.empty(x.shape, dtype=torch.bool, device=x.device)


def _setup_context(ctx, inputs, output):
    x, weight, ctx.p = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, grad_h, _grad_mask):
    x, weight, mask = ctx.saved_tensors
    noise = _noise(mask, ctx.p, x.dtype)
    grad_x = grad_h.matmul(weight) * noise if ctx.needs_input_grad[0] else None
    grad_weight = None
    if ctx.needs_input_grad[1]:
        dropped = (x * noise).reshape(-1, x.shape[-1])
        grad_weight = grad_h.reshape(-1, grad_h.shape[-1]).t().matmul(dropped)
    return grad_x, grad_weight, None


dropout_linear.register_autograd(_backward, setup_context=_setup_context)
DROPOUT_LINEAR = torch.ops.lora_fx.dropout_linear.default
