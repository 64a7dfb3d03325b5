"""Property tests: on random attention/MLP stacks and random specs, lora_fx equals an eager reference LoRA, and
applying twice equals applying once."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import lora_fx
from lora_fx import LoraSpec, TargetError
from tests.conftest import randomize_lora

LEAVES = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}


class Attention(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        for name in LEAVES["attn"]:
            setattr(self, name, torch.nn.Linear(width, width, bias=name == "q"))

    def forward(self, x):                         # x: (batch, seq, width)
        weights = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / x.shape[-1] ** 0.5, dim=-1)
        return self.o(weights @ self.v(x))


class GatedMLP(torch.nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.gate, self.up = torch.nn.Linear(width, hidden), torch.nn.Linear(width, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, width)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


class Stack(torch.nn.Module):
    def __init__(self, kinds, width, hidden):
        super().__init__()
        self.layers = torch.nn.ModuleList(Attention(width) if k == "attn" else GatedMLP(width, hidden) for k in kinds)
        self.head = torch.nn.Linear(width, 3)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


class ReferenceLora(torch.nn.Module):
    """Eager LoRA: y = base(x) + sum over adapters of (x A^T B^T) * s."""

    def __init__(self, base, branches):
        super().__init__()
        self.base, self.branches = base, branches

    @property
    def weight(self):          # as PEFT's layers do: code that reads `.weight` sees the base weight
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x):
        return self.base(x) + sum((x @ A.T @ B.T) * s for A, B, s in self.branches)


def reference(model, gm):
    ref = copy.deepcopy(model)
    state = gm.meta["lora_fx"]
    for fqn in {f for sites in state.sites.values() for f in sites}:
        branches = [(gm.get_parameter(f"{fqn}.lora_A.{a}.weight").detach(), gm.get_parameter(
            f"{fqn}.lora_B.{a}.weight").detach(), spec.scale_for(fqn)) for a, spec in state.specs.items()
            if fqn in state.sites[a]]
        parent, _, leaf = fqn.rpartition(".")
        owner = ref.get_submodule(parent) if parent else ref
        setattr(owner, leaf, ReferenceLora(getattr(owner, leaf), branches))
    return ref


@st.composite
def specs(draw, names, adapter="default"):
    kind = draw(st.sampled_from(["all-linear", "list", "regex"]))
    listed = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
    alternatives = draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    targets = {"all-linear": "all-linear", "list": listed, "regex": r".*\.(" + "|".join(alternatives) + ")"}[kind]
    return LoraSpec(targets=targets, adapter=adapter, rank=draw(st.integers(1, 4)),
                    alpha=draw(st.sampled_from([1.0, 4.0, 16.0])), use_rslora=draw(st.booleans()),
                    layers=draw(st.none() | st.lists(st.integers(0, 2), min_size=1, max_size=2)),
                    exclude=draw(st.none() | st.lists(st.sampled_from(names), min_size=1, max_size=1)),
                    rank_pattern=draw(st.none() | st.just({names[0]: 5})))


@st.composite
def cases(draw):
    kinds = draw(st.lists(st.sampled_from(["attn", "mlp"]), min_size=1, max_size=3))
    names = sorted({n for k in kinds for n in LEAVES[k]})
    return kinds, draw(specs(names)), draw(st.none() | specs(names, adapter="second")), draw(st.booleans())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_matches_eager_reference_and_is_idempotent(case):
    kinds, spec, second, use_fx = case
    torch.manual_seed(0)
    model = Stack(kinds, width=8, hidden=12).eval()
    example = () if use_fx else (torch.randn(2, 5, 8),)
    try:
        gm = lora_fx.capture(model, *([example] if example else []))
        lora_fx.apply(gm, spec)
        if second is not None:
            lora_fx.apply(gm, second)
    except TargetError as err:
        assert "selects no site" in str(err)
        event("spec selects no site")
        return
    event("compared with the reference")
    randomize_lora(gm)
    x = torch.randn(3, 4, 8)
    expected = reference(model, gm)(x)
    assert not torch.allclose(expected, model(x), atol=1e-4)
    torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)

    code, params = gm.code, dict(gm.named_parameters())
    lora_fx.apply(gm, spec)
    assert gm.code == code and dict(gm.named_parameters()) == params
