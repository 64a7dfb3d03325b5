"""expand_layout: in training graphs a low-rank expand reads its input stored rank-major, so that autograd computes
∂h and ∂B as products with r rows; the same values as `linear`."""

import torch
from torch.profiler import ProfilerActivity, profile

import lora_fx
from lora_fx import LoraSpec
from tests.conftest import all_nodes, randomize_lora


class Projection(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(64, 48, bias=False)

    def forward(self, x):
        return self.proj(x)


def roles(gm) -> list[str]:
    return [node.meta["lora_fx"]["role"] for node in all_nodes(gm) if "lora_fx" in node.meta]


def outputs_gradients_and_products(gm, x):
    """gm(x), the gradients of x and the LoRA factors, and the input shapes of every `mm` on the way."""
    x = x.clone().requires_grad_()
    lora = [param for param in gm.parameters() if param.requires_grad]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out = gm(x)
        grads = torch.autograd.grad(out.square().sum(), [x, *lora])
    return out, grads, [event.input_shapes for event in prof.events() if event.name == "aten::mm"]


def test_expand_gradients_are_products_with_r_rows_and_equal_linear_s():
    """The eval graph (no training passes, no dropout: the same function) is the oracle."""
    torch.manual_seed(0)
    gm = lora_fx.apply(Projection(), LoraSpec(targets=["proj"], rank=4), example_args=(torch.randn(2, 5, 64),))
    randomize_lora(gm)
    x = torch.randn(3, 7, 64)                                                          # 21 rows
    out, grads, products = outputs_gradients_and_products(gm.train(), x)
    assert roles(gm).count("rank_major") == 1
    assert [[4, 48], [48, 21]] in products and [[4, 21], [21, 48]] in products        # ∂hᵀ = B·∂yᵀ, ∂Bᵀ = hᵀ·∂y
    assert [[21, 48], [48, 4]] not in products and [[48, 21], [21, 4]] not in products    # ∂y·B, ∂yᵀ·h
    expected, expected_grads, linear_products = outputs_gradients_and_products(gm.eval(), x)
    assert "rank_major" not in roles(gm) and [[21, 48], [48, 4]] in linear_products
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_expands_from_rank_16_are_left_alone():
    gm = lora_fx.apply(Projection(), LoraSpec(targets=["proj"], rank=16), example_args=(torch.randn(2, 5, 64),))
    assert "rank_major" not in roles(gm.train()) and "up" in roles(gm)
