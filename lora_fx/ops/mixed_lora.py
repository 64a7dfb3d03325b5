"""Mixed-batch LoRA: every row of a batch through its own adapter, as opaque custom ops.

A batch of `batch` rows; an op's input (..., f) flattens to N = batch·L tokens, batch-major, so token t belongs to
row t // L and uses adapter id(t) = ids[t // L] ∈ {-1, 0, …, K-1}. With the adapters' factors stacked as
A (K, R, in), B (K, out, R) and scales s (K,):

    lora_shrink(x, A, ids)            h_t = A[id(t)]·x_t                  (h_t = 0 where id(t) = -1)
    lora_shrink(x, A, ids, seed, p)   h_t = A[id(t)]·dropout(x)_t         (training: x's dropout mask from the
                                                                          counter stream of `seed`, see
                                                                          `lora_fx.ops.counter_masks`)
    lora_expand(y, h, B, s, ids)      y'_t = y_t + s[id(t)]·B[id(t)]·h_t   (y'_t = y_t where id(t) = -1; y None: 0)
    check_adapter_ids(ids, like, K)   ids as int64, checked: shape [like.shape[0]], integer dtype, like's device,
                                      values in [-1, K)

Rows whose id is -1 never read a factor, so they equal the base model exactly, whatever the factors hold.

Kernels, and why each computes the way it does:

- *torch reference* (the CPU path, and the ONNX decomposition): BGMV per row — gather each row's factors
  (A[ids]: (batch, R, in)) and one batched matmul. A row's L tokens share its adapter, so each row's product is
  already a matrix-matrix product. The gather keeps every shape static, which torch.export, ONNX and
  torch.compile without recompiles need; sorting rows into per-adapter segments (SGMV) in torch needs
  data-dependent shapes (`nonzero`, `unique`). Measured on CPU (benchmarks/results/mixed_batch.md), SGMV in eager
  torch is faster all the same where the gather copies more than it saves: 20-30% at K >= 8 in prefill, up to 10x
  for many one-token rows (decode); a static-shape CPU SGMV is an open follow-up.
- *Triton* (CUDA; CPU tensors under TRITON_INTERPRET=1, see `lora_fx.ops.mixed_lora_triton`): SGMV — rows sorted
  by adapter on the device (argsort, bincount: no host sync), grid (token blocks, output blocks, adapters); each
  program multiplies one block of one adapter's tokens by that adapter's weights (`tl.dot`, weights loaded once per
  block), and exits at once when the adapter has fewer tokens. Decode batches (L = 1) thus get tiles of many rows of
  one adapter instead of one matrix-vector product per row (the BGMV case on a GPU). With dropout, the shrink
  draws each x tile's mask as it loads it, from the same stream as the CPU path.

Autograd (gradients reach every adapter's A, B and s), with G[k] = Σ_{t: id(t)=k} dy'_t ⊗ h_t:

    shrink:  dx_t = A[id]ᵀ·dh_t (an expand by Aᵀ, s = 1)      dA[k] = Σ_{t: id(t)=k} dh_t ⊗ x_t
             (with dropout: dropout(dx) and dropout(x), the mask drawn again from the seed, not kept)
    expand:  dy = dy'    dh_t = s[id]·B[id]ᵀ·dy'_t (a shrink by (s·B)ᵀ)    dB[k] = s_k·G[k]    ds[k] = <B[k], G[k]>

Activation gradients run through the ops themselves (Triton on CUDA); weight gradients are one batched matmul per
row and an `index_add` per adapter.
"""

from __future__ import annotations

import importlib
import os

import torch
from torch import Tensor

from lora_fx.errors import CallError
from lora_fx.ops.counter_masks import counter_dropout, dropout_reference
from lora_fx.ops.decompositions import register_export_decomposition

ID_DTYPES = (torch.int32, torch.int64)


def _rows(t: Tensor, batch: int) -> Tensor:
    """(..., f) as (batch, L, f): each row's tokens."""
    return t.reshape(batch, -1, t.shape[-1])


def shrink_reference(x: Tensor, lora_A: Tensor, ids: Tensor, seed: Tensor | None = None, p: float = 0.0) -> Tensor:
    """h = A[id]·x per row (x dropped out by `seed`'s mask when given), 0 for id -1; x (..., in), A (K, R, in) ->
    (..., R). BGMV: gather + bmm."""
    if seed is not None:
        x = dropout_reference(x, seed, p)
    on = (ids >= 0)[:, None, None]
    weights = torch.where(on, lora_A[ids.clamp(min=0)], 0).to(x.dtype)              # (batch, R, in)
    h = torch.bmm(_rows(x, ids.shape[0]), weights.transpose(1, 2))                     # (batch, L, R)
    return h.reshape(*x.shape[:-1], lora_A.shape[1])


