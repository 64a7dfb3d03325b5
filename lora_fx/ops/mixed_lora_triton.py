"""Triton kernels for `lora_fx::lora_shrink` / `lora_fx::lora_expand`: SGMV over rows sorted by adapter.

    shrink:  out_t = A[id(t)]·x_t              expand:  out_t = y_t + s[id(t)]·B[id(t)]·h_t

With dropout (training), the shrink drops x out as it loads each tile: element (t, k) of x, t the token, has
counter t·in + k, and its mask is `lora_fx.ops.counter_masks`' hash of that counter and the site's seed, computed
in uint32 lanes — the same stream as the CPU path, so the masks equal it bit for bit.

Rows are sorted by adapter on the device (`argsort`, `bincount`, `cumsum`; no host sync), so adapter k's tokens
are a contiguous *segment* of the sorted order. The grid is fixed, (token blocks, output blocks, adapters):
program (m, n, k) takes the m-th block of BLOCK_M tokens of segment k, loads adapter k's weight tile once and
multiplies it with `tl.dot`, accumulating in fp32; a program whose segment is shorter exits at once. Rows with id -1
are in no segment: their output is 0 (shrink) or y (expand), written before the launch. Each token belongs to one
segment, so every output element has exactly one writer.

Imported lazily (only on a CUDA tensor, or with TRITON_INTERPRET=1): `@triton.jit` reads TRITON_INTERPRET when it
decorates, so set it before the first import to run these kernels on CPU tensors in the interpreter (how CI tests
them). The interpreter has no bf16/fp16 arithmetic, so there tiles are cast to fp32 before `tl.dot`; and the
kernels call language builtins only (`tl.full`, not `tl.zeros`): triton's own `@jit` helpers are decorated when
triton is first imported, which may be before TRITON_INTERPRET is set.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from lora_fx.ops.counter_masks import threshold

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"     # how the kernels below were decorated
BLOCK_M = 32


@triton.jit
def _segment_tokens(order_ptr, starts_ptr, counts_ptr, tokens_per_row, adapter, pid_m, BLOCK_M: tl.constexpr):
    """Token indices of block `pid_m` of `adapter`'s segment, and which of them exist."""
    count = tl.load(counts_ptr + adapter) * tokens_per_row
    j = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = j < count
    row = tl.load(order_ptr + tl.load(starts_ptr + adapter) + j // tokens_per_row, mask=valid, other=0)
    return row * tokens_per_row + j % tokens_per_row, valid


@triton.jit
def _mix(z):
    """lowbias32 on uint32 lanes (`lora_fx.ops.counter_masks._mix`)."""
    z ^= z >> 16
    z *= 0x7FEB352D
    z ^= z >> 15
    z *= 0x846CA68B
    return z ^ (z >> 16)


@triton.jit
def _dropped(tile, token, k, reduced, seed_ptr, cut, scale):
    """`tile` (x at rows `token`, columns `k`) times its dropout noise: keep ⊙ x / (1 − p), keep drawn from the
    seed's stream at counters token·reduced + k."""
    seed = tl.load(seed_ptr)
    counter = (token[:, None].to(tl.int64) * reduced + k[None, :]).to(tl.uint32)
    z = _mix(_mix(counter ^ seed.to(tl.uint32)) ^ (seed >> 32).to(tl.uint32))
    return tl.where((z >> 8) >= cut.to(tl.uint32), tile * scale, 0.0).to(tile.dtype)


@triton.jit
def _segment_product(lhs_ptr, rhs_ptr, adapter, token, valid, cols, reduced, n_cols, stride_lt, stride_lk,
                     stride_ra, stride_rc, stride_rk, seed_ptr, cut, scale, BLOCK_M: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
                     DROPOUT: tl.constexpr):
    """(BLOCK_M, BLOCK_C) tile of lhs[token] · rhs[adapter]ᵀ over the `reduced` dim, accumulated in ACC: lhs rows are
    the segment's tokens (dropped out as loaded, with DROPOUT), rhs (adapters, n_cols, reduced) is read at columns
    `cols`."""
    acc = tl.full((BLOCK_M, BLOCK_C), 0, dtype=ACC)
    for k0 in range(0, reduced, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        lhs = tl.load(lhs_ptr + token[:, None] * stride_lt + k[None, :] * stride_lk,
                      mask=valid[:, None] & (k[None, :] < reduced), other=0.0)                # (BLOCK_M, BLOCK_K)
        if DROPOUT:
            lhs = _dropped(lhs, token, k, reduced, seed_ptr, cut, scale)
        rhs = tl.load(rhs_ptr + adapter * stride_ra + cols[None, :] * stride_rc + k[:, None] * stride_rk,
                      mask=(cols[None, :] < n_cols) & (k[:, None] < reduced), other=0.0)      # (BLOCK_K, BLOCK_C)
        if UPCAST:
            lhs, rhs = lhs.to(ACC), rhs.to(ACC)
        acc += tl.dot(lhs, rhs.to(lhs.dtype), out_dtype=ACC)
    return acc


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, out_ptr, order_ptr, starts_ptr, counts_ptr, tokens_per_row, in_features, rank,
                   stride_xt, stride_xi, stride_ak, stride_ar, stride_ai, stride_ot, stride_or, seed_ptr, cut, scale,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
                   UPCAST: tl.constexpr, DROPOUT: tl.constexpr):
    pid_m, pid_r, adapter = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if pid_m * BLOCK_M >= tl.load(counts_ptr + adapter) * tokens_per_row:
        return
    token, valid = _segment_tokens(order_ptr, starts_ptr, counts_ptr, tokens_per_row, adapter, pid_m, BLOCK_M)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = _segment_product(x_ptr, a_ptr, adapter, token, valid, r, in_features, rank, stride_xt, stride_xi,
                           stride_ak, stride_ar, stride_ai, seed_ptr, cut, scale, BLOCK_M, BLOCK_R, BLOCK_K, ACC,
                           UPCAST, DROPOUT)
    tl.store(out_ptr + token[:, None] * stride_ot + r[None, :] * stride_or, acc.to(out_ptr.dtype.element_ty),
             mask=valid[:, None] & (r[None, :] < rank))


@triton.jit
def _expand_kernel(h_ptr, b_ptr, s_ptr, out_ptr, order_ptr, starts_ptr, counts_ptr, tokens_per_row, out_features,
                   rank, stride_ht, stride_hr, stride_bk, stride_bo, stride_br, stride_ot, stride_oo,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr,
                   UPCAST: tl.constexpr):
    pid_m, pid_n, adapter = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if pid_m * BLOCK_M >= tl.load(counts_ptr + adapter) * tokens_per_row:
        return
    token, valid = _segment_tokens(order_ptr, starts_ptr, counts_ptr, tokens_per_row, adapter, pid_m, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _segment_product(h_ptr, b_ptr, adapter, token, valid, n, rank, out_features, stride_ht, stride_hr,
                           stride_bk, stride_bo, stride_br, s_ptr, 0, 1.0, BLOCK_M, BLOCK_N, BLOCK_R, ACC, UPCAST,
                           False)
    acc = acc * tl.load(s_ptr + adapter).to(ACC)
    out = out_ptr + token[:, None] * stride_ot + n[None, :] * stride_oo
    mask = valid[:, None] & (n[None, :] < out_features)
    acc += tl.load(out, mask=mask, other=0.0).to(ACC)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _segments(ids: Tensor, num_adapters: int):
    """(rows sorted by adapter, start of each adapter's segment, rows per adapter), all on ids' device."""
    ids = ids.to(torch.int64)
    counts = torch.bincount(ids + 1, minlength=num_adapters + 1)                  # [0]: rows with id -1
    starts = torch.cumsum(counts, 0) - counts
    return torch.argsort(ids, stable=True), starts[1:].contiguous(), counts[1:].contiguous()


def _block(size: int, low: int = 16, high: int = 64) -> int:
    return min(max(low, triton.next_power_of_2(size)), high)


def _precision(*tensors: Tensor) -> dict:
    """Accumulate in fp32 (fp64 for fp64 inputs); cast tiles to it first in the interpreter (no half arithmetic)."""
    wide = any(t.dtype == torch.float64 for t in tensors)
    return {"ACC": tl.float64 if wide else tl.float32, "UPCAST": INTERPRETED or wide}


def shrink(x: Tensor, lora_A: Tensor, ids: Tensor, seed: Tensor | None = None, p: float = 0.0) -> Tensor:
    """h = A[id]·x per batch row, x dropped out by `seed`'s mask when given; x (..., in), A (K, R, in) -> (..., R)."""
    num_adapters, rank, in_features = lora_A.shape
    tokens = x.reshape(-1, in_features)
    out = torch.zeros(tokens.shape[0], rank, dtype=x.dtype, device=x.device)
    if num_adapters and tokens.shape[0]:
        order, starts, counts = _segments(ids, num_adapters)
        block_r, block_k = _block(rank), _block(in_features)
        grid = (triton.cdiv(tokens.shape[0], BLOCK_M), triton.cdiv(rank, block_r), num_adapters)
        _shrink_kernel[grid](tokens, lora_A, out, order, starts, counts, tokens.shape[0] // ids.shape[0],
                             in_features, rank, *tokens.stride(), *lora_A.stride(), *out.stride(),
                             ids if seed is None else seed, threshold(p), 1 / (1 - p), BLOCK_M=BLOCK_M,  # ids: unread
                             BLOCK_R=block_r, BLOCK_K=block_k, DROPOUT=seed is not None, **_precision(x, lora_A))
    return out.reshape(*x.shape[:-1], rank)


def expand(y: Tensor | None, h: Tensor, lora_B: Tensor, scales: Tensor, ids: Tensor) -> Tensor:
    """y + s[id]·B[id]·h per batch row; h (..., R), B (K, out, R), s (K,) -> (..., out)."""
    num_adapters, out_features, rank = lora_B.shape
    tokens = h.reshape(-1, rank)
    dtype = h.dtype if y is None else y.dtype
    out = (torch.zeros(tokens.shape[0], out_features, dtype=dtype, device=h.device) if y is None
           else y.reshape(-1, out_features).clone())
    if num_adapters and tokens.shape[0]:
        order, starts, counts = _segments(ids, num_adapters)
        block_n, block_r = _block(out_features), _block(rank)
        grid = (triton.cdiv(tokens.shape[0], BLOCK_M), triton.cdiv(out_features, block_n), num_adapters)
        _expand_kernel[grid](tokens, lora_B, scales, out, order, starts, counts, tokens.shape[0] // ids.shape[0],
                             out_features, rank, *tokens.stride(), *lora_B.stride(), *out.stride(),
                             BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_R=block_r, **_precision(h, lora_B))
    return out.reshape(*h.shape[:-1], out_features)
