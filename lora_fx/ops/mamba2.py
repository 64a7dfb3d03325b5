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
the reference (`mamba2_reference`) in fp32: the chunked SSD form (any sequence length), or with `seq_idx` a
sequential scan that resets conv and state at sequence boundaries; CUDA runs mamba_ssm's kernel when it is importable.

Under autograd the op runs as two private opaque ops, so export sees the op and torch.compile sees two nodes, never
the scan: `..._forward` also returns the reference's intermediates (RESIDUALS), and `..._backward` computes the
gradients from them by hand, without running the forward again. Where no intermediates exist (with `seq_idx`, or
under mamba_ssm's kernel) the backward is the reference's vector-Jacobian product, which recomputes the forward.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading

import torch
from torch import Tensor

import lora_fx.ops.mamba2_reference as _reference
from lora_fx.ops.decompositions import register_export_decomposition

INF = float("inf")


def reference(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states, seq_idx, dt_limit,
              activation, rmsnorm_weight, rmsnorm_eps, outproj_weight, outproj_bias, headdim, ngroups,
              norm_before_gate) -> tuple[Tensor, Tensor]:
    """(out, final_states) in plain torch (`mamba2_reference.forward`): the op's CPU forward and export form."""
    out, final, _ = _reference.forward(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states,
                                       seq_idx, dt_limit, activation, rmsnorm_weight, rmsnorm_eps, outproj_weight,
                                       outproj_bias, headdim, ngroups, norm_before_gate)
    return out, final


_ARGUMENTS = tuple(inspect.signature(reference).parameters)    # the op's arguments, in schema order


def _kernel():
    """mamba_ssm's fused kernel, or None where it is not importable."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined as kernel
    except ImportError:
        return None
    return kernel


def _signature(zxbcdt: Tensor, conv1d_weight: Tensor, conv1d_bias: Tensor | None, dt_bias: Tensor, A: Tensor,
               D: Tensor, chunk_size: int, initial_states: Tensor | None, seq_idx: Tensor | None,
               dt_limit: list[float], activation: str | None, rmsnorm_weight: Tensor | None, rmsnorm_eps: float,
               outproj_weight: Tensor | None, outproj_bias: Tensor | None, headdim: int | None, ngroups: int,
               norm_before_gate: bool) -> tuple[Tensor, Tensor]:
    """The op's arguments and outputs, for its schema."""


def _forward(*args, keep: bool = True) -> tuple[Tensor, Tensor, list[Tensor]]:
    """The reference's outputs (residuals kept or not), each its own contiguous tensor."""
    out, final, residuals = _reference.forward(*args, keep=keep)
    return out.contiguous(), final.clone(memory_format=torch.contiguous_format), [r.contiguous() for r in residuals]


def _forward_cuda(*args, keep: bool = True) -> tuple[Tensor, Tensor, list[Tensor]]:
    """mamba_ssm's kernel (no residuals: the backward recomputes) where it is importable, else the reference."""
    kernel = _kernel()
    if kernel is None:
        return _forward(*args, keep=keep)
    named = dict(zip(_ARGUMENTS, args))
    out, final = kernel(**{**named, "dt_limit": tuple(named["dt_limit"])}, return_final_states=True)
    return out.contiguous(), final.contiguous(), []


def _fake(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states, seq_idx, dt_limit, activation,
          rmsnorm_weight, rmsnorm_eps, outproj_weight, outproj_bias, headdim, ngroups, norm_before_gate):
    """Fake (out, final_states, residuals) of the forward op; the public op's fake drops the residuals."""
    nheads, headdim, dim, dstate, d_nonssm = _reference.dims(zxbcdt, conv1d_weight, D, headdim, ngroups)
    width = outproj_weight.shape[0] if outproj_weight is not None else d_nonssm + dim
    batch, length = zxbcdt.shape[0], zxbcdt.shape[1]
    wide = torch.promote_types(zxbcdt.dtype, torch.float32)
    residuals = []
    if seq_idx is None and not (zxbcdt.device.type == "cuda" and _kernel() is not None):
        shapes = _reference.residual_shapes(zxbcdt, conv1d_weight, D, chunk_size, headdim, ngroups,
                                            rmsnorm_weight is not None, outproj_weight is not None)
        residuals = [zxbcdt.new_empty(shape, dtype=wide if is_wide else None) for shape, is_wide in shapes]
    return (zxbcdt.new_empty(batch, length, width), zxbcdt.new_empty(batch, nheads, headdim, dstate, dtype=wide),
            residuals)


# The public op (what capture records and export keeps): outside autograd, the forward without residuals.
_NAME = "lora_fx::mamba_split_conv1d_scan_combined"
_SCHEMA = torch.library.infer_schema(_signature, mutates_args=())
torch.library.define(_NAME, _SCHEMA)
torch.library.impl(_NAME, "CompositeExplicitAutograd", lambda *args: _forward(*args, keep=False)[:2])
torch.library.impl(_NAME, "CUDA", lambda *args: _forward_cuda(*args, keep=False)[:2])
torch.library.register_fake(_NAME, lambda *args: _fake(*args)[:2])
FUSED_OP = torch.ops.lora_fx.mamba_split_conv1d_scan_combined.default

# Under autograd: the same arguments, and the reference's RESIDUALS as a third output ([] with seq_idx or mamba_ssm).
torch.library.define(_NAME + "_forward", _SCHEMA.rpartition("->")[0] + "-> (Tensor, Tensor, Tensor[])")
torch.library.impl(_NAME + "_forward", "CompositeExplicitAutograd", _forward)
torch.library.impl(_NAME + "_forward", "CUDA", _forward_cuda)
torch.library.register_fake(_NAME + "_forward", _fake)
FORWARD_OP = torch.ops.lora_fx.mamba_split_conv1d_scan_combined_forward.default

_GRAD_INPUTS = ("zxbcdt", "conv1d_weight", "conv1d_bias", "dt_bias", "A", "D", "initial_states", "rmsnorm_weight",
                "outproj_weight", "outproj_bias")
_OPTIONS = ("chunk_size", "dt_limit", "activation", "rmsnorm_eps", "headdim", "ngroups", "norm_before_gate")


@torch.library.custom_op(_NAME + "_backward", mutates_args=())
def _fused_backward(grad_out: Tensor, grad_final: Tensor, tensors: list[Tensor], present: list[bool],
                    needed: list[bool], residuals: list[Tensor], chunk_size: int, seq_idx: Tensor | None,
                    dt_limit: list[float], activation: str | None, rmsnorm_eps: float, headdim: int | None,
                    ngroups: int, norm_before_gate: bool) -> list[Tensor]:
    """Gradients for the needed inputs (of _GRAD_INPUTS; `tensors` are the present ones): by hand from the forward's
    residuals where it kept them, else the reference's vector-Jacobian product (which recomputes the forward)."""
    given = iter(tensors)
    inputs = {name: next(given) if is_present else None for name, is_present in zip(_GRAD_INPUTS, present)}
    names = [name for name, is_needed in zip(_GRAD_INPUTS, needed) if is_needed]
    options = dict(chunk_size=chunk_size, dt_limit=dt_limit, activation=activation, rmsnorm_eps=rmsnorm_eps,
                   headdim=headdim, ngroups=ngroups, norm_before_gate=norm_before_gate)
    if residuals:
        grads = _reference.backward(grad_out, grad_final, residuals, **inputs, **options, needed=names)
        return [grads[name].to(inputs[name].dtype).contiguous() for name in names]

    def forward(*present_tensors):
        given = iter(present_tensors)
        return reference(**{name: None if tensor is None else next(given) for name, tensor in inputs.items()},
                         seq_idx=seq_idx, **options)

    _, vjp = torch.func.vjp(forward, *tensors)
    grads = dict(zip([name for name in _GRAD_INPUTS if inputs[name] is not None], vjp((grad_out, grad_final))))
    return [grads[name].contiguous() for name in names]


@_fused_backward.register_fake
def _fused_backward_fake(grad_out, grad_final, tensors, present, needed, residuals, chunk_size, seq_idx, dt_limit,
                         activation, rmsnorm_eps, headdim, ngroups, norm_before_gate):
    given = iter(tensors)
    inputs = [next(given) if is_present else None for is_present in present]
    return [torch.empty_like(tensor) for tensor, is_needed in zip(inputs, needed) if is_needed]


BACKWARD_OP = torch.ops.lora_fx.mamba_split_conv1d_scan_combined_backward.default


class _FusedFunction(torch.autograd.Function):
    """The public op's autograd: the forward op keeps the residuals, the backward op consumes them (two opaque
    nodes under torch.compile)."""

    @staticmethod
    def forward(ctx, *args):
        named = dict(zip(_ARGUMENTS, args))
        out, final, residuals = FORWARD_OP(*args)
        ctx.present = [named[name] is not None for name in _GRAD_INPUTS]
        ctx.residual_count = len(residuals)
        ctx.save_for_backward(*[named[name] for name in _GRAD_INPUTS if named[name] is not None], *residuals,
                              named["seq_idx"])
        ctx.options = {name: named[name] for name in _OPTIONS}
        return out, final

    @staticmethod
    def backward(ctx, grad_out, grad_final):          # an unused output's grad arrives as zeros (materialized)
        *saved, seq_idx = ctx.saved_tensors
        split = len(saved) - ctx.residual_count
        needed = [ctx.needs_input_grad[_ARGUMENTS.index(name)] for name in _GRAD_INPUTS]     # False where absent
        grads = iter(BACKWARD_OP(grad_out, grad_final, saved[:split], ctx.present, needed, saved[split:],
                                 seq_idx=seq_idx, **ctx.options))
        by_name = {name: next(grads) for name, is_needed in zip(_GRAD_INPUTS, needed) if is_needed}
        return tuple(by_name.get(name) for name in _ARGUMENTS)     # None where no gradient is needed


torch.library.impl(_NAME, "Autograd", _FusedFunction.apply)

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