def expand_reference(y: Tensor | None, h: Tensor, lora_B: Tensor, scales: Tensor, ids: Tensor) -> Tensor:
    """y + s[id]·B[id]·h per row, y for id -1; h (..., R), B (K, out, R), s (K,) -> (..., out). BGMV."""
    batch, out_features = ids.shape[0], lora_B.shape[1]
    dtype = h.dtype if y is None else y.dtype
    on = (ids >= 0)[:, None, None]
    index = ids.clamp(min=0)
    scaled = torch.where(on, _rows(h, batch) * scales[index].to(h.dtype)[:, None, None], 0).to(dtype)  # (batch, L, R)
    weights = torch.where(on, lora_B[index], 0).to(dtype).transpose(1, 2)                            # (batch, R, out)
    if y is None:
        delta = torch.bmm(scaled, weights)
    else:
        delta = torch.baddbmm(_rows(y, batch), scaled, weights)                                       # (batch, L, out)
    return delta.reshape(*h.shape[:-1], out_features)


def segment_outer(u: Tensor, v: Tensor, ids: Tensor, num_adapters: int) -> Tensor:
    """G[k] = Σ_{t: id(t)=k} u_t ⊗ v_t; u (..., P), v (..., Q) -> (K, P, Q). Rows with id -1 add nothing."""
    batch = ids.shape[0]
    per_row = torch.bmm(_rows(u, batch).transpose(1, 2), _rows(v, batch))              # (batch, P, Q)
    per_row = torch.where((ids >= 0)[:, None, None], per_row, 0)
    total = per_row.new_zeros(num_adapters, *per_row.shape[1:])
    return torch.index_add(total, 0, ids.clamp(min=0), per_row)


