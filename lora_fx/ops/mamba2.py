"""Custom ops lora_fx puts in graphs: Mamba2's fused `mamba_split_conv1d_scan_combined` as one opaque node.

`mamba_split_conv1d_scan_combined(...)` has mamba_ssm's signature and semantics
(mamba_ssm/ops/triton/ssd_combined.py):

    zx0, z, xBC, dt = split(zxbcdt, [2·d_nonssm, dim, dim + 2·G·N, nheads])
    x, B, C = split(silu(causal_depthwise_conv(xBC)), [dim, G·N, G·N])          # head h reads group h // (nheads/G)
    dt = clamp(softplus(dt + dt_bias), dt_limit)
    h_t = exp(dt_t·A)·h_{t-1} + dt_t·x_t ⊗ B_t;   y_t = C_t·h_t + D·x_t
    y = gated_rmsnorm(y, z) (per group of dim/G channels; or y·silu(z) without rmsnorm_weight)
    y = cat([silu(z0)·x0, y]) if d_nonssm > 0;   out = linear(y, outproj_weight, outproj_bias) if given, else y

The op returns (out, final_states) and the wrapper returns `out` or `(out, final_states)` as mamba_ssm does. CPU runs
the reference below in fp32: the chunked SSD form (any sequence length), or with `seq_idx` a sequential scan that
resets conv and state at sequence boundaries; CUDA runs mamba_ssm's kernel when it is importable. The backward is
a second opaque op (the reference's vector-Jacobian product, recomputing the forward), so export and torch.compile
see two nodes, never the scan.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from lora_fx.ops.decompositions import register_export_decomposition

INF = float("inf")


def _dims(zxbcdt: Tensor, conv1d_weight: Tensor, D: Tensor, headdim: int | None, ngroups: int):
    """(nheads, headdim, dim, dstate, d_nonssm), derived as the kernel derives them."""
    nheads = D.shape[0]
    headdim = D.shape[1] if D.dim() == 2 else headdim
    if headdim is None:
        raise ValueError("`headdim` is required when D is 1-D (nheads,)")
    dim = nheads * headdim
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    d_nonssm = (zxbcdt.shape[-1] - 2 * dim - 2 * ngroups * dstate - nheads) // 2
    return nheads, headdim, dim, dstate, d_nonssm


def _causal_conv(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None) -> Tensor:
    """Depthwise causal conv over time; x (b, L, c), weight (c, w). Taps never cross a `seq_idx` boundary."""
    width, length = weight.shape[1], x.shape[1]
    out = x.new_zeros(x.shape) if bias is None else bias.expand_as(x).clone()
    for lag in range(width):        # out[t] += weight[:, w-1-lag] * x[t-lag]
        shifted = F.pad(x, (0, 0, lag, 0))[:, :length]
        if seq_idx is not None and lag > 0:
            same = seq_idx == F.pad(seq_idx, (lag, 0), value=-1)[:, :length]
            shifted = shifted * same[..., None]
        out = out + shifted * weight[:, width - 1 - lag]
    return out


def _gated_rmsnorm(y: Tensor, z: Tensor, weight: Tensor, eps: float, group: int, norm_before_gate: bool) -> Tensor:
    """RMSNorm over groups of `group` channels, gated by silu(z) before (False) or after (True) normalizing."""
    if not norm_before_gate:
        y = y * F.silu(z)
    grouped = y.unflatten(-1, (-1, group))
    y = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * weight.to(y.dtype)
    return y * F.silu(z) if norm_before_gate else y


def _scan_sequential(x, dt, A, B, C, state, seq_idx):
    """h_t = exp(dt_t·A)·h_{t-1} + dt_t·x_t ⊗ B_t, y_t = C_t·h_t, one step at a time; h resets where seq_idx
    changes. x (b, L, h, p), dt (b, L, h), B/C (b, L, h, n), state (b, h, p, n)."""
    decay = torch.exp(dt * A)
    outputs = []
    for t in range(x.shape[1]):
        if t > 0:
            state = state * (seq_idx[:, t] == seq_idx[:, t - 1]).to(state.dtype)[:, None, None, None]
        state = state * decay[:, t, :, None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        outputs.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    return (torch.stack(outputs, dim=1) if outputs else torch.zeros_like(x)), state


def _segment_sum(a: Tensor) -> Tensor:
    """(..., T) -> (..., T, T) with [i, j] = sum(a[j+1..i]) for j <= i, -inf above the diagonal."""
    length = a.shape[-1]
    below = torch.ones(length, length, dtype=torch.bool, device=a.device).tril()
    cumulative = torch.cumsum(a[..., None].expand(*a.shape, length).masked_fill(~below.tril(-1), 0), dim=-2)
    return cumulative.masked_fill(~below, -torch.inf)


def _scan_chunked(x, dt, A, B, C, state, chunk_size):
    """The same recurrence in chunks (SSD paper, Listing 1): quadratic within a chunk, recurrent across chunks.
    The sequence is padded to a multiple of chunk_size with dt = 0, which leaves the state unchanged."""
    batch, length, heads, _ = x.shape
    pad = (-length) % chunk_size
    x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
    dt = F.pad(dt, (0, 0, 0, pad))
    chunks = (length + pad) // chunk_size
    X = (x * dt[..., None]).unflatten(1, (chunks, chunk_size))                # (b, c, l, h, p)
    B, C = (t.unflatten(1, (chunks, chunk_size)) for t in (B, C))             # (b, c, l, h, n)
    dA = (dt * A).unflatten(1, (chunks, chunk_size)).permute(0, 3, 1, 2)      # (b, h, c, l)
    dA_cumsum = torch.cumsum(dA, dim=-1)
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, torch.exp(_segment_sum(dA)), X)
    decay_states = torch.exp(dA_cumsum[..., -1:] - dA_cumsum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)
    states = torch.cat([state[:, None], states], dim=1)
    decay_chunk = torch.exp(_segment_sum(F.pad(dA_cumsum[..., -1], (1, 0))))
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states[:, :-1], torch.exp(dA_cumsum))
    return (y_diag + y_off).flatten(1, 2)[:, :length], states[:, -1]


def reference(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states, seq_idx, dt_limit,
              activation, rmsnorm_weight, rmsnorm_eps, outproj_weight, outproj_bias, headdim, ngroups,
              norm_before_gate) -> tuple[Tensor, Tensor]:
    """The fused computation in plain torch (chunk_size only shapes the kernel's work, not the result). The scan,
    the gate and the norm run in fp32 (or wider), as the kernel's states do."""
    batch, length, _ = zxbcdt.shape
    wide = torch.promote_types(zxbcdt.dtype, torch.float32)
    nheads, headdim, dim, dstate, d_nonssm = _dims(zxbcdt, conv1d_weight, D, headdim, ngroups)
    zx0, z, xBC, dt = zxbcdt.split([2 * d_nonssm, dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    xBC = _causal_conv(xBC, conv1d_weight, conv1d_bias, seq_idx)
    if activation in ("silu", "swish"):
        xBC = F.silu(xBC)
    x, B, C = xBC.to(wide).split([dim, ngroups * dstate, ngroups * dstate], dim=-1)
    x = x.unflatten(-1, (nheads, headdim))                                               # (b, L, h, p)
    B = B.unflatten(-1, (ngroups, dstate)).repeat_interleave(nheads // ngroups, dim=2)   # (b, L, h, n)
    C = C.unflatten(-1, (ngroups, dstate)).repeat_interleave(nheads // ngroups, dim=2)
    dt = F.softplus(dt.to(wide) + dt_bias.to(wide)).clamp(dt_limit[0], dt_limit[1])     # (b, L, h)
    state = (initial_states.to(wide) if initial_states is not None
             else zxbcdt.new_zeros(batch, nheads, headdim, dstate, dtype=wide))
    if seq_idx is None:
        y, state = _scan_chunked(x, dt, A.to(wide), B, C, state, chunk_size)
    else:
        y, state = _scan_sequential(x, dt, A.to(wide), B, C, state, seq_idx)
    skip = D.to(wide)[:, None] if D.dim() == 1 else D.to(wide)
    y = (y + x * skip).flatten(-2)                                                       # (b, L, dim)
    if rmsnorm_weight is None:
        y = y * F.silu(z.to(wide))
    else:
        y = _gated_rmsnorm(y, z.to(wide), rmsnorm_weight, rmsnorm_eps, dim // ngroups, norm_before_gate)
    y = y.to(zxbcdt.dtype)
    if d_nonssm > 0:
        z0, x0 = zx0.chunk(2, dim=-1)
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    if outproj_weight is not None:
        y = F.linear(y, outproj_weight, outproj_bias)
    return y, state


_ARGUMENTS = tuple(inspect.signature(reference).parameters)    # the op's arguments, in schema order


def _run_reference(*args) -> tuple[Tensor, Tensor]:
    out, final = reference(*args)
    return out.contiguous(), final.contiguous()


@torch.library.custom_op("lora_fx::mamba_split_conv1d_scan_combined", mutates_args=())
def _fused(zxbcdt: Tensor, conv1d_weight: Tensor, conv1d_bias: Tensor | None, dt_bias: Tensor, A: Tensor, D: Tensor,
           chunk_size: int, initial_states: Tensor | None, seq_idx: Tensor | None, dt_limit: list[float],
           activation: str | None, rmsnorm_weight: Tensor | None, rmsnorm_eps: float, outproj_weight: Tensor | None,
           outproj_bias: Tensor | None, headdim: int | None, ngroups: int, norm_before_gate: bool
           ) -> tuple[Tensor, Tensor]:
    return _run_reference(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states, seq_idx,
                          dt_limit, activation, rmsnorm_weight, rmsnorm_eps, outproj_weight, outproj_bias, headdim,
                          ngroups, norm_before_gate)


@_fused.register_kernel("cuda")
def _fused_cuda(*args):
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined as kernel
    except ImportError:
        return _run_reference(*args)
    named = dict(zip(_ARGUMENTS, args))
    out, final = kernel(**{**named, "dt_limit": tuple(named["dt_limit"])}, return_final_states=True)
    return out.contiguous(), final.contiguous()


@_fused.register_fake
def _fused_fake(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states, seq_idx, dt_limit,
                activation, rmsnorm_weight, rmsnorm_eps, outproj_weight, outproj_bias, headdim, ngroups,
                norm_before_gate):
    nheads, headdim, dim, dstate, d_nonssm = _dims(zxbcdt, conv1d_weight, D, headdim, ngroups)
    width = outproj_weight.shape[0] if outproj_weight is not None else d_nonssm + dim
    batch, length = zxbcdt.shape[0], zxbcdt.shape[1]
    return (zxbcdt.new_empty(batch, length, width),
            zxbcdt.new_empty(batch, nheads, headdim, dstate, dtype=torch.promote_types(zxbcdt.dtype, torch.float32)))


_GRAD_INPUTS = ("zxbcdt", "conv1d_weight", "conv1d_bias", "dt_bias", "A", "D", "initial_states", "rmsnorm_weight",
                "outproj_weight", "outproj_bias")


@torch.library.custom_op("lora_fx::mamba_split_conv1d_scan_combined_backward", mutates_args=())
def _fused_backward(grad_out: Tensor, grad_final: Tensor, tensors: list[Tensor], present: list[bool], chunk_size: int,
                    seq_idx: Tensor | None, dt_limit: list[float], activation: str | None, rmsnorm_eps: float,
                    headdim: int | None, ngroups: int, norm_before_gate: bool) -> list[Tensor]:
    """Gradients for the present differentiable inputs: the reference's vector-Jacobian product (recomputed)."""
    def forward(*present_tensors):
        given = iter(present_tensors)
        inputs = {name: next(given) if is_present else None for name, is_present in zip(_GRAD_INPUTS, present)}
        return reference(inputs["zxbcdt"], inputs["conv1d_weight"], inputs["conv1d_bias"], inputs["dt_bias"],
                         inputs["A"], inputs["D"], chunk_size, inputs["initial_states"], seq_idx, dt_limit, activation,
                         inputs["rmsnorm_weight"], rmsnorm_eps, inputs["outproj_weight"], inputs["outproj_bias"],
                         headdim, ngroups, norm_before_gate)

    _, vjp = torch.func.vjp(forward, *tensors)
    return [grad.contiguous() for grad in vjp((grad_out, grad_final))]


@_fused_backward.register_fake
def _fused_backward_fake(grad_out, grad_final, tensors, present, chunk_size, seq_idx, dt_limit, activation,
                         rmsnorm_eps, headdim, ngroups, norm_before_gate):
    return [torch.empty_like(t) for t in tensors]


def _setup_context(ctx, inputs, output):
    named = dict(zip(_ARGUMENTS, inputs))
    ctx.present = [named[name] is not None for name in _GRAD_INPUTS]
    ctx.save_for_backward(*[named[name] for name in _GRAD_INPUTS if named[name] is not None], named["seq_idx"])
    ctx.options = {k: named[k] for k in ("chunk_size", "dt_limit", "activation", "rmsnorm_eps", "headdim", "ngroups",
                                        "norm_before_gate")}


def _backward(ctx, grad_out, grad_final):     # unused outputs' grads arrive as zeros (materialized)
    *tensors, seq_idx = ctx.saved_tensors
    grads = iter(torch.ops.lora_fx.mamba_split_conv1d_scan_combined_backward(
        grad_out, grad_final, tensors, ctx.present, seq_idx=seq_idx, **ctx.options))
    by_name = {name: next(grads) for name, is_present in zip(_GRAD_INPUTS, ctx.present) if is_present}
    return tuple(by_name.get(name) for name in _ARGUMENTS)     # None for non-differentiable arguments


_fused.register_autograd(_backward, setup_context=_setup_context)

FUSED_OP = torch.ops.lora_fx.mamba_split_conv1d_scan_combined.default

register_export_decomposition(FUSED_OP, reference)


def mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                     initial_states=None, seq_idx=None, dt_limit=(0.0, INF), return_final_states=False,
                                     activation="silu", rmsnorm_weight=None, rmsnorm_eps=1e-6, outproj_weight=None,
                                     outproj_bias=None, headdim=None, ngroups=1, norm_before_gate=True):
    """mamba_ssm's `mamba_split_conv1d_scan_combined`, as the opaque op `lora_fx::mamba_split_conv1d_scan_combined`."""
    if outproj_weight is None and outproj_bias is not None:
        raise ValueError("outproj_bias must be None when outproj_weight is None (as in mamba_ssm)")
    out, final = FUSED_OP(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, int(chunk_size), initial_states,
                          seq_idx, [float(dt_limit[0]), float(dt_limit[1])], activation, rmsnorm_weight,
                          float(rmsnorm_eps), outproj_weight, outproj_bias, headdim, int(ngroups),
                          bool(norm_before_gate))
    return (out, final) if return_final_states else out


_WRAPPER_PARAMETERS = frozenset(inspect.signature(mamba_split_conv1d_scan_combined).parameters)


# Fused-kernel entry points that `capture` replaces by the opaque op while tracing, so the graph holds one node per
# call (as the fused kernel runs on a GPU) instead of a trace of Triton code or a silent fallback to a slow path.
FUSED_CALL_SITES = (
    ("transformers.models.mamba2.modeling_mamba2", "mamba2_split_conv1d_scan_combined"),
    ("mamba_ssm.modules.mamba2", "mamba_split_conv1d_scan_combined"),
    ("mamba_ssm.ops.triton.ssd_combined", "mamba_split_conv1d_scan_combined"),
)


def _called_like_mamba_ssm(*args, **kwargs):
    """The entry point as callers use it; extra keywords they forward (e.g. HF's `cu_seqlens=None`) must be None."""
    extras = {k: kwargs.pop(k) for k in list(kwargs) if k not in _WRAPPER_PARAMETERS}
    unsupported = {k: v for k, v in extras.items() if v is not None}
    if unsupported:
        raise NotImplementedError(f"lora_fx's mamba_split_conv1d_scan_combined does not support {sorted(unsupported)}")
    return mamba_split_conv1d_scan_combined(*args, **kwargs)


_patch_lock = threading.Lock()
_patch_users = 0                        # blocks (in any thread) inside opaque_fused_calls
_patched: list[tuple] = []              # (module, attribute, original) while patched
_this_thread = threading.local()        # .depth: how many opaque_fused_calls blocks this thread is in


def _dispatch_to(original):
    """The patched entry point: the opaque op in a thread inside `opaque_fused_calls`, `original` elsewhere."""
    @functools.wraps(original)
    def entry_point(*args, **kwargs):
        if getattr(_this_thread, "depth", 0) > 0:
            return _called_like_mamba_ssm(*args, **kwargs)
        return original(*args, **kwargs)
    return entry_point


@contextlib.contextmanager
def opaque_fused_calls():
    """Within the block, every imported entry point in FUSED_CALL_SITES calls the opaque op, in this thread only.

    Re-entrant and thread-safe: the module attributes are patched while any thread is inside a block (a thread
    outside one still reaches the original functions) and restored, on every exit path, when the last block ends.
    """
    global _patch_users
    with _patch_lock:
        if _patch_users == 0:
            for module_name, attribute in FUSED_CALL_SITES:
                module = sys.modules.get(module_name)
                if module is not None and hasattr(module, attribute):
                    original = getattr(module, attribute)
                    _patched.append((module, attribute, original))
                    setattr(module, attribute, _dispatch_to(original))
        _patch_users += 1
    depth = getattr(_this_thread, "depth", 0)
    _this_thread.depth = depth + 1
    try:
        yield
    finally:
        _this_thread.depth = depth
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                for module, attribute, original in reversed(_patched):
                    setattr(module, attribute, original)
                _patched.clear()
