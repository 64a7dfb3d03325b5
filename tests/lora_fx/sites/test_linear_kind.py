"""The linear kind: a weight read as x·Wᵀ, x·W or W·x, through transposes, slices and casts, is adapted at every
read with one delta; checked against the model run with W + s·B·A (outputs and LoRA gradients)."""

import copy

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx import LoraSpec, TargetError
from tests.conftest import randomize_lora


class MatmulForms(nn.Module):
    def __init__(self):
        super().__init__()
        for name in "abcdefg":
            setattr(self, name, nn.Linear(8, 8))

    def forward(self, x):                                     # x: (batch, seq, 8)
        y = x @ self.a.weight.T                               # numpy_T + matmul
        y = y + torch.matmul(x, self.b.weight.t())            # t + matmul
        y = y + nn.functional.linear(x.double(), self.c.weight.double()).float()     # a cast on the way
        y = y + x[..., :6] @ self.d.weight[:, :6].transpose(0, 1)                      # a column slice
        y = y + nn.functional.pad(x @ self.e.weight[:4].T, (0, 4))                    # a row slice
        y = y + (self.f.weight @ x.transpose(-1, -2)).transpose(-1, -2)               # weight on the left
        return self.g(y) + x @ self.g.weight                  # two layouts of one weight


def reference(model, factors):
    """The model with each adapted weight replaced by W + s·B·A (A, B leaf copies, for gradients)."""
    merged = copy.deepcopy(model)
    for name, (A, B, scale) in factors.items():
        module = merged.get_submodule(name)
        weight = module.weight.detach()
        del module.weight
        module.weight = weight + scale * B @ A
    return merged


def test_every_matmul_form_is_adapted_with_one_delta():
    torch.manual_seed(0)
    model = MatmulForms()
    gm = lora_fx.apply(model, LoraSpec(targets=list("abcdefg"), rank=2, alpha=3.0), (torch.randn(2, 5, 8),))
    info = gm.meta["lora_fx"].site_info
    assert {key: site.op for key, site in info.items()} == {
        "a": "matmul", "b": "matmul", "c": "linear", "d": "matmul", "e": "matmul", "f": "matmul",
        "g": "linear+matmul"}
    randomize_lora(gm)
    factors = {name: tuple(t.clone().requires_grad_() if i < 2 else t for i, t in enumerate(weights))
               for name, weights in lora_fx.adapter_weights(gm, "default").items()}
    x = torch.randn(3, 4, 8)
    ours, expected = gm(x), reference(model, factors)(x)
    assert not torch.allclose(expected, model(x), atol=1e-3)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora_fx.merge(gm)(x), expected, rtol=1e-5, atol=1e-5)
    ours.pow(2).sum().backward()
    expected.pow(2).sum().backward()
    for name, (A, B, _) in factors.items():
        torch.testing.assert_close(gm.get_parameter(f"{name}.lora_A.default.weight").grad, A.grad, rtol=1e-4,
                                   atol=1e-5)
        torch.testing.assert_close(gm.get_parameter(f"{name}.lora_B.default.weight").grad, B.grad, rtol=1e-4,
                                   atol=1e-5)


class Router(nn.Module):
    """A raw-parameter router, as MoE models write them: not an nn.Linear."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 8))

    def forward(self, x):
        return nn.functional.linear(x, self.weight)


class WithRouter(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.gate = nn.Linear(8, 8), Router()

    def forward(self, x):
        return self.gate(self.proj(x)).softmax(-1)


def test_all_linear_is_pefts_module_set_and_raw_parameters_need_an_explicit_target():
    torch.manual_seed(0)
    gm = lora_fx.capture(WithRouter(), (torch.randn(2, 8),))
    lora_fx.apply(gm, LoraSpec(rank=2))
    assert gm.meta["lora_fx"].sites["default"] == ("proj",)
    lora_fx.apply(gm, LoraSpec(targets=["gate"], rank=2, adapter="router"))
    assert gm.meta["lora_fx"].sites["router"] == ("gate",)


def test_a_read_no_kind_understands_is_refused_naming_the_op():
    class Normed(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x) / self.proj.weight.norm()

    gm = lora_fx.capture(Normed(), (torch.randn(2, 4),))
    with pytest.raises(TargetError, match=r"'proj' is targeted but its weight is also read by \['linalg_vector_norm'\]"):
        lora_fx.apply(gm, LoraSpec(targets=["proj"]))
    assert lora_fx.adapters(gm) == []