def _triton_kernels(t: Tensor):
    """The Triton kernels for `t`'s device (CUDA, or CPU while TRITON_INTERPRET=1 and the kernels were decorated
    for the interpreter), or None: the torch reference."""
    if not (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    try:
        kernels = importlib.import_module("lora_fx.ops.mixed_lora_triton")
    except ImportError:
        return None
    return kernels if t.is_cuda or kernels.INTERPRETED else None


def _is_empty(t: Tensor, ids: Tensor, what: str) -> bool:
    """Whether `t` has no tokens; raises unless its tokens split evenly into the rows of `ids`."""
    tokens = t.shape[:-1].numel()
    if ids.dim() != 1 or ids.dtype not in ID_DTYPES:
        raise CallError(f"ids must be a 1-D int32/int64 tensor, got shape {tuple(ids.shape)} and {ids.dtype}")
    if (tokens % ids.shape[0]) if ids.shape[0] else tokens:
        raise CallError(f"{what} has {tokens} tokens, which do not split into the {ids.shape[0]} rows of adapter "
                        f"ids: mixed batches route whole batch rows (dim 0 of the input)")
    return tokens == 0


@torch.library.custom_op("lora_fx::lora_shrink", mutates_args=())
def lora_shrink(x: Tensor, lora_A: Tensor, ids: Tensor, seed: Tensor | None = None, p: float = 0.0) -> Tensor:
    """h = A[id]·x per batch row, x dropped out by `seed`'s mask when given (see the module docstring)."""
    if _is_empty(x, ids, "the input x"):
        return x.new_zeros(*x.shape[:-1], lora_A.shape[1])
    kernels = _triton_kernels(x)
    if kernels:
        return kernels.shrink(x, lora_A, ids, seed, p)
    return shrink_reference(x if seed is None else counter_dropout(x, seed, p), lora_A, ids)


@lora_shrink.register_fake
def _shrink_fake(x, lora_A, ids, seed=None, p=0.0):
    return x.new_empty(*x.shape[:-1], lora_A.shape[1])


@torch.library.custom_op("lora_fx::lora_expand", mutates_args=())
def lora_expand(y: Tensor | None, h: Tensor, lora_B: Tensor, scales: Tensor, ids: Tensor) -> Tensor:
    """y + s[id]·B[id]·h per batch row (see the module docstring)."""
    if _is_empty(h, ids, "the input h"):
        return _expand_fake(y, h, lora_B, scales, ids).zero_()
    kernels = _triton_kernels(h)
    return (kernels.expand if kernels else expand_reference)(y, h, lora_B, scales, ids)


@lora_expand.register_fake
def _expand_fake(y, h, lora_B, scales, ids):
    return h.new_empty(*h.shape[:-1], lora_B.shape[1], dtype=h.dtype if y is None else y.dtype)


def _shrink_setup(ctx, inputs, output):
    x, lora_A, ids, seed, ctx.p = inputs
    ctx.save_for_backward(x, lora_A, ids, seed)


def _shrink_backward(ctx, grad_h):
    x, lora_A, ids, seed = ctx.saved_tensors
    dropout = (lambda t: t) if seed is None else (lambda t: counter_dropout(t, seed, ctx.p))   # the mask drawn again
    grad_x = grad_A = None
    if ctx.needs_input_grad[0]:
        ones = lora_A.new_ones(lora_A.shape[0], dtype=torch.float32)
        grad_x = dropout(lora_expand(None, grad_h, lora_A.transpose(1, 2), ones, ids).to(x.dtype))
    if ctx.needs_input_grad[1]:
        grad_A = segment_outer(grad_h, dropout(x).to(grad_h.dtype), ids, lora_A.shape[0]).to(lora_A.dtype)
    return grad_x, grad_A, None, None, None


def _expand_setup(ctx, inputs, output):
    y, h, lora_B, scales, ids = inputs
    ctx.save_for_backward(h, lora_B, scales, ids)


def _expand_backward(ctx, grad_out):
    h, lora_B, scales, ids = ctx.saved_tensors
    needs_y, needs_h, needs_B, needs_s = ctx.needs_input_grad[:4]
    grad_h = grad_B = grad_s = None
    if needs_h:
        scaled_B = lora_B * scales.to(lora_B.dtype)[:, None, None]                    # (K, out, R)
        grad_h = lora_shrink(grad_out, scaled_B.transpose(1, 2), ids).to(h.dtype)
    if needs_B or needs_s:
        outer = segment_outer(grad_out, h.to(grad_out.dtype), ids, lora_B.shape[0])   # G: (K, out, R)
        if needs_B:
            grad_B = (outer * scales.to(outer.dtype)[:, None, None]).to(lora_B.dtype)
        if needs_s:
            grad_s = (outer * lora_B.to(outer.dtype)).sum((1, 2)).to(scales.dtype)
    return grad_out if needs_y else None, grad_h, grad_B, grad_s, None


lora_shrink.register_autograd(_shrink_backward, setup_context=_shrink_setup)
lora_expand.register_autograd(_expand_backward, setup_context=_expand_setup)


def _check_ids_static(adapter_ids, like) -> None:
    """What can be checked without reading values (so also while tracing)."""
    if not isinstance(adapter_ids, Tensor):
        raise CallError(f"adapter_ids must be a tensor of adapter indices, got {type(adapter_ids).__name__}")
    if adapter_ids.dtype not in ID_DTYPES:
        raise CallError(f"adapter_ids must be int32 or int64, got {adapter_ids.dtype}")
    if adapter_ids.dim() != 1:
        raise CallError(f"adapter_ids must be 1-D (one adapter index per batch row), got shape "
                        f"{tuple(adapter_ids.shape)}")
    if adapter_ids.device != like.device:
        raise CallError(f"adapter_ids is on {adapter_ids.device}, but the model's inputs are on {like.device}")
    if like.dim() == 0:
        raise CallError("the model's first input has no batch dim to route by adapter_ids")


@torch.library.custom_op("lora_fx::check_adapter_ids", mutates_args=())
def check_adapter_ids(adapter_ids: Tensor, like: Tensor, num_adapters: int) -> Tensor:
    """`adapter_ids` as int64, after checking it against the batch of `like` and the number of adapters."""
    _check_ids_static(adapter_ids, like)
    if adapter_ids.shape[0] != like.shape[0]:
        raise CallError(f"adapter_ids has {adapter_ids.shape[0]} entries, but the batch has {like.shape[0]} rows "
                        f"(dim 0 of the first input): give one adapter index per row")
    if adapter_ids.numel() and (adapter_ids.min() < -1 or adapter_ids.max() >= num_adapters):
        bad = sorted({int(i) for i in adapter_ids.tolist() if not -1 <= i < num_adapters})
        raise CallError(f"adapter_ids {bad} out of range: this graph routes {num_adapters} adapter(s), so ids "
                        f"must be in [-1, {num_adapters - 1}] (-1: the base model)")
    return adapter_ids.to(torch.int64, copy=True)


@check_adapter_ids.register_fake
def _check_adapter_ids_fake(adapter_ids, like, num_adapters):
    _check_ids_static(adapter_ids, like)
    torch._check(adapter_ids.shape[0] == like.shape[0],
                 lambda: "adapter_ids must have one entry per batch row (dim 0 of the first input)")
    return adapter_ids.new_empty(adapter_ids.shape, dtype=torch.int64)


def _check_adapter_ids_decomposition(adapter_ids: Tensor, like: Tensor, num_adapters: int) -> Tensor:
    """For export: the shape relation only (values cannot be checked without reading them)."""
    torch._check(adapter_ids.shape[0] == like.shape[0])
    return adapter_ids.to(torch.int64)


SHRINK_OP = torch.ops.lora_fx.lora_shrink.default
EXPAND_OP = torch.ops.lora_fx.lora_expand.default
CHECK_IDS_OP = torch.ops.lora_fx.check_adapter_ids.default

register_export_decomposition(SHRINK_OP, shrink_reference)
register_export_decomposition(EXPAND_OP, expand_reference)
register_export_decomposition(CHECK_IDS_OP, _check_adapter_ids_decomposition)
