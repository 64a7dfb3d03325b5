import copy
from collections import Counter

import pytest
import torch

import lora_fx
from lora_fx import LoraSpec, fuse_siblings
from lora_fx.state import state_of
from tests.conftest import all_nodes, captured, ids, randomize_lora



def roles(gm) -> Counter:
    return Counter(n.meta["lora_fx"]["role"] for n in all_nodes(gm) if "lora_fx" in n.meta)


def test_qkv_and_gate_up_share_one_projection_exactly():
    gm = lora_fx.apply(captured("llama"), LoraSpec(rank=4, rank_pattern={"k_proj": 2}))
    lora_fx.apply(gm, LoraSpec(targets=["q_proj", "k_proj"], rank=3, adapter="b"))
    randomize_lora(gm)
    reference = copy.deepcopy(gm)
    assert fuse_siblings(gm).modified
    # per layer: default q/k/v and gate/up, adapter b q/k -> 3 fused projections; o/down stay single
    assert roles(gm)["fused_down"] == 2 * 3 and roles(gm)["down"] == 2 * 2
    x = ids(3, 5, seed=4)
    out, expected = gm(x).logits, reference(x).logits
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    out.pow(2).mean().backward()
    expected.pow(2).mean().backward()
    grads = dict(reference.named_parameters())
    for name, param in gm.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-4, atol=1e-7)
    assert not fuse_siblings(gm).modified                     # idempotent


def test_branches_with_dropout_are_not_fused():
    gm = lora_fx.apply(captured("llama", training=True), LoraSpec(rank=2, dropout=0.1))
    assert not fuse_siblings(gm).modified


def test_a_dropout_read_by_more_than_its_shrink_is_not_shared():
    """DoRA reads the dropped input for its base term too: sharing the dropout would change that term's mask."""
    gm = lora_fx.apply(captured("llama", training=True), LoraSpec(rank=2, dropout=0.1, use_dora=True))
    code = gm.code
    fuse_siblings(gm, share_dropout=True)
    assert gm.code == code and roles(gm)["fused_down"] == 0


def test_share_dropout_must_be_a_bool():
    gm = lora_fx.apply(captured("llama", training=True), LoraSpec(rank=2, dropout=0.1))
    code = gm.code
    with pytest.raises(TypeError, match="share_dropout must be True or False, got 'yes'"):
        fuse_siblings(gm, share_dropout="yes")
    assert gm.code == code and state_of(gm).siblings == "separate"                 # nothing was turned on


def test_deleting_a_fused_adapter_restores_the_plain_graph():
    gm = lora_fx.apply(captured("llama"), LoraSpec(rank=2))
    fuse_siblings(gm)
    lora_fx.delete_adapter(gm, "default")
    plain = captured("llama")
    assert Counter(n.target for n in all_nodes(gm)) == Counter(n.target for n in all_nodes(plain))
