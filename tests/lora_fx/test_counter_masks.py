"""Counter-based LoRA dropout (`lora_fx.ops.counter_masks`, the default in training graphs): the rate and scale of
`nn.Dropout`, masks independent across sites, steps and elements, reproducible from `torch.manual_seed` eager and
compiled alike, the backward on the forward's mask, and nothing but x and a seed kept for the backward.

Masks are read off a graph whose three sibling sites (q, k, v reading one x) have zero base weights and identity
factors (rank = width, alpha = rank: s = 1), so each output is exactly that site's dropout(x)."""

import math
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import lora_fx
from lora_fx import LoraSpec
from lora_fx.ops import COUNTER_DROPOUT, COUNTER_DROPOUT_LINEAR
from lora_fx.ops import counter_masks
from tests.conftest import assert_graph_unchanged, graph_snapshot
from tests.lora_fx.test_dropout_linear import saved_tensors

P = 0.1


class Siblings(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(width, width, bias=False) for _ in range(3))
        for linear in (self.q, self.k, self.v):
            torch.nn.init.zeros_(linear.weight)

    def forward(self, x):
        return self.q(x), self.k(x), self.v(x)


def identity_sites(width: int, rows: int, p: float = P):
    """The Siblings graph in training mode: out_site = dropout_site(x) exactly."""
    gm = lora_fx.apply(Siblings(width).train(), LoraSpec(rank=width, alpha=float(width), dropout=p),
                       example_args=(torch.ones(rows, width),))
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.eye(width))
    return gm


def masks(gm, x, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return [out != 0 for out in gm(x)]


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_rate_and_scale_are_dropouts_within_binomial_bounds(p):
    dropped = COUNTER_DROPOUT(torch.ones(1000, 600), torch.tensor(0x5DEECE66D), p)              # 600k draws
    kept = dropped != 0
    sigma = math.sqrt(p * (1 - p) / kept.numel())
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * sigma
    assert torch.equal(dropped[kept], torch.full_like(dropped[kept], 1 / (1 - p)))


def test_sites_steps_and_neighbouring_elements_are_uncorrelated():
    """Three siblings reading one x, two steps: 614k draws a site; every correlation within 5/sqrt(n) of 0."""
    gm = identity_sites(width=512, rows=1200)
    x = torch.ones(1200, 512)
    q, k, v = masks(gm, x, seed=0)
    q_next_step, *_ = gm(x)
    bound = 5 / math.sqrt(q.numel())
    pairs = {"q, k": (q, k), "k, v": (k, v), "q, v": (q, v), "two steps": (q, q_next_step != 0),
             "next element": (q.reshape(-1)[1:], q.reshape(-1)[:-1]), "next row": (q[1:], q[:-1])}
    for name, (a, b) in pairs.items():
        assert abs(correlation(a, b)) < bound, name
    everything = torch.stack([q, k, v])
    sigma = math.sqrt(P * (1 - P) / everything.numel())
    assert abs(everything.double().mean().item() - (1 - P)) < 5 * sigma


def test_same_seed_same_masks_and_another_seed_other_masks():
    gm = identity_sites(width=32, rows=64)
    x = torch.ones(64, 32)
    first, again, other = masks(gm, x, seed=3), masks(gm, x, seed=3), masks(gm, x, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all((a != b).sum() > 100 for a, b in zip(first, other))


def check_gradients_use_the_forward_mask(gm, call):
    """loss = <out_q, G>: ∂x = mask_q ⊙ G / (1 − p) and ∂A_q = Gᵀ·out_q, with mask_q the one the forward drew."""
    x = torch.randn(64, 32, requires_grad=True)
    grad = torch.randn(64, 32)
    torch.manual_seed(5)
    out_q, _, _ = call(x)
    (out_q * grad).sum().backward()
    mask = out_q != 0
    assert 0 < mask.double().mean() < 1
    torch.testing.assert_close(x.grad, torch.where(mask, grad / (1 - P), 0), rtol=1e-6, atol=1e-6)
    lora_A = next(param for name, param in gm.named_parameters() if name.startswith("q.lora_A"))
    torch.testing.assert_close(lora_A.grad, grad.t() @ out_q.detach(), rtol=1e-5, atol=1e-5)
    return mask


def test_gradients_use_the_forward_mask():
    gm = identity_sites(width=32, rows=64)
    check_gradients_use_the_forward_mask(gm, gm)


@pytest.mark.slow
def test_compiled_draws_the_eager_masks_and_gradients():
    """`torch.compile`: Inductor decomposes the backward's mask into the hash (the forward op stays opaque);
    from the same seed, the same masks and gradients as eager."""
    gm = identity_sites(width=32, rows=64)
    eager = check_gradients_use_the_forward_mask(gm, gm)
    gm.zero_grad()
    compiled = check_gradients_use_the_forward_mask(gm, torch.compile(gm, fullgraph=True))
    assert torch.equal(compiled, eager)


def test_keeps_x_and_a_seed_but_no_mask():
    x = torch.randn(3, 5, 16, requires_grad=True)
    lora_A = torch.randn(4, 16, requires_grad=True)
    seed = torch.tensor(12345)
    saved = saved_tensors(lambda: COUNTER_DROPOUT_LINEAR(x, lora_A, seed, 0.2))
    assert {t.data_ptr() for t in saved} == {x.data_ptr(), lora_A.data_ptr(), seed.data_ptr()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_eager_kernel_equals_the_reference(dtype):
    """The ops' eager kernel is the reference compiled by Inductor over x flattened: the same values, also for a
    non-contiguous x (counters are row-major logical indices)."""
    x = torch.randn(300, counter_masks.COMPILE_FROM // 256, dtype=dtype).t()
    seed = torch.tensor(2 ** 62 + 977)
    assert torch.equal(COUNTER_DROPOUT(x, seed, 0.25), counter_masks.dropout_reference(x, seed, 0.25))


def test_where_the_eager_kernel_cannot_compile_the_reference_runs_with_a_warning(monkeypatch):
    def no_compiler(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(counter_masks, "_eager_kernel", lambda: no_compiler)
    monkeypatch.setattr(counter_masks, "_compile_failures", [])
    x, seed = torch.randn(counter_masks.COMPILE_FROM), torch.tensor(7)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler.*the same masks"):
        first = COUNTER_DROPOUT(x, seed, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                            # once
        assert torch.equal(COUNTER_DROPOUT(x, seed, 0.5), first)
    assert torch.equal(first, counter_masks.dropout_reference(x, seed, 0.5))


def test_inputs_beyond_32_bit_counters_are_refused():
    with FakeTensorMode(), pytest.raises(RuntimeError, match="32-bit counters: an input of 4294967297 elements"):
        COUNTER_DROPOUT(torch.empty(2 ** 32 + 1), torch.empty((), dtype=torch.int64), 0.1)


def test_peft_draws_are_an_explicit_validated_opt_in():
    gm = identity_sites(width=8, rows=4)
    assert gm.meta["lora_fx"].dropout_masks == "counter"
    before = graph_snapshot(gm)
    with pytest.raises(ValueError, match="unknown dropout masks 'bernoulli': valid values are 'counter', 'peft'"):
        lora_fx.dropout_masks(gm, "bernoulli")
    assert_graph_unchanged(gm, before)
    assert lora_fx.dropout_masks(gm, "peft") is gm and gm.meta["lora_fx"].dropout_masks == "peft"
    state = gm.meta["lora_fx"]
    assert lora_fx.dropout_masks(gm, "peft").meta["lora_fx"] is state             # idempotent: nothing committed
