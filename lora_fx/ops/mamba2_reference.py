"""Mamba2's fused computation in plain torch: the CPU forward of `lora_fx::mamba_split_conv1d_scan_combined`, the
intermediates it keeps for the backward, and the backward written out by hand (no forward recomputed).

The computation is the op's, as `lora_fx.ops.mamba2` writes it out.

The scan runs in the chunked SSD form (Mamba2 paper, Listing 1), per chunk of l positions with a = dt·A and its
cumulative sum s (within the chunk):

    Y_diag = ((C Bᵀ) ∘ L) X,   L[i, j] = exp(s_i − s_j) for j <= i (else 0),   X = dt·x
    local_c = Xᵀ (B ∘ exp(s_last − s)),   S_c = exp(s_last,c−1)·S_{c−1} + local_{c−1}   (S_0 = initial state)
    Y_off = exp(s) ∘ (C S_cᵀ)

and the backward is the transpose of each of these products. With `seq_idx` (conv and state reset at sequence
boundaries) the scan is sequential, and no intermediates are kept: that backward recomputes (see `mamba2.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# The intermediates the forward keeps for the backward, in order (an absent one is an empty tensor):
# xc (b, L, conv) the conv output before its activation; dt (b, L, h); y (b, L, dim) the scan output with D·x, before
# the gate and norm; rstd (b, L, G) the norm's 1/rms (absent without rmsnorm_weight); pre_proj (b, L, d_nonssm + dim)
# the input of out_proj (absent without it); then the scan's: cumsum (b, c, h, l), L (b, c, h, l, l), CB = C·Bᵀ per
# group (b, c, g, l, l), chunk_decay (b, h, c+1, c+1), states_in (b, h, c+1, p, n) the initial state and each chunk's
# own contribution, chunk_states (b, c, h, p, n) the state each chunk starts from.
RESIDUALS = ("xc", "dt", "y", "rstd", "pre_proj", "cumsum", "L", "CB", "chunk_decay", "states_in", "chunk_states")


def dims(zxbcdt: Tensor, conv1d_weight: Tensor, D: Tensor, headdim: int | None, ngroups: int):
    """(nheads, headdim, dim, dstate, d_nonssm), derived as the kernel derives them."""
    nheads = D.shape[0]
    headdim = D.shape[1] if D.dim() == 2 else headdim
    if headdim is None:
        raise ValueError("`headdim` is required when D is 1-D (nheads,)")
    dim = nheads * headdim
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    d_nonssm = (zxbcdt.shape[-1] - 2 * dim - 2 * ngroups * dstate - nheads) // 2
    return nheads, headdim, dim, dstate, d_nonssm


def residual_shapes(zxbcdt, conv1d_weight, D, chunk_size, headdim, ngroups, has_rmsnorm, has_outproj):
    """[(shape, wide)] of RESIDUALS, for fake tensors: wide ones are fp32 (or wider), the others zxbcdt's dtype."""
    nheads, headdim, dim, dstate, d_nonssm = dims(zxbcdt, conv1d_weight, D, headdim, ngroups)
    batch, length = zxbcdt.shape[0], zxbcdt.shape[1]
    chunks = (length + chunk_size - 1) // chunk_size
    scan = (batch, chunks, nheads, chunk_size)
    return [((batch, length, conv1d_weight.shape[0]), False), ((batch, length, nheads), True),
            ((batch, length, dim), True), ((batch, length, ngroups) if has_rmsnorm else (0,), True),
            ((batch, length, d_nonssm + dim) if has_outproj else (0,), False), (scan, True),
            ((*scan, chunk_size), True), ((batch, chunks, ngroups, chunk_size, chunk_size), True),
            ((batch, nheads, chunks + 1, chunks + 1), True),
            ((batch, nheads, chunks + 1, headdim, dstate), True), ((batch, chunks, nheads, headdim, dstate), True)]


