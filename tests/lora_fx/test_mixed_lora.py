"""lora_shrink / lora_expand (torch reference and interpreted Triton kernels) against a per-row loop, forward and
gradients; check_adapter_ids' errors."""

import pytest
import torch

from lora_fx.errors import CallError
from lora_fx.ops import check_adapter_ids, lora_expand, lora_shrink
from lora_fx.ops.mixed_lora import CHECK_IDS_OP, EXPAND_OP, SHRINK_OP, shrink_reference

# (input shape, in, out, rank, adapters, ids): ragged segments, rank 1, empty segments (adapters with no rows),
# batch 1, all base, decode (one token per row), a flattened 2-D input (GPT-2 Conv1D reads (batch·L, in))
CASES = [
    ((6, 3), 20, 9, 3, 3, [2, 0, 2, 2, -1, 0]),
    ((4, 5), 7, 12, 1, 2, [1, -1, 0, 1]),
    ((3, 2), 16, 8, 4, 4, [0, 3, 3]),
    ((1, 4), 9, 5, 2, 2, [1]),
    ((2, 3), 6, 6, 2, 2, [-1, -1]),
    ((6, 1), 18, 10, 5, 3, [0, 2, 0, -1, 2, 2]),
    ((15,), 11, 7, 3, 2, [1, 0, -1]),
]


def loop_shrink(x, lora_A, ids):
    rows = x.reshape(len(ids), -1, x.shape[-1])
    out = torch.zeros(*rows.shape[:2], lora_A.shape[1], dtype=x.dtype)
    for row, adapter in enumerate(ids.tolist()):
        if adapter >= 0:
            out[row] = rows[row] @ lora_A[adapter].T
    return out.reshape(*x.shape[:-1], lora_A.shape[1])


def loop_expand(y, h, lora_B, scales, ids):
    rows = h.reshape(len(ids), -1, h.shape[-1])
    out = torch.zeros(*rows.shape[:2], lora_B.shape[1], dtype=h.dtype)
    for row, adapter in enumerate(ids.tolist()):
        if adapter >= 0:
            out[row] = scales[adapter] * rows[row] @ lora_B[adapter].T
    return y + out.reshape(*h.shape[:-1], lora_B.shape[1])


def inputs(case, dtype=torch.float32, seed=0):
    shape, in_features, out_features, rank, adapters, ids = case
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=generator, dtype=dtype).requires_grad_()
    return (rand(*shape, in_features), rand(adapters, rank, in_features), rand(adapters, out_features, rank),
            (torch.rand(adapters, generator=generator, dtype=dtype) + 0.5).requires_grad_(),
            rand(*shape, out_features), torch.tensor(ids))


def forward_and_grads(shrink, expand, tensors, ids):
    out = expand(tensors[4], shrink(tensors[0], tensors[1], ids), tensors[2], tensors[3], ids)
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype)
    grads = torch.autograd.grad(out, tensors, weights, allow_unused=True, materialize_grads=True)
    return out, grads


@pytest.mark.parametrize("case", CASES)
def test_ops_equal_a_per_row_loop_forward_and_gradients(case):
    *tensors, ids = inputs(case)
    got, got_grads = forward_and_grads(lora_shrink, lora_expand, tensors, ids.to(torch.int32))
    want, want_grads = forward_and_grads(loop_shrink, loop_expand, tensors, ids)
    torch.testing.assert_close(got, want)
    for name, g, w in zip(["x", "A", "B", "s", "y"], got_grads, want_grads):
        torch.testing.assert_close(g, w, msg=name)


def test_gradcheck_and_opcheck_in_float64():
    *tensors, ids = inputs(CASES[0], torch.float64)
    x, lora_A, lora_B, scales, y = tensors
    assert torch.autograd.gradcheck(lambda *t: lora_expand(t[4], lora_shrink(t[0], t[1], ids), t[2], t[3], ids),
                                    tensors, fast_mode=True)
    h = lora_shrink(x, lora_A, ids).detach().requires_grad_()
    torch.library.opcheck(SHRINK_OP, (x, lora_A, ids))
    torch.library.opcheck(EXPAND_OP, (y, h, lora_B, scales, ids))
    torch.library.opcheck(EXPAND_OP, (None, h, lora_B, scales, ids))
    torch.library.opcheck(CHECK_IDS_OP, (ids, x, 3))


def test_base_rows_never_read_the_factors():
    x, lora_A, lora_B, scales, y, _ = inputs(CASES[0])
    ids = torch.tensor([-1, 0, -1, 0, 0, -1])
    with torch.no_grad():
        lora_A[1:], lora_B[1:] = float("nan"), float("inf")
    out = lora_expand(y, lora_shrink(x, lora_A, ids), lora_B, scales, ids)
    assert torch.isfinite(out).all()
    assert torch.equal(out[ids < 0], y[ids < 0])


