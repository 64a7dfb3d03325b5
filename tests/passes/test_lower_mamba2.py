"""LoRA on Mamba2's `out_proj` in training, through the fused op: what PEFT gives up on (issue 2274)."""

import copy
from collections import Counter

import pytest
import torch

import lora_fx
from lora_fx import LoraSpec, TargetError
from lora_fx.ops import FUSED_OP, mamba_split_conv1d_scan_combined
from tests.conftest import ReferenceLora, all_code, all_nodes, assert_unchanged, randomize_lora, snapshot
from tests.lora_fx.test_ops import tiny_mamba2


CAPTURE = {"example_args": (torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0)),),
           "example_kwargs": {"use_cache": False}}


def fused_nodes(gm):
    return [n for n in all_nodes(gm) if n.target is FUSED_OP]


def wrap_with_reference_lora(model, gm, fqns):
    """The eager oracle: each module wrapped by a plain LoRA layer with gm's weights (module calls, no fusion)."""
    spec = gm.meta["lora_fx"].specs["default"]
    for fqn in fqns:
        parent, _, leaf = fqn.rpartition(".")
        owner = model.get_submodule(parent)
        A = gm.get_parameter(f"{fqn}.lora_A.default.weight").detach().clone().requires_grad_()
        B = gm.get_parameter(f"{fqn}.lora_B.default.weight").detach().clone().requires_grad_()
        setattr(owner, leaf, ReferenceLora(getattr(owner, leaf), [(A, B, spec.scale_for(fqn))]))


def test_out_proj_lora_trains_through_the_fused_op_and_equals_the_eager_oracle():
    model = tiny_mamba2()
    before = snapshot(model)
    gm = lora_fx.apply(model, LoraSpec(targets=["in_proj", "out_proj"], rank=4, alpha=8.0), **CAPTURE)
    assert len(fused_nodes(gm)) == 2                       # one opaque fused node per layer, kept after lowering
    randomize_lora(gm)
    oracle = copy.deepcopy(model)          # transformers' slow path calls self.out_proj(...): module LoRA works there
    fqns = [f"backbone.layers.{i}.mixer.{p}" for i in range(2) for p in ("in_proj", "out_proj")]
    wrap_with_reference_lora(oracle, gm, fqns)
    ids = torch.randint(0, 50, (3, 17), generator=torch.Generator().manual_seed(1))    # a new shape
    ours, expected = gm(ids).logits, oracle(ids, use_cache=False).logits
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    ours.pow(2).mean().backward()
    expected.pow(2).mean().backward()
    for fqn in fqns:
        grad = gm.get_parameter(f"{fqn}.lora_A.default.weight").grad
        assert grad.abs().sum() > 0
        reference = oracle.get_submodule(fqn).branches[0][0].grad
        torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-6)
    assert_unchanged(model, before)


def test_merge_feeds_the_merged_weight_back_into_the_fused_op():
    model = tiny_mamba2()
    gm = lora_fx.apply(model, LoraSpec(targets=["out_proj"], rank=2), **CAPTURE)
    randomize_lora(gm)
    merged = lora_fx.merge(gm)
    plain = lora_fx.capture(model, **CAPTURE)
    assert Counter(n.target for n in all_nodes(merged)) == Counter(n.target for n in all_nodes(plain))
    ids = CAPTURE["example_args"][0]
    torch.testing.assert_close(merged(ids).logits, gm(ids).logits, rtol=0, atol=1e-5)


def test_targeting_a_weight_only_the_fused_op_reads_is_refused():
    model = tiny_mamba2()
    gm = lora_fx.capture(model, **CAPTURE)
    code = all_code(gm)
    with pytest.raises(TargetError, match=r"'backbone.layers.0.mixer.conv1d' is targeted but has no read lora_fx can adapt.*"
                                          r"mamba_split_conv1d_scan_combined"):
        lora_fx.apply(gm, LoraSpec(targets=["conv1d"]))
    assert all_code(gm) == code and lora_fx.adapters(gm) == []


class HandWrittenMamba2(torch.nn.Module):
    """Shaped like mamba_ssm's Mamba2 on its memory-efficient path: the fused call reads out_proj.weight itself."""

    def __init__(self, d_model=16, heads=2, headdim=8, dstate=4, groups=1):
        super().__init__()
        dim = heads * headdim
        self.headdim, self.groups = headdim, groups
        self.in_proj = torch.nn.Linear(d_model, 2 * dim + 2 * groups * dstate + heads, bias=False)
        self.conv1d = torch.nn.Conv1d(dim + 2 * groups * dstate, dim + 2 * groups * dstate, 4, groups=dim + 2 *
                                      groups * dstate, padding=3)
        self.dt_bias = torch.nn.Parameter(torch.randn(heads))
        self.A_log = torch.nn.Parameter(torch.rand(heads))
        self.D = torch.nn.Parameter(torch.randn(heads))
        self.norm_weight = torch.nn.Parameter(torch.ones(dim))
        self.out_proj = torch.nn.Linear(dim, d_model, bias=False)

    def forward(self, u, fused=True):
        zxbcdt = self.in_proj(u)
        common = dict(chunk_size=4, activation="silu", rmsnorm_weight=self.norm_weight, headdim=self.headdim,
                      ngroups=self.groups, norm_before_gate=False)
        args = (zxbcdt, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.dt_bias, -torch.exp(self.A_log), self.D)
        if fused:
            return mamba_split_conv1d_scan_combined(*args, outproj_weight=self.out_proj.weight, **common)
        return self.out_proj(mamba_split_conv1d_scan_combined(*args, **common))


def test_hand_written_module_calling_the_op_directly():
    torch.manual_seed(0)
    model = HandWrittenMamba2()
    gm = lora_fx.apply(model, LoraSpec(targets=["out_proj", "in_proj"], rank=2),
                       example_args=(torch.randn(2, 8, 16),))
    randomize_lora(gm)
    oracle = copy.deepcopy(model)
    wrap_with_reference_lora(oracle, gm, ["in_proj", "out_proj"])
    for length in (8, 5, 13):
        u = torch.randn(3, length, 16)
        torch.testing.assert_close(gm(u), oracle(u, fused=False), rtol=0, atol=1e-5)
    gm(torch.randn(2, 6, 16)).pow(2).sum().backward()
    assert gm.get_parameter("out_proj.lora_A.default.weight").grad.abs().sum() > 0


def test_a_saved_out_proj_adapter_loads_into_a_fresh_capture(tmp_path):
    model = tiny_mamba2()
    gm = lora_fx.apply(model, LoraSpec(targets=["in_proj", "out_proj"], rank=2), **CAPTURE)
    randomize_lora(gm)
    lora_fx.save_adapter(gm, tmp_path)
    loaded = lora_fx.load_adapter(lora_fx.capture(model, **CAPTURE), tmp_path)     # lowers out_proj on the way in
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loaded(ids).logits, gm(ids).logits, rtol=0, atol=0)
    assert len(fused_nodes(loaded)) == 2