def causal_conv_masked(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor) -> Tensor:
    """Depthwise causal conv over time, x (b, L, c), weight (c, w), whose taps never cross a `seq_idx` boundary."""
    width, length = weight.shape[1], x.shape[1]
    out = x.new_zeros(x.shape) if bias is None else bias.expand_as(x).clone()
    for lag in range(width):        # out[t] += weight[:, w-1-lag] * x[t-lag]
        shifted = F.pad(x, (0, 0, lag, 0))[:, :length]
        if lag > 0:
            same = seq_idx == F.pad(seq_idx, (lag, 0), value=-1)[:, :length]
            shifted = shifted * same[..., None]
        out = out + shifted * weight[:, width - 1 - lag]
    return out


def _conv_operands(x: Tensor, weight: Tensor, bias: Tensor | None):
    """x padded in front by w − 1 (b, L + w − 1, c), the taps as rows (w, c), the bias: in one common dtype."""
    dtype = torch.promote_types(x.dtype, weight.dtype)
    if bias is not None:
        dtype = torch.promote_types(dtype, bias.dtype)
    taps = weight.to(dtype).t().contiguous()
    return F.pad(x.to(dtype), (0, 0, weight.shape[1] - 1, 0)), taps, None if bias is None else bias.to(dtype)


def causal_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Depthwise causal conv over time, x (b, L, c), weight (c, w): out[t] = bias + Σ_k weight[:, k]·x[t − (w−1) + k],
    one shifted product per tap (on CPU faster than conv1d's depthwise kernel, and contiguous in (b, L, c))."""
    length = x.shape[1]
    padded, taps, bias = _conv_operands(x, weight, bias)
    out = padded[:, :length] * taps[0] if bias is None else torch.addcmul(bias, padded[:, :length], taps[0])
    for k in range(1, taps.shape[0]):
        out = torch.addcmul(out, padded[:, k:k + length], taps[k])
    return out


def causal_conv_backward(grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, weight_grad: bool = True):
    """(grad_x, grad_weight (None unless `weight_grad`), grad_bias) of causal_conv."""
    length = x.shape[1]
    padded, taps, bias = _conv_operands(x, weight, bias)
    width = taps.shape[0]
    grad_weight = None
    if weight_grad:
        grad_weight = torch.stack([(grad * padded[:, k:k + length]).sum((0, 1)) for k in range(width)], dim=-1)
    grad_padded = F.pad(grad, (0, 0, 0, width - 1))                          # grad_x[t] = Σ_k grad[t + w−1−k]·w[k]
    grad_x = grad_padded[:, width - 1:width - 1 + length] * taps[0]
    for k in range(1, width):
        grad_x = torch.addcmul(grad_x, grad_padded[:, width - 1 - k:width - 1 - k + length], taps[k])
    return grad_x, grad_weight, None if bias is None else grad.sum((0, 1))


def _segment_sum(a: Tensor) -> Tensor:
    """(..., T) -> (..., T, T) with [i, j] = sum(a[j+1..i]) for j <= i, -inf above the diagonal."""
    length = a.shape[-1]
    below = torch.ones(length, length, dtype=torch.bool, device=a.device).tril()
    cumulative = torch.cumsum(a[..., None].expand(*a.shape, length).masked_fill(~below.tril(-1), 0), dim=-2)
    return cumulative.masked_fill(~below, -torch.inf)


def _segment_sum_backward(grad_exp: Tensor) -> Tensor:
    """Gradient wrt s = cumsum(a) of exp(_segment_sum(a)), given grad·exp(...) (..., T, T): the sum is s_i − s_j."""
    return grad_exp.sum(-1) - grad_exp.sum(-2)


def _reverse_cumsum(g: Tensor) -> Tensor:
    """Gradient wrt a of cumsum(a, -1): sum of g[k..] at k."""
    return g.sum(-1, keepdim=True) - g.cumsum(-1) + g


def _chunked(t: Tensor, pad: int, chunk_size: int) -> Tensor:
    """(b, L, h, k) -> (b, c, h, l, k) contiguous (the matmuls' layout), the sequence padded with zeros to c·l."""
    t = F.pad(t, (0, 0, 0, 0, 0, pad))
    return t.reshape(t.shape[0], -1, chunk_size, *t.shape[2:]).transpose(2, 3).contiguous()


def _per_head(t: Tensor, heads: int) -> Tensor:
    """(b, c, g, ...) -> (b, c, h, ...): each group's tensor repeated for its heads (head h reads group h // (h/g))."""
    return t.unsqueeze(3).expand(*t.shape[:3], heads // t.shape[2], *t.shape[3:]).flatten(2, 3)


def _per_group(t: Tensor, groups: int) -> Tensor:
    """(b, c, h, ...) -> (b, c, g, ...): the sum over each group's heads (the transpose of _per_head)."""
    return t.unflatten(2, (groups, -1)).sum(3)


def _times_per_head(t: Tensor, per_group: Tensor) -> Tensor:
    """t (b, c, h, ...) times per_group (b, c, g, ...) broadcast over each group's heads."""
    return (t.unflatten(2, (per_group.shape[2], -1)) * per_group.unsqueeze(3)).flatten(2, 3)


def _unchunked(t: Tensor, length: int) -> Tensor:
    """(b, c, h, l, k) -> (b, L, h, k), the padding cut off."""
    return t.transpose(2, 3).flatten(1, 2)[:, :length]


def scan_chunked(x, dt, A, B, C, state, chunk_size):
    """The recurrence in chunks; x (b, L, h, p), dt (b, L, h), B/C (b, L, g, n), state (b, h, p, n). The sequence
    is padded to a multiple of chunk_size with dt = 0, which leaves the state unchanged.
    Returns y (b, L, h, p), the final state and the scan's residuals (cumsum, L, CB, chunk_decay, states_in,
    chunk_states); CB (b, c, g, l, l) is per group, shared by its heads."""
    batch, length, heads, headdim = x.shape
    pad = (-length) % chunk_size
    X = _chunked(x * dt[..., None], pad, chunk_size)                        # (b, c, h, l, p)
    B_group, C_group = _chunked(B, pad, chunk_size), _chunked(C, pad, chunk_size)          # (b, c, g, l, n)
    B, C = _per_head(B_group, heads), _per_head(C_group, heads)                             # (b, c, h, l, n)
    dA = _chunked((dt * A)[..., None], pad, chunk_size)[..., 0]             # (b, c, h, l)
    cumsum = dA.cumsum(-1)
    L = torch.exp(_segment_sum(dA))                                         # (b, c, h, l, l)
    CB = C_group @ B_group.transpose(-1, -2)
    y = _times_per_head(L, CB) @ X
    local = X.transpose(-1, -2) @ (B * torch.exp(cumsum[..., -1:] - cumsum)[..., None])     # (b, c, h, p, n)
    states_in = torch.cat([state[:, :, None], local.transpose(1, 2)], dim=2)                # (b, h, c+1, p, n)
    chunk_decay = torch.exp(_segment_sum(F.pad(cumsum[..., -1].transpose(1, 2), (1, 0))))    # (b, h, c+1, c+1)
    states_out = (chunk_decay @ states_in.flatten(-2)).unflatten(-1, (headdim, -1))          # (b, h, c+1, p, n)
    chunk_states = states_out[:, :, :-1].transpose(1, 2).contiguous()                       # (b, c, h, p, n)
    y = y + (C @ chunk_states.transpose(-1, -2)) * torch.exp(cumsum)[..., None]
    return _unchunked(y, length), states_out[:, :, -1], (cumsum, L, CB, chunk_decay, states_in, chunk_states)


def scan_chunked_backward(grad_y, grad_final, x, dt, A, B, C, saved, chunk_size):
    """Gradients of scan_chunked wrt (x, dt, A, B, C, state), each product above transposed."""
    cumsum, L, CB, chunk_decay, states_in, chunk_states = saved
    batch, length, heads, headdim = x.shape
    groups = B.shape[2]
    pad = (-length) % chunk_size
    X = _chunked(x * dt[..., None], pad, chunk_size)
    B_group, C_group = _chunked(B, pad, chunk_size), _chunked(C, pad, chunk_size)
    B, C = _per_head(B_group, heads), _per_head(C_group, heads)
    grad_y = _chunked(grad_y, pad, chunk_size)                              # (b, c, h, l, p)
    # Y_diag = (CB ∘ L) X, CB = C Bᵀ per group
    grad_M = grad_y @ X.transpose(-1, -2)                                   # (b, c, h, l, l)
    grad_X = _times_per_head(L, CB).transpose(-1, -2) @ grad_y
    grad_CB_heads = grad_M * L
    grad_cumsum = _segment_sum_backward(_times_per_head(grad_CB_heads, CB))
    grad_CB = _per_group(grad_CB_heads, groups)                             # (b, c, g, l, l)
    grad_C_group, grad_B_group = grad_CB @ B_group, grad_CB.transpose(-1, -2) @ C_group
    # Y_off = exp(s) ∘ (C S_cᵀ)
    decay_out = torch.exp(cumsum)[..., None]
    grad_CS = grad_y @ chunk_states                                         # (b, c, h, l, n)
    grad_C = grad_CS * decay_out
    grad_cumsum = grad_cumsum + (grad_CS * C).sum(-1) * decay_out[..., 0]
    grad_chunk_states = (grad_y * decay_out).transpose(-1, -2) @ C          # (b, c, h, p, n)
    # states_out = chunk_decay ⊗ states_in, per head over the chunk index
    grad_out_flat = torch.cat([grad_chunk_states.transpose(1, 2), grad_final[:, :, None]], dim=2).flatten(-2)
    grad_states_in = (chunk_decay.transpose(-1, -2) @ grad_out_flat).unflatten(-1, (headdim, -1))  # (b, h, c+1, p, n)
    grad_decay = (grad_out_flat @ states_in.flatten(-2).transpose(-1, -2)) * chunk_decay
    grad_last = _reverse_cumsum(_segment_sum_backward(grad_decay))[..., 1:].transpose(1, 2)    # (b, c, h)
    # local = Xᵀ (B ∘ exp(s_last − s))
    decay_states = torch.exp(cumsum[..., -1:] - cumsum)[..., None]          # (b, c, h, l, 1)
    grad_local = grad_states_in[:, :, 1:].transpose(1, 2).contiguous()      # (b, c, h, p, n)
    grad_X = grad_X + (B * decay_states) @ grad_local.transpose(-1, -2)
    grad_B_decayed = X @ grad_local
    grad_B = grad_B_decayed * decay_states
    grad_decay_states = (grad_B_decayed * B).sum(-1) * decay_states[..., 0]
    grad_cumsum = grad_cumsum - grad_decay_states
    grad_cumsum[..., -1] += grad_last + grad_decay_states.sum(-1)
    grad_dA = _unchunked(_reverse_cumsum(grad_cumsum)[..., None], length)[..., 0]     # (b, L, h)
    grad_X = _unchunked(grad_X, length)
    grad_dt = (grad_X * x).sum(-1) + grad_dA * A
    grad_B = _unchunked(_per_group(grad_B, groups) + grad_B_group, length)                # (b, L, g, n)
    grad_C = _unchunked(_per_group(grad_C, groups) + grad_C_group, length)
    return grad_X * dt[..., None], grad_dt, (grad_dA * dt).sum((0, 1)), grad_B, grad_C, grad_states_in[:, :, 0]


def scan_sequential(x, dt, A, B, C, state, seq_idx):
    """h_t = exp(dt_t·A)·h_{t-1} + dt_t·x_t ⊗ B_t, y_t = C_t·h_t, one step at a time; h resets where seq_idx
    changes. x (b, L, h, p), dt (b, L, h), B/C (b, L, g, n), state (b, h, p, n)."""
    B, C = (t.repeat_interleave(x.shape[2] // t.shape[2], dim=2) for t in (B, C))
    decay = torch.exp(dt * A)
    outputs = []
    for t in range(x.shape[1]):
        if t > 0:
            state = state * (seq_idx[:, t] == seq_idx[:, t - 1]).to(state.dtype)[:, None, None, None]
        state = state * decay[:, t, :, None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        outputs.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    return (torch.stack(outputs, dim=1) if outputs else torch.zeros_like(x)), state


def _ssm_inputs(xa: Tensor, nheads: int, headdim: int, dim: int, dstate: int, ngroups: int, wide: torch.dtype):
    """x (b, L, h, p), B and C (b, L, g, n) from the activated conv output, in the scan's dtype."""
    x, B, C = xa.to(wide).split([dim, ngroups * dstate, ngroups * dstate], dim=-1)
    return x.unflatten(-1, (nheads, headdim)), B.unflatten(-1, (ngroups, dstate)), C.unflatten(-1, (ngroups, dstate))


def _dt_limited(dt_limit) -> bool:
    """Whether clamp(softplus(·), dt_limit) can change a value (softplus >= 0)."""
    return dt_limit[0] > 0 or dt_limit[1] != float("inf")


def forward(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states, seq_idx, dt_limit,
            activation, rmsnorm_weight, rmsnorm_eps, outproj_weight, outproj_bias, headdim, ngroups,
            norm_before_gate, keep: bool = False) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(out, final_states, residuals): the RESIDUALS when `keep` and seq_idx is None, else []. The scan, the gate
    and the norm run in fp32 (or wider), as the kernel's states do; chunk_size only shapes the work, not the result."""
    batch, length, _ = zxbcdt.shape
    wide = torch.promote_types(zxbcdt.dtype, torch.float32)
    nheads, headdim, dim, dstate, d_nonssm = dims(zxbcdt, conv1d_weight, D, headdim, ngroups)
    zx0, z, xBC, dt = zxbcdt.split([2 * d_nonssm, dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    if seq_idx is None:
        xc = causal_conv(xBC, conv1d_weight, conv1d_bias)
    else:
        xc = causal_conv_masked(xBC, conv1d_weight, conv1d_bias, seq_idx)
    xa = F.silu(xc) if activation in ("silu", "swish") else xc
    x, B, C = _ssm_inputs(xa, nheads, headdim, dim, dstate, ngroups, wide)
    dt = F.softplus(dt.to(wide) + dt_bias.to(wide))                                     # (b, L, h)
    if _dt_limited(dt_limit):
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    state = (initial_states.to(wide) if initial_states is not None
             else zxbcdt.new_zeros(batch, nheads, headdim, dstate, dtype=wide))
    if seq_idx is None:
        y, final, scan_saved = scan_chunked(x, dt, A.to(wide), B, C, state, chunk_size)
    else:
        y, final = scan_sequential(x, dt, A.to(wide), B, C, state, seq_idx)
    skip = D.to(wide)[:, None] if D.dim() == 1 else D.to(wide)
    y = (y + x * skip).flatten(-2)                                                       # (b, L, dim)
    z = z.to(wide)
    rstd = None
    if rmsnorm_weight is None:
        gated = y * F.silu(z)
    else:
        normed = y if norm_before_gate else y * F.silu(z)
        grouped = normed.unflatten(-1, (ngroups, -1))
        rstd = torch.rsqrt(grouped.pow(2).mean(-1) + rmsnorm_eps)                        # (b, L, G)
        gated = (grouped * rstd[..., None]).flatten(-2) * rmsnorm_weight.to(wide)
        if norm_before_gate:
            gated = gated * F.silu(z)
    out = gated.to(zxbcdt.dtype)
    if d_nonssm > 0:
        z0, x0 = zx0.chunk(2, dim=-1)
        out = torch.cat([F.silu(z0) * x0, out], dim=-1)
    pre_proj = out
    if outproj_weight is not None:
        out = F.linear(out, outproj_weight, outproj_bias)
    if not keep or seq_idx is not None:
        return out, final, []
    return out, final, [xc, dt, y, zxbcdt.new_empty(0, dtype=wide) if rstd is None else rstd,
                        pre_proj if outproj_weight is not None else zxbcdt.new_empty(0), *scan_saved]


def backward(grad_out, grad_final, residuals, zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, initial_states,
             dt_limit, activation, rmsnorm_weight, rmsnorm_eps, outproj_weight, outproj_bias, chunk_size, headdim,
             ngroups, norm_before_gate, needed) -> dict[str, Tensor]:
    """Gradients wrt the tensor inputs named in `needed`, from the residuals `forward(..., keep=True)` returned (a
    frozen weight's reduction is skipped)."""
    xc, dt, y, rstd, pre_proj, *scan_saved = residuals
    wide = dt.dtype
    nheads, headdim, dim, dstate, d_nonssm = dims(zxbcdt, conv1d_weight, D, headdim, ngroups)
    zx0, z, xBC, dt_raw = zxbcdt.split([2 * d_nonssm, dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    grads = {}
    if outproj_weight is not None:                      # out = pre_proj Wᵀ + b
        if "outproj_weight" in needed:
            grads["outproj_weight"] = grad_out.flatten(0, -2).T @ pre_proj.flatten(0, -2)
        if "outproj_bias" in needed:
            grads["outproj_bias"] = grad_out.sum((0, 1))
        grad_out = grad_out @ outproj_weight
    grad_zx0 = grad_out.new_zeros(grad_out.shape[:-1] + (2 * d_nonssm,))
    if d_nonssm > 0:                                    # silu(z0)·x0
        z0, x0 = zx0.chunk(2, dim=-1)
        grad_mlp, grad_out = grad_out.split([d_nonssm, dim], dim=-1)
        grad_zx0 = torch.cat([torch.ops.aten.silu_backward(grad_mlp * x0, z0), grad_mlp * F.silu(z0)], dim=-1)
    grad = grad_out.to(wide)
    z = z.to(wide)
    silu_z = F.silu(z)
    if rmsnorm_weight is None:                          # y·silu(z)
        grad_z, grad_y = grad * y, grad * silu_z
    else:                                               # n = u·rstd(u), rstd = (mean(u²) + eps)^-½ per group
        weight = rmsnorm_weight.to(wide)
        u = y if norm_before_gate else y * silu_z
        normed = (u.unflatten(-1, (ngroups, -1)) * rstd[..., None]).flatten(-2)
        if norm_before_gate:                            # (n·w)·silu(z)
            grad_z = grad * normed * weight
            grad = grad * silu_z
        if "rmsnorm_weight" in needed:
            grads["rmsnorm_weight"] = (grad * normed).sum((0, 1))
        grad_n = (grad * weight).unflatten(-1, (ngroups, -1))
        normed = normed.unflatten(-1, (ngroups, -1))
        grad_u = ((grad_n - normed * (grad_n * normed).mean(-1, keepdim=True)) * rstd[..., None]).flatten(-2)
        if norm_before_gate:
            grad_y = grad_u
        else:                                           # u = y·silu(z)
            grad_z, grad_y = grad_u * y, grad_u * silu_z
    grad_z = torch.ops.aten.silu_backward(grad_z, z)
    xa = F.silu(xc) if activation in ("silu", "swish") else xc
    x, B, C = _ssm_inputs(xa, nheads, headdim, dim, dstate, ngroups, wide)
    grad_y = grad_y.unflatten(-1, (nheads, headdim))                                     # (b, L, h, p)
    if "D" in needed:
        grads["D"] = (grad_y * x).sum((0, 1)) if D.dim() == 2 else (grad_y * x).sum((0, 1, 3))
    skip = D.to(wide)[:, None] if D.dim() == 1 else D.to(wide)
    grad_x, grad_dt, grads["A"], grad_B, grad_C, grads["initial_states"] = scan_chunked_backward(
        grad_y, grad_final.to(wide), x, dt, A.to(wide), B, C, scan_saved, chunk_size)
    grad_x = grad_x + grad_y * skip
    grad_xa = torch.cat([grad_x.flatten(-2), grad_B.flatten(-2), grad_C.flatten(-2)], dim=-1).to(xc.dtype)
    grad_xc = torch.ops.aten.silu_backward(grad_xa, xc) if activation in ("silu", "swish") else grad_xa
    grad_xBC, grads["conv1d_weight"], grads["conv1d_bias"] = causal_conv_backward(
        grad_xc, xBC, conv1d_weight, conv1d_bias, weight_grad="conv1d_weight" in needed)
    pre_dt = dt_raw.to(wide) + dt_bias.to(wide)
    if _dt_limited(dt_limit):                           # clamp passes the gradient inside [lo, hi] (ends included)
        softplus = F.softplus(pre_dt)
        grad_dt = grad_dt * ((softplus >= dt_limit[0]) & (softplus <= dt_limit[1]))
    grad_pre_dt = torch.ops.aten.softplus_backward(grad_dt, pre_dt, 1, 20)
    if "dt_bias" in needed:
        grads["dt_bias"] = grad_pre_dt.sum((0, 1))
    grads["zxbcdt"] = torch.cat([grad_zx0, grad_z.to(zxbcdt.dtype), grad_xBC.to(zxbcdt.dtype),
                                 grad_pre_dt.to(zxbcdt.dtype)], dim=-1)
    return {name: grads[name] for name in needed}
