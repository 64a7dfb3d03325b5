"""`lora_fx::grouped_mm`: the grouped matmul of MoE expert LoRA branches and of their base reads, as one opaque
custom op.

    y[s] = x[s] @ w[g(s)],      g(s) = #{e : offs[e] <= s}       x (S, k) sorted by expert, w (E, k, n), offs (E,)

transformers' `grouped_mm` experts sort tokens by expert and multiply each group by its expert's matrix with
`aten._grouped_mm` (or its own `grouped_mm_fallback` op where that cannot be compiled). The LoRA branch does the
same at rank r, and needs an op of its own (which the base read of an adapted weight uses too, see
`lora_fx.sites.experts`):

- `aten._grouped_mm` wants operands laid out its way (a unit stride in one of the last two dims, the other a multiple
  of 16 bytes); the factors are views of PEFT's `lora_B` (out, r·E), and Inductor lays out copies of them as it likes,
  so compiled graphs call the kernel with strides it rejects. A custom op gets its inputs with the strides they had
  when traced, and this one copies them into a layout the kernel takes where it would refuse them (the factors
  are small; an operand laid out as the kernel wants, such as a base weight read transposed, is never copied).
- r·dtype bytes need not be a multiple of 16: rank dims are zero-padded inside the op (exact).
- its fake kernel works for every dtype (`aten._grouped_mm`'s meta kernel refuses fp32), and its backward computes
  only the gradients autograd asks for (transformers' fallback always computes and allocates the weight's, a frozen
  (E, k, n) weight's included).

The kernel is `aten._grouped_mm` on CPU (fp32, bf16, fp16) and for bf16 on CUDA, else a loop over the groups. Rows
at or past offs[-1] are unspecified, as in `aten._grouped_mm`. `grouped_mm_reference` is the same product in plain
torch ops (a gather of each row's expert), registered as the op's export decomposition (ONNX), and as
`aten._grouped_mm`'s and transformers' fallback op's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lora_fx.ops.decompositions import register_export_decomposition

aten = torch.ops.aten


def _padded(t: Tensor, dim: int, multiple: int) -> Tensor:
    """`t` contiguous, with dim `dim` zero-padded to a multiple of `multiple`."""
    extra = -t.shape[dim] % multiple
    return torch.nn.functional.pad(t, [0, 0] * (t.dim() - 1 - dim) + [0, extra]).contiguous() if extra else \
        t.contiguous()


def _aligned(t: Tensor) -> int:
    """How many elements of `t`'s dtype make 16 bytes (`aten._grouped_mm` wants strides of such multiples)."""
    return max(1, 16 // t.element_size())


def _laid_out(*operands: Tensor) -> bool:
    """Whether `aten._grouped_mm` takes every operand as it is: in its last two dims, a unit stride in one and in the
    other a stride spanning the first's size, a multiple of 16 bytes, and a 16-byte aligned start (then a frozen
    (E, out, in) weight read transposed is never copied)."""
    def accepted(t: Tensor) -> bool:
        rows, columns = t.stride()[-2:]
        if t.data_ptr() % 16:
            return False
        if columns == 1:
            return rows >= max(1, t.shape[-1]) and rows % _aligned(t) == 0
        return rows == 1 and columns >= max(1, t.shape[-2]) and columns % _aligned(t) == 0
    return all(accepted(t) for t in operands)


def _kernel_forward(input: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
    if _laid_out(input, weight):
        return torch._grouped_mm(input, weight, offs=offs).contiguous()      # its rows may be padded to 16 bytes
    multiple = _aligned(input)
    padded_weight = _padded(_padded(weight, 1, multiple), 2, multiple)               # (E, k + p, n + q)
    out = torch._grouped_mm(_padded(input, 1, multiple), padded_weight, offs=offs)   # (S, n + q)
    return out[:, :weight.shape[2]].contiguous()


def _kernel_weight_grad(input: Tensor, grad_output: Tensor, offs: Tensor) -> Tensor:
    if _laid_out(input.t(), grad_output):
        return torch._grouped_mm(input.t(), grad_output, offs=offs).contiguous()
    multiple = _aligned(input)
    columns = _padded(input, 1, multiple).t()                                         # (k + p, S), unit row stride
    grad = torch._grouped_mm(columns, _padded(grad_output, 1, multiple), offs=offs)   # (E, k + p, n + q)
    return grad[:, :input.shape[1], :grad_output.shape[1]].contiguous()


def _use_kernel(x: Tensor) -> bool:
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    return x.device.type == "cuda" and x.dtype == torch.bfloat16


@torch.library.custom_op("lora_fx::grouped_mm", mutates_args=())
def grouped_mm(input: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
    """(S, k) x (E, k, n) -> (S, n), row groups ending at `offs`."""
    if _use_kernel(input):
        return _kernel_forward(input, weight, offs)
    out = input.new_zeros(input.shape[0], weight.shape[2])
    for expert, rows in _groups(offs):
        out[rows] = input[rows] @ weight[expert]
    return out


@torch.library.custom_op("lora_fx::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(input: Tensor, grad_output: Tensor, offs: Tensor) -> Tensor:
    """(S, k), (S, n) -> (E, k, n): each group's input transposed times its output gradient."""
    if _use_kernel(input):
        return _kernel_weight_grad(input, grad_output, offs)
    grad = input.new_zeros(offs.shape[0], input.shape[1], grad_output.shape[1])
    for expert, rows in _groups(offs):
        grad[expert] = input[rows].T @ grad_output[rows]
    return grad


def _groups(offs: Tensor):
    """(expert, its rows as a slice) of each group: the loop where the kernel is not used."""
    start = 0
    for expert, end in enumerate(offs.tolist()):
        yield expert, slice(start, end)
        start = end


@grouped_mm.register_fake
def _(input, weight, offs):
    return input.new_empty(input.shape[0], weight.shape[2])


@grouped_mm_weight_grad.register_fake
def _(input, grad_output, offs):
    return input.new_empty(offs.shape[0], input.shape[1], grad_output.shape[1])


def _setup_context(ctx, inputs, output):
    input, weight, offs = inputs
    ctx.save_for_backward(input, weight, offs)


def _backward(ctx, grad_output):
    """dx[s] = dy[s] @ w[g(s)]ᵀ;  dw[e] = x[group e]ᵀ @ dy[group e]."""
    input, weight, offs = ctx.saved_tensors
    grad_input = grouped_mm(grad_output, weight.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    grad_weight = grouped_mm_weight_grad(input, grad_output, offs) if ctx.needs_input_grad[1] else None
    return grad_input, grad_weight, None


grouped_mm.register_autograd(_backward, setup_context=_setup_context)


def grouped_mm_reference(input, weight, offs, bias=None, out_dtype=None):
    """The grouped product in plain torch ops, for exporters: each row gathers its group's matrix; rows past
    offs[-1] are zero. Forms of `aten._grouped_mm` other than (S, k) x (E, k, n) are passed through."""
    if input.dim() != 2 or weight.dim() != 3 or offs is None:
        return aten._grouped_mm.default(input, weight, offs, bias, out_dtype)
    rows = torch.arange(input.shape[0], device=input.device)
    group = (rows.unsqueeze(1) >= offs.unsqueeze(0)).sum(1)                                   # (S,)
    last = weight.shape[0] - 1
    out = torch.bmm(input.unsqueeze(1), weight[group.clamp(max=last)]).squeeze(1)            # (S, n)
    if bias is not None:
        out = out + bias[group.clamp(max=last)]
    out = torch.where((group <= last).unsqueeze(1), out, torch.zeros_like(out))
    return out if out_dtype is None else out.to(out_dtype)


register_export_decomposition(torch.ops.lora_fx.grouped_mm.default, grouped_mm_reference)
register_export_decomposition(aten._grouped_mm.default, grouped_mm_reference)
