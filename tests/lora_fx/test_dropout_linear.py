"""`lora_fx::dropout_linear`: the same draws, outputs and gradients as `linear(dropout(x, p), A)`, and no dropped copy
of x saved for the backward: the mask is kept packed, a bit an element."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lora_fx.ops import DROPOUT_LINEAR
from lora_fx.ops.dropout_linear import pack_mask, unpack_mask


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
    h, packed = DROPOUT_LINEAR(x, A, p)
    grads = torch.autograd.grad(h, (x, A), grad_h)
    assert torch.equal(h, expected)
    torch.manual_seed(3)
    kept = torch.nn.functional.dropout(torch.ones(shape), p, True) != 0
    assert torch.equal(unpack_mask(packed, x.shape), kept) and 0 < kept.float().mean() < 1
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_saves_x_and_a_bit_an_element_but_no_dropped_copy():
    x = torch.randn(3, 5, 16, requires_grad=True)
    A = torch.randn(4, 16, requires_grad=True)
    plain = saved_tensors(lambda: torch.nn.functional.linear(torch.nn.functional.dropout(x, 0.2, True), A))
    ours = saved_tensors(lambda: DROPOUT_LINEAR(x, A, 0.2))
    same_size_floats = lambda saved: [t for t in saved if t.numel() == x.numel() and t.is_floating_point()]
    assert len(same_size_floats(plain)) == 2                     # the dropped copy and the noise
    assert [t.data_ptr() for t in same_size_floats(ours)] == [x.data_ptr()]        # x itself
    assert [(t.dtype, t.numel()) for t in ours if t.data_ptr() not in (x.data_ptr(), A.data_ptr())] == [
        (torch.uint8, 3 * 5 * 16 // 8)]                                            # and the packed mask


@pytest.mark.parametrize("shape", [(3, 5, 7), (64,), (9,), (2, 0, 4)])
def test_packed_masks_hold_bit_j_of_byte_i_for_element_8i_plus_j(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.3
    packed = pack_mask(mask)
    padded = torch.nn.functional.pad(mask.reshape(-1).to(torch.int32), (0, -mask.numel() % 8)).view(-1, 8)
    assert packed.dtype == torch.uint8 and torch.equal(packed, (padded << torch.arange(8)).sum(-1).to(torch.uint8))
    assert torch.equal(unpack_mask(packed, mask.shape), mask)


def test_only_the_gradients_asked_for():
    x = torch.randn(3, 16)
    A = torch.randn(4, 16, requires_grad=True)
    h, _ = DROPOUT_LINEAR(x, A, 0.2)
    (grad,) = torch.autograd.grad(h.sum(), (A,))
    assert grad.shape == A.shape


def test_fake_kernel_shapes():
    with FakeTensorMode():
        h, packed = DROPOUT_LINEAR(torch.empty(2, 9, 15), torch.empty(4, 15), 0.1)
    assert h.shape == (2, 9, 4) and packed.shape == (34,) and packed.dtype == torch.uint8      # 270 bits