def test_check_adapter_ids_converts_and_names_every_problem():
    like = torch.zeros(3, 4)
    checked = check_adapter_ids(torch.tensor([0, -1, 1], dtype=torch.int32), like, 2)
    assert checked.dtype == torch.int64 and checked.tolist() == [0, -1, 1]
    problems = [(torch.tensor([0.0, 1.0, 1.0]), "must be int32 or int64, got torch.float32"),
                (torch.zeros(3, 1, dtype=torch.int64), r"must be 1-D .* got shape \(3, 1\)"),
                (torch.tensor([0, 1]), "has 2 entries, but the batch has 3 rows"),
                (torch.tensor([0, -2, 2]), r"adapter_ids \[-2, 2\] out of range: .* in \[-1, 1\]"),
                (torch.zeros(3, dtype=torch.int64, device="meta"), "is on meta, but the model's inputs are on cpu")]
    for ids, message in problems:
        with pytest.raises(CallError, match=message):
            check_adapter_ids(ids, like, 2)
    with pytest.raises(CallError, match="do not split into the 4 rows"):
        lora_shrink(torch.zeros(6, 5), torch.zeros(1, 2, 5), torch.zeros(4, dtype=torch.int64))


@pytest.fixture
def triton_kernels(monkeypatch):
    """The Triton kernels, decorated for the interpreter (by tests/conftest.py, or here on a GPU machine); while the
    fixture lasts the ops run them on CPU."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")       # the ops' switch to the kernels on CPU tensors
    kernels = pytest.importorskip("lora_fx.ops.mixed_lora_triton")
    assert kernels.INTERPRETED, "mixed_lora_triton was imported before TRITON_INTERPRET=1 was set"
    return kernels


@pytest.mark.parametrize("case", CASES)
def test_interpreted_triton_kernels_equal_the_loop_forward_and_gradients(case, triton_kernels, monkeypatch):
    *tensors, ids = inputs(case, seed=1)
    calls = []
    for name in ("shrink", "expand"):
        kernel = getattr(triton_kernels, name)
        monkeypatch.setattr(triton_kernels, name, lambda *a, kernel=kernel, name=name: calls.append(name) or kernel(*a))
    got, got_grads = forward_and_grads(lora_shrink, lora_expand, tensors, ids)
    assert calls.count("shrink") == 2 and calls.count("expand") == 2     # forward, and dx / dh in the backward
    want, want_grads = forward_and_grads(loop_shrink, loop_expand, tensors, ids)
    torch.testing.assert_close(got, want)
    for name, g, w in zip(["x", "A", "B", "s", "y"], got_grads, want_grads):
        torch.testing.assert_close(g, w, msg=name)


def test_interpreted_triton_shrink_draws_the_counter_stream(triton_kernels):
    """With a seed, the Triton shrink drops x out as it loads its tiles, with the masks of the CPU path
    (`lora_fx.ops.counter_masks`): the same outputs, and through the op the gradients of the same masks."""
    x, lora_A, _, _, _, ids = (t.detach() for t in inputs(CASES[0], seed=3))
    seed = torch.tensor(2 ** 40 + 12345)
    got = triton_kernels.shrink(x, lora_A, ids, seed, 0.3)
    torch.testing.assert_close(got, shrink_reference(x, lora_A, ids, seed, 0.3))
    assert not torch.allclose(got, shrink_reference(x, lora_A, ids), atol=1e-2)          # dropout is live
    (x_ours, A_ours), (x_want, A_want) = [(x.clone().requires_grad_(), lora_A.clone().requires_grad_())
                                          for _ in range(2)]
    grad_h = torch.randn(got.shape)
    lora_shrink(x_ours, A_ours, ids, seed, 0.3).backward(grad_h)
    shrink_reference(x_want, A_want, ids, seed, 0.3).backward(grad_h)
    torch.testing.assert_close(x_ours.grad, x_want.grad)
    torch.testing.assert_close(A_ours.grad, A_want.grad)


def test_interpreted_triton_kernels_in_half_precision_and_transposed_weights(triton_kernels):
    x, lora_A, lora_B, scales, y, ids = (t.detach() for t in inputs(CASES[0], seed=2))
    for dtype in (torch.bfloat16, torch.float64):
        args = (x.to(dtype), lora_A.to(dtype), ids)
        torch.testing.assert_close(triton_kernels.shrink(*args), loop_shrink(*args), rtol=2e-2, atol=2e-2)
    wide_A = lora_B.transpose(1, 2)             # (K, R, out) read through its strides, as the backward does
    h = torch.randn(6, 3, 9)
    torch.testing.assert_close(triton_kernels.shrink(h, wide_A, ids), loop_shrink(h, wide_A, ids))
    torch.testing.assert_close(triton_kernels.expand(None, h[..., :3], lora_B, scales, ids),
                               loop_expand(0, h[..., :3], lora_B, scales, ids))
