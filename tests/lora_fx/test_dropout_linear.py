"""`lora_fx::dropout_linear`: the same draws, outputs and gradients as `linear(dropout(x, p), A)`, and no dropped copy
of x saved for the backward."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lora_fx.ops import DROPOUT_LINEAR


def saved_tensors(run) -> list[torch.Tensor]:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        run()
    return saved


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("shape", [(3, 5, 16), (7, 16)])
def test_equals_dropout_then_linear_from_the_same_seed(p, shape):
    x = torch.randn(shape, requires_grad=True)
    A = torch.randn(4, 16, requires_grad=True)
    grad_h = torch.randn(*shape[:-1], 4)
    torch.manual_seed(3)
    expected = torch.nn.functional.linear(torch.nn.functional.dropout(x, p, True), A)
    expected_grads = torch.autograd.grad(expected, (x, A), grad_h)
    torch.manual_seed(3)
    h, mask = DROPOUT_LINEAR(x, A, p)
    grads = torch.autograd.grad(h, (x, A), grad_h)
    assert torch.equal(h, expected)
    assert mask.dtype == torch.bool and 0 < mask.float().mean() < 1
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_saves_x_and_a_bool_mask_but_no_dropped_copy():
    x = torch.randn(3, 5, 16, requires_grad=True)
    A = torch.randn(4, 16, requires_grad=True)
    plain = saved_tensors(lambda: torch.nn.functional.linear(torch.nn.functional.dropout(x, 0.2, True), A))
    ours = saved_tensors(lambda: DROPOUT_LINEAR(x, A, 0.2))
    same_size_floats = lambda saved: [t for t in saved if t.numel() == x.numel() and t.is_floating_point()]
    assert len(same_size_floats(plain)) == 2                     # the dropped copy and the noise
    assert [t.data_ptr() for t in same_size_floats(ours)] == [x.data_ptr()]        # x itself, nothing else
    assert [t.dtype for t in ours if t.numel() == x.numel() and not t.is_floating_point()] == [torch.bool]


def test_only_the_gradients_asked_for():
    x = torch.randn(3, 16)
    A = torch.randn(4, 16, requires_grad=True)
    h, _ = DROPOUT_LINEAR(x, A, 0.2)
    (grad,) = torch.autograd.grad(h.sum(), (A,))
    assert grad.shape == A.shape


def test_fake_kernel_shapes():
    with FakeTensorMode():
        h, mask = DROPOUT_LINEAR(torch.empty(2, 9, 16), torch.empty(4, 16), 0.1)
    assert h.shape == (2, 9, 4) and mask.shape == (2, 9, 16) and mask.dtype == torch.bool
