"""`lora_fx::grouped_mm`: equals a per-group loop of matmuls (outputs and both gradients) for every dtype path, any
rank (no 16-byte alignment needed) and strided operands; its export decomposition equals it on the grouped rows."""

import pytest
import torch

from lora_fx.grouped_mm import grouped_mm, grouped_mm_reference


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
