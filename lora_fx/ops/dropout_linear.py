"""`lora_fx::dropout_linear`: LoRA's shrink of a dropped input, h = dropout(x)·Aᵀ, without a saved dropped copy.

    n = Bernoulli(1 - p) / (1 - p)          (drawn as `aten.dropout` draws it: the same numbers, the same RNG use)
    h = (x ⊙ n)·Aᵀ
    ∂A = ∂hᵀ·(x ⊙ n),    ∂x = (∂h·A) ⊙ n

`dropout` followed by `linear` saves, per site, the dropped copy x ⊙ n for ∂A (4 bytes an element in fp32) and the
noise for ∂x. This op saves x, which the base path and sibling sites keep alive anyway, and the kept mask packed 8
elements a byte (1 bit an element), and recomputes x ⊙ n in the backward (one multiply). Regenerating the mask from
a seed would save the mask too, but drawing it costs about half of a base GEMM per site on CPU, and the backward
would draw it again; packing and unpacking cost about a seventh of the draw. Outputs equal `linear(dropout(x, p), A)`
drawn from the same RNG state, bit for bit; the eager `torch.autograd` of that pair computes the same gradients.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

def pack_mask(mask: Tensor) -> Tensor:
    """A bool tensor as uint8 bits, 8 elements a byte (element 8i + j in bit j of byte i, zero-padded at the end).

    Read 8 bools as one int64 b₀ + b₁·2⁸ + … + b₇·2⁵⁶; three shift-or steps gather bit 8j at bit j of the low byte."""
    flat = mask.reshape(-1)
    if flat.numel() % 8:
        flat = torch.nn.functional.pad(flat, (0, 8 - flat.numel() % 8))
    words = flat.view(torch.uint8).view(torch.int64).clone()
    for shift in (7, 14, 28):
        words |= words >> shift
    return words.bitwise_and_(0xFF).to(torch.uint8)


def unpack_mask(packed: Tensor, shape: torch.Size, dtype: torch.dtype = torch.bool) -> Tensor:
    """`pack_mask`'s inverse: the mask of `shape` as `dtype` (0 or 1). Three shift-or-mask steps spread bit j to
    bit 8j."""
    words = packed.to(torch.int64)
    for shift, keep in ((28, 0x0000000F0000000F), (14, 0x0003000300030003), (7, 0x0101010101010101)):
        words |= words << shift
        words &= keep
    return words.view(torch.uint8)[:shape.numel()].view(shape).to(dtype)


@torch.library.custom_op("lora_fx::dropout_linear", mutates_args=())
def dropout_linear(x: Tensor, weight: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """(linear(dropout(x, p), weight), kept mask packed by `pack_mask`)."""
    noise = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
    return torch.nn.functional.linear(x * noise, weight), pack_mask(noise.to(torch.bool))     # 5x cheaper than `!= 0`


@dropout_linear.register_fake
def _(x, weight, p):
    return (x.new_empty(*x.shape[:-1], weight.shape[0]),
            torch.empty((math.prod(x.shape) + 7) // 8, dtype=torch.uint8, device=x.device))


def _setup_context(ctx, inputs, output):
    x, weight, ctx.p = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, grad_h, _grad_mask):
    x, weight, packed = ctx.saved_tensors
    noise = unpack_mask(packed, x.shape, x.dtype).div_(1 - ctx.p)        # aten.dropout's noise: 1/(1-p) where kept
    grad_x = grad_h.matmul(weight) * noise if ctx.needs_input_grad[0] else None
    grad_weight = None
    if ctx.needs_input_grad[1]:
        dropped = (x * noise).reshape(-1, x.shape[-1])
        grad_weight = grad_h.reshape(-1, grad_h.shape[-1]).t().matmul(dropped)
    return grad_x, grad_weight, None


dropout_linear.register_autograd(_backward, setup_context=_setup_context)
DROPOUT_LINEAR = torch.ops.lora_fx.dropout_linear.default
