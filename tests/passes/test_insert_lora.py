from collections import Counter

import pytest
import torch

import lora_fx
from lora_fx import LoraSpec
from lora_fx.ops import COUNTER_DROPOUT_LINEAR, STEP_SEEDS
from lora_fx.passes.insert_lora import insert_lora
from tests.conftest import MLP, all_code, all_nodes, ids, randomize_lora

aten = torch.ops.aten


def op_counts(gm) -> Counter:
    return Counter(n.target for n in all_nodes(gm) if n.op == "call_function")


def tagged_roles(gm) -> Counter:
    return Counter(n.meta["lora_fx"]["role"] for n in all_nodes(gm) if "lora_fx" in n.meta)


@pytest.mark.parametrize("training", [True, False])
def test_structure_per_site_and_tags(training):
    gm = lora_fx.capture(MLP().train(training), (torch.randn(4, 8),))
    before = op_counts(gm)
    lora_fx.apply(gm, LoraSpec(rank=2, dropout=0.1))
    after = op_counts(gm)
    fused = 2 if training else 0       # training: dropout + shrink as one counter_dropout_linear (lean_dropout)
    laid_out = 2 if training else 0    # training: the expand a matmul of rank-major inputs (passes/expand_layout.py)
    assert after[aten.linear.default] - before[aten.linear.default] == 2 * 2 - fused - laid_out
    assert after[aten.matmul.default] - before[aten.matmul.default] == laid_out
    assert after[COUNTER_DROPOUT_LINEAR] == fused and after[aten.dropout.default] == before[aten.dropout.default]
    assert after[STEP_SEEDS] == (1 if training else 0)
    assert after[aten.mul.Tensor] - before[aten.mul.Tensor] == 2
    assert after[aten.add.Tensor] - before[aten.add.Tensor] == 2
    assert after[aten.where.ScalarOther] - before[aten.where.ScalarOther] == 2 * 2
    roles = ("lora_A", "lora_B", "scale", "scale_value", "active", "mask_A", "mask_B", "down", "up", "scale_mul", "add")
    training_roles = ("seed", "rank_first", "rank_major", "rank_last", "B_transposed", "B_t")
    seeds = {"step_seeds": 1}               # training: one node draws every site's seed (shared by all adapters)
    assert tagged_roles(gm) == {role: 2 for role in roles + (training_roles if training else ())} | (
        seeds if training else {})
    assert all(n.meta["lora_fx"]["adapter"] == ("*" if n.target is STEP_SEEDS else "default")
               for n in all_nodes(gm) if "lora_fx" in n.meta)
    gm.train(not training)                  # the other mode's graph carries the same branches, its own dropout
    assert tagged_roles(gm) == {role: 2 for role in roles + (training_roles if not training else ())} | (
        seeds if not training else {})


def test_no_dropout_node_when_dropout_is_zero():
    gm = lora_fx.capture(MLP().eval(), (torch.randn(4, 8),))
    before = op_counts(gm)[aten.dropout.default]
    lora_fx.apply(gm, LoraSpec(rank=2))
    assert op_counts(gm)[aten.dropout.default] == before


def test_empty_site_list_is_not_a_modification():
    gm = lora_fx.capture(MLP(), (torch.randn(4, 8),))
    code = all_code(gm)
    assert not insert_lora(gm, [], LoraSpec(), training=True).modified and all_code(gm) == code


def test_second_adapter_is_added_after_the_first(llama):
    gm = lora_fx.apply(llama, LoraSpec(targets=["q_proj"], rank=2), example_args=(ids(),),
                       example_kwargs={"use_cache": False})
    lora_fx.apply(gm, LoraSpec(targets=["q_proj"], rank=2, adapter="b"))
    adds = [n for n in all_nodes(gm) if n.meta.get("lora_fx", {}).get("role") == "add"]
    first = [n for n in adds if n.meta["lora_fx"]["adapter"] == "default"]
    second = [n for n in adds if n.meta["lora_fx"]["adapter"] == "b"]
    assert all(b.args[0] in first for b in second)          # sum order: base + default + b, as PEFT sums
    assert all(first_add.args[0].target == aten.linear.default for first_add in first)


def test_conv1d_branch_uses_the_addmm_input(gpt2):
    gm = lora_fx.apply(gpt2.eval(), LoraSpec(targets=["c_fc"], rank=2), example_args=(ids(),),
                       example_kwargs={"use_cache": False})
    downs = [n for n in all_nodes(gm) if n.meta.get("lora_fx", {}).get("role") == "down"]
    assert len(downs) == 2 and all(d.args[0].target == aten.view.default for d in downs)
    assert tuple(gm.get_parameter("transformer.h.0.mlp.c_fc.lora_A.default.weight").shape) == (2, 32)
    assert tuple(gm.get_parameter("transformer.h.0.mlp.c_fc.lora_B.default.weight").shape) == (128, 2)


def test_fx_graph_branch_matches_eager():
    torch.manual_seed(0)
    model = MLP().eval()
    gm = lora_fx.apply(model, LoraSpec(targets=["up"], rank=3, alpha=6))
    randomize_lora(gm)
    gm.eval()
    x = torch.randn(5, 8)
    A, B = gm.get_parameter("up.lora_A.default.weight"), gm.get_parameter("up.lora_B.default.weight")
    hidden = torch.relu(model.up(x) + 2.0 * (x @ A.T @ B.T))
    torch.testing.assert_close(gm(x), model.down(hidden))
