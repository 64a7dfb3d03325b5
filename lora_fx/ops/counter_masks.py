"""Counter-based dropout: a keep mask that is a pure function of (seed, element index), drawn where x is read and
drawn again in the backward instead of being stored.

Per training step, `step_seeds` draws one 63-bit seed per dropout site from torch's generator, in one call, as
Inductor's `inductor_seeds` does (so `torch.manual_seed` reproduces the masks, eager and compiled alike). A site with
seed s = (s_hi, s_lo) keeps element i of its input x (i: the row-major index, 32 bits) when

    z_i = mix(mix(i ⊕ s_lo) ⊕ s_hi)          mix: `lowbias32`, a bijective xorshift-multiply hash of 32-bit words
    keep_i = ⌊z_i / 2⁸⌋ ≥ round(p·2²⁴)        so P(keep) = 1 − p to within 2⁻²⁵
    dropout(x)_i = keep_i · x_i / (1 − p)     the distribution of `nn.Dropout`, other draws

mix is a bijection for any key, so distinct elements of a site never share a hash value, and sites and steps differ
by independently drawn 64-bit keys. The hash is about 25 integer ops an element in int32 lanes, which Inductor
vectorises: under 1 ns an element on one core of this CPU, against 5.5 ns for `bernoulli_` and 11 ns for
Inductor's own CPU random numbers, which run a Philox generator per element (benchmarks/results/train_floor_masks.md).

    counter_dropout_linear(x, A, s, p) = dropout(x)·Aᵀ          ∂x = dropout(∂h·A),   ∂A = ∂hᵀ·dropout(x)
    counter_dropout(x, s, p)           = dropout(x)             ∂x = dropout(∂y)

The backward draws the mask again from s, so `counter_dropout_linear` keeps x, A and s, and no mask or dropped copy
(kept packed, a mask would cost as much time and 1/32 of x in bytes). Both ops run the reference below compiled
by Inductor (`torch.compile`, once per dtype; inputs under 2¹⁶ elements run the reference itself), also inside a
compiled graph, where `counter_dropout_linear` stays one opaque op. `counter_dropout` — what the backward calls —
is decomposed there into its integer ops, which Inductor fuses into the gradient kernels. Decomposing
`counter_dropout_linear` too would fuse its forward as well, but AOTAutograd's CSE then hands the forward's dropped
copy to the backward, and its partitioner keeps it for ∂A (4 bytes an element) instead of drawing it again.
Integer ops are exact, so eager and compiled draw the same masks.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
from torch import Tensor

MAX_ELEMENTS = 2 ** 32                   # element indices are 32-bit counters
COMPILE_FROM = 2 ** 16                   # smaller inputs run the reference: compiling costs seconds, once a process
_MULTIPLIERS = (0x7FEB352D, 0x846CA68B - 2 ** 32)        # lowbias32's (as int32)


def _mix(z: Tensor) -> Tensor:
    """lowbias32 on int32 words: z ^= z >>> 16; z *= m₁; z ^= z >>> 15; z *= m₂; z ^= z >>> 16 (mod 2³²)."""
    z = z ^ ((z >> 16) & 0xFFFF)                   # >> is arithmetic on int32: the mask makes it logical
    z = z * _MULTIPLIERS[0]
    z = z ^ ((z >> 15) & 0x1FFFF)
    z = z * _MULTIPLIERS[1]
    return z ^ ((z >> 16) & 0xFFFF)


def threshold(p: float) -> int:
    """round(p·2²⁴): an element is kept when the top 24 bits of its hash are at least this."""
    return round(p * 2 ** 24)


def keep_mask(shape, seed: Tensor, cut: int) -> Tensor:
    """The bool mask over a tensor of `shape` of a site with the 0-d int64 `seed`: hash bits 8-31 ≥ `cut`."""
    index = torch.arange(math.prod(shape), dtype=torch.int64, device=seed.device).to(torch.int32).view(shape)
    z = _mix(_mix(index ^ seed.to(torch.int32)) ^ (seed >> 32).to(torch.int32))
    return ((z >> 8) & 0xFFFFFF) >= cut


def _kept_and_scaled(x: Tensor, seed: Tensor, cut: int, scale: float) -> Tensor:
    return torch.where(keep_mask(x.shape, seed, cut), x * scale, 0)


def dropout_reference(x: Tensor, seed: Tensor, p: float) -> Tensor:
    """keep ⊙ x / (1 − p) in plain torch ops: the oracle, the eager kernel's source and the backward's decomposition
    under Inductor."""
    return _kept_and_scaled(x, seed, threshold(p), 1 / (1 - p))


@functools.cache
def _eager_kernel():
    """`_kept_and_scaled` compiled by Inductor, for any length, cut and scale (one compile per dtype)."""
    return torch.compile(_kept_and_scaled, dynamic=True, fullgraph=True)


_compile_failures: list[Exception] = []


def _dropout(x: Tensor, seed: Tensor, p: float) -> Tensor:
    """The eager kernel on x flattened; the reference for inputs under `COMPILE_FROM` elements (where it takes
    microseconds more) or where compiling the kernel failed (which warns once). Both draw the same masks."""
    flat = x.detach().reshape(-1)
    if flat.numel() >= COMPILE_FROM and not _compile_failures:
        try:
            with torch.no_grad():
                return _eager_kernel()(flat, seed, threshold(p), 1 / (1 - p)).view(x.shape)
        except Exception as err:                    # no C++ compiler, an unsupported Python: same masks, slower
            _compile_failures.append(err)
            warnings.warn(f"lora_fx counter dropout: compiling its eager kernel failed ({type(err).__name__}: "
                          f"{err}); running the torch reference instead (the same masks, several times slower)",
                          RuntimeWarning, stacklevel=2)
    return dropout_reference(flat, seed, p).view(x.shape)


def _check_size(x: Tensor) -> None:
    torch._check(x.numel() <= MAX_ELEMENTS, lambda: f"counter dropout indexes elements with 32-bit counters: an "
                                                    f"input of {x.numel()} elements is more than 2**32")


@torch.library.custom_op("lora_fx::step_seeds", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def step_seeds(like: Tensor, count: int) -> Tensor:
    """`count` seeds in [0, 2⁶³ − 1) on `like`'s device, from torch's generator (as Inductor's `inductor_seeds`)."""
    return torch.randint(2 ** 63 - 1, (count,), device=like.device)


@step_seeds.register_fake
def _(like, count):
    return torch.empty(count, dtype=torch.int64, device=like.device)


@torch.library.custom_op("lora_fx::counter_dropout", mutates_args=())
def counter_dropout(x: Tensor, seed: Tensor, p: float) -> Tensor:
    """keep ⊙ x / (1 − p), keep drawn from `seed` (see the module docstring)."""
    _check_size(x)
    return _dropout(x, seed, p)


@counter_dropout.register_fake
def _(x, seed, p):
    _check_size(x)
    return torch.empty_like(x)


@torch.library.custom_op("lora_fx::counter_dropout_linear", mutates_args=())
def counter_dropout_linear(x: Tensor, weight: Tensor, seed: Tensor, p: float) -> Tensor:
    """linear(counter_dropout(x, seed, p), weight): LoRA's shrink of a dropped input."""
    _check_size(x)
    return torch.nn.functional.linear(_dropout(x, seed, p), weight)


@counter_dropout_linear.register_fake
def _(x, weight, seed, p):
    _check_size(x)
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _dropout_setup(ctx, inputs, output):
    _, seed, ctx.p = inputs
    ctx.save_for_backward(seed)


def _dropout_backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    return COUNTER_DROPOUT(grad, seed, ctx.p), None, None


def _dropout_linear_setup(ctx, inputs, output):
    x, weight, seed, ctx.p = inputs
    ctx.save_for_backward(x, weight, seed)


def _dropout_linear_backward(ctx, grad_h):
    x, weight, seed = ctx.saved_tensors
    grad_x = COUNTER_DROPOUT(grad_h.matmul(weight), seed, ctx.p) if ctx.needs_input_grad[0] else None
    grad_weight = None
    if ctx.needs_input_grad[1]:
        dropped = COUNTER_DROPOUT(x, seed, ctx.p).reshape(-1, x.shape[-1])                  # regenerated
        grad_weight = grad_h.reshape(-1, grad_h.shape[-1]).t().matmul(dropped)
    return grad_x, grad_weight, None, None


counter_dropout.register_autograd(_dropout_backward, setup_context=_dropout_setup)
counter_dropout_linear.register_autograd(_dropout_linear_backward, setup_context=_dropout_linear_setup)

STEP_SEEDS = torch.ops.lora_fx.step_seeds.default
COUNTER_DROPOUT = torch.ops.lora_fx.counter_dropout.default
COUNTER_DROPOUT_LINEAR = torch.ops.lora_fx.counter_dropout_linear.default


@functools.cache
def decompose_under_inductor() -> None:
    """Let Inductor see through `counter_dropout` (its reference), so it fuses the hash into the gradient kernels (see
    the module docstring). Called when a graph gets these ops (importing Inductor takes about a second). The seeds
    op stays opaque: compiled, it draws from the generator exactly as eager."""
    from torch._inductor import decomposition

    decomposition.register_decomposition(COUNTER_DROPOUT)(dropout_reference)
    decomposition.fast_random_decomps.cache_clear()         # the table Inductor uses copies the registry once
