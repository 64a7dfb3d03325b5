"""`lora_fx::grouped_mm`: equals a per-group loop of matmuls (outputs and both gradients) for every dtype path, any
rank (no 16-byte alignment needed) and strided operands; a frozen weight is never copied nor given a gradient; its
export decomposition equals it on the grouped rows."""

import pytest
import torch
from torch.profiler import profile

from lora_fx.ops.grouped_mm import grouped_mm, grouped_mm_reference


def loop(x, w, offs):
    out, start = x.new_zeros(x.shape[0], w.shape[2]), 0
    for expert, end in enumerate(offs.tolist()):
        out[start:end] = x[start:end] @ w[expert]
        start = end
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("k, n", [(3, 5), (16, 8)])
def test_grouped_mm_equals_a_loop_over_groups_with_gradients(dtype, k, n):
    generator = torch.Generator().manual_seed(0)
    offs = torch.tensor([2, 2, 7, 11], dtype=torch.int32)               # an empty group included
    x = torch.randn(11, k, generator=generator).to(dtype).requires_grad_()
    w = torch.randn(4, n, k, generator=generator).to(dtype).transpose(1, 2).requires_grad_()   # strided (E, k, n)
    out = grouped_mm(x, w, offs)
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    expected = loop(x_ref, w_ref, offs)
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(out, expected, **tolerance)
    grad = torch.randn(out.shape, generator=generator).to(dtype)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, **tolerance)
    torch.testing.assert_close(w.grad, w_ref.grad, **tolerance)


def test_export_decomposition_equals_the_op_on_grouped_rows():
    generator = torch.Generator().manual_seed(1)
    offs = torch.tensor([3, 3, 6], dtype=torch.int32)
    x, w = torch.randn(8, 4, generator=generator), torch.randn(3, 4, 2, generator=generator)
    reference = grouped_mm_reference(x, w, offs)
    torch.testing.assert_close(reference[:6], grouped_mm(x, w, offs)[:6])
    assert torch.equal(reference[6:], torch.zeros(2, 2))               # rows past offs[-1]: zero


def test_a_frozen_weight_read_transposed_is_neither_copied_nor_given_a_gradient():
    generator = torch.Generator().manual_seed(2)
    offs = torch.tensor([4, 9], dtype=torch.int32)
    x = torch.randn(9, 8, generator=generator).requires_grad_()
    stored = torch.randn(2, 12, 8, generator=generator)                 # (E, out, in), read as (E, in, out)
    grad = torch.ones(9, 12)
    with profile(profile_memory=True) as prof:
        grouped_mm(x, stored.transpose(1, 2), offs).backward(grad)
    allocated = [event.self_cpu_memory_usage for event in prof.events() if event.self_cpu_memory_usage > 0]
    assert sorted(allocated) == [9 * 8 * 4, 9 * 12 * 4]                   # the output and dx: no copy of W, no dW
    expected = torch.cat([torch.ones(4, 12) @ stored[0], torch.ones(5, 12) @ stored[1]])    # dx[s] = dy[s] @ W[g(s)]
    torch.testing.assert_close(x.grad, expected)
