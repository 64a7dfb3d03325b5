"""Property tests: on random attention/MLP stacks and random specs, lora_fx equals an eager reference LoRA built
from the spec's fields and the model alone (PEFT's target rules written out here, never lora_fx's matching or
scales), in parameter names, outputs and gradients; and applying twice equals applying once."""

import copy
import re

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import lora_fx
from lora_fx import LoraSpec, TargetError
from tests.conftest import ReferenceLora, all_code, randomize_lora

# `proj` is a suffix of `up_proj` but not a dotted one: PEFT's name rules tell the two apart
LEAVES = {"attn": ("q", "k", "v", "proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


class Attention(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        for name in LEAVES["attn"]:
            setattr(self, name, torch.nn.Linear(width, width, bias=name == "q"))

    def forward(self, x):                         # x: (batch, seq, width)
        weights = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / x.shape[-1] ** 0.5, dim=-1)
        return self.proj(weights @ self.v(x))


class GatedMLP(torch.nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.gate_proj, self.up_proj = torch.nn.Linear(width, hidden), torch.nn.Linear(width, hidden, bias=False)
        self.down_proj = torch.nn.Linear(hidden, width)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Stack(torch.nn.Module):
    """A plain module: it has no output layer, so "all-linear" includes `head` (PEFT, for any nn.Module)."""

    def __init__(self, kinds, width, hidden):
        super().__init__()
        self.layers = torch.nn.ModuleList(Attention(width) if k == "attn" else GatedMLP(width, hidden) for k in kinds)
        self.head = torch.nn.Linear(width, 3)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


class LanguageModelStack(Stack):
    """Names `head` as its output layer the way transformers models do, so "all-linear" skips it (PEFT, for a
    PreTrainedModel)."""

    def get_output_embeddings(self):
        return self.head


def linear_names(kinds) -> list[str]:
    return [f"layers.{i}.{leaf}" for i, kind in enumerate(kinds) for leaf in LEAVES[kind]] + ["head"]


# The oracle. `options` are the keyword arguments a LoraSpec was built from.

def names_match(pattern, name: str) -> bool:
    """PEFT's `target_modules`/`exclude_modules`: a str is a full-match regex; a list holds exact names or dotted
    suffixes."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in pattern)


def pattern_value(patterns, name: str, default):
    """PEFT's `rank_pattern`/`alpha_pattern`: the first key (in dict order) matching a dotted suffix of `name`."""
    return next((value for key, value in (patterns or {}).items() if re.match(rf"(.*\.)?({key})$", name)), default)


def selects(options: dict, name: str, output_layer: str | None) -> bool:
    if options["targets"] == "all-linear":
        targeted = name != output_layer
    else:
        targeted = names_match(options["targets"], name)
    excluded = options["exclude"] is not None and names_match(options["exclude"], name)
    layer = next((int(part) for part in name.split(".") if part.isdigit()), None)
    in_layers = options["layers"] is None or layer in options["layers"]
    return targeted and not excluded and in_layers


def expected_branches(model: torch.nn.Module, options: dict) -> dict[str, tuple[int, float]]:
    """{linear module name: (rank, scale)} for the sites `options` adapt; scale = alpha/r, or alpha/sqrt(r)."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if get_output else None
    output_layer = next((name for name, module in model.named_modules() if module is output), None)
    branches = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and selects(options, name, output_layer):
            rank = pattern_value(options["rank_pattern"], name, options["rank"])
            alpha = pattern_value(options["alpha_pattern"], name, options["alpha"])
            branches[name] = (rank, alpha / (rank ** 0.5 if options["use_rslora"] else rank))
    return branches


def factor_names(fqn: str, adapter: str) -> tuple[str, str]:
    return f"{fqn}.lora_A.{adapter}.weight", f"{fqn}.lora_B.{adapter}.weight"


def reference(model, expected: dict, factors: dict) -> torch.nn.Module:
    """A copy of `model` whose adapted linears run ReferenceLora. `expected`: {adapter: {fqn: (rank, scale)}};
    `factors`: PEFT name -> tensor."""
    ref = copy.deepcopy(model)
    for fqn in {fqn for branches in expected.values() for fqn in branches}:
        branches = [(*(factors[name] for name in factor_names(fqn, adapter)), sites[fqn][1])
                    for adapter, sites in expected.items() if fqn in sites]
        parent, _, leaf = fqn.rpartition(".")
        owner = ref.get_submodule(parent)
        setattr(owner, leaf, ReferenceLora(getattr(owner, leaf), branches))
    return ref


# Random specs, as LoraSpec keyword arguments.

@st.composite
def name_patterns(draw, kinds):
    """A list of exact names / dotted suffixes of linear modules, or a regex that names at least one of them."""
    names = linear_names(kinds)
    suffixes = sorted({".".join(parts[i:]) for parts in (n.split(".") for n in names) for i in range(len(parts))})
    kind = draw(st.sampled_from(["list", "leaf regex", "layer regex"]))
    if kind == "list":
        return draw(st.lists(st.sampled_from(suffixes), min_size=1, max_size=3, unique=True))
    if kind == "leaf regex":
        leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
        return r"(.*\.)?(" + "|".join(draw(st.lists(st.sampled_from(leaves), min_size=1, unique=True))) + ")"
    indices = draw(st.lists(st.sampled_from(range(len(kinds))), min_size=1, unique=True))
    return r"layers\.(" + "|".join(map(str, indices)) + r")\..*"


@st.composite
def pattern_maps(draw, kinds, values):
    """A `rank_pattern`/`alpha_pattern`: 1-2 keys that may overlap, so dict order matters."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linear_names(kinds)})
    keys = st.lists(st.sampled_from(leaves), min_size=1, max_size=2, unique=True).map("|".join)
    return draw(st.dictionaries(keys, values, min_size=1, max_size=2))


@st.composite
def spec_options(draw, kinds, adapter):
    return dict(targets=draw(st.just("all-linear") | name_patterns(kinds)), adapter=adapter,
                rank=draw(st.integers(1, 4)), alpha=draw(st.sampled_from([1.0, 4.0, 16.0])),
                use_rslora=draw(st.booleans()),
                layers=draw(st.none() | st.lists(st.integers(0, 2), min_size=1, max_size=2, unique=True)),
                exclude=draw(st.none() | name_patterns(kinds)),
                rank_pattern=draw(st.none() | pattern_maps(kinds, st.integers(1, 6))),
                alpha_pattern=draw(st.none() | pattern_maps(kinds, st.sampled_from([2.0, 8.0, 32.0]))))


@st.composite
def cases(draw):
    kinds = draw(st.lists(st.sampled_from(["attn", "mlp"]), min_size=1, max_size=3))
    options = [draw(spec_options(kinds, "default"))] + draw(st.lists(spec_options(kinds, "second"), max_size=1))
    return kinds, draw(st.sampled_from([Stack, LanguageModelStack])), options, draw(st.booleans())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_matches_eager_reference_and_is_idempotent(case):
    kinds, model_class, options, use_fx = case
    torch.manual_seed(0)
    model = model_class(kinds, width=8, hidden=12).eval()
    gm = lora_fx.capture(model) if use_fx else lora_fx.capture(model, (torch.randn(2, 5, 8),))
    expected, applied = {}, []
    for fields in options:
        spec, branches = LoraSpec(**fields), expected_branches(model, fields)
        if not branches:
            with pytest.raises(TargetError, match="selects no site"):
                lora_fx.apply(gm, spec)
            continue
        lora_fx.apply(gm, spec)
        expected[spec.adapter] = branches
        applied.append(spec)

    wanted = {name for adapter, branches in expected.items() for fqn in branches for name in factor_names(fqn, adapter)}
    assert {name for name in gm.state_dict() if ".lora_" in name} == wanted
    assert {name for name, param in gm.named_parameters() if param.requires_grad} == wanted
    if not expected:
        event("no spec selects a site")
        return
    event(f"compared {len(expected)} adapter(s) with the reference")

    randomize_lora(gm)
    factors = {name: gm.get_parameter(name).detach().clone().requires_grad_() for name in wanted}
    for adapter, branches in expected.items():
        for fqn, (rank, _) in branches.items():
            in_features, out_features = model.get_submodule(fqn).in_features, model.get_submodule(fqn).out_features
            A, B = factor_names(fqn, adapter)
            assert (factors[A].shape, factors[B].shape) == ((rank, in_features), (out_features, rank)), (fqn, adapter)
    x, loss_weights = torch.randn(3, 4, 8), torch.randn(3, 4, 3)
    ours, theirs = gm(x), reference(model, expected, factors)(x)
    assert not torch.allclose(theirs, model(x), atol=1e-4)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    names = sorted(wanted)
    our_grads = torch.autograd.grad((ours * loss_weights).sum(), [gm.get_parameter(n) for n in names],
                                    allow_unused=True, materialize_grads=True)
    their_grads = torch.autograd.grad((theirs * loss_weights).sum(), [factors[n] for n in names])
    for name, our_grad, their_grad in zip(names, our_grads, their_grads):
        torch.testing.assert_close(our_grad, their_grad, rtol=1e-5, atol=1e-5, msg=name)

    code, params = all_code(gm), dict(gm.named_parameters())
    for spec in applied:
        lora_fx.apply(gm, spec)
    assert all_code(gm) == code and dict(gm.named_parameters()) == params
    torch.testing.assert_close(gm(x), ours, rtol=0, atol=0)
