from collections import Counter

import pytest
import torch

import lora_fx
from lora_fx import AdapterError, LoraSpec
from tests.conftest import all_code, all_nodes, assert_unchanged, captured, ids, randomize_lora, snapshot

CAPTURE = {"example_args": (ids(),), "example_kwargs": {"use_cache": False}}


def ops(gm):
    return Counter((n.op, n.target) for n in all_nodes(gm) if n.op != "get_attr")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_equals_unmerged_with_plain_graph_and_untouched_inputs(arch, request):
    model = request.getfixturevalue(arch).eval()
    gm = lora_fx.apply(captured(arch), LoraSpec(rank=4, alpha=8.0))
    lora_fx.apply(gm, LoraSpec(targets="all-linear", rank=2, adapter="b"))
    randomize_lora(gm)
    before_model, before_graph, code = snapshot(model), snapshot(gm), all_code(gm)
    merged = lora_fx.merge(gm)
    x = ids(3, 7, seed=1)
    torch.testing.assert_close(merged(x).logits, gm(x).logits, rtol=1e-5, atol=1e-5)
    plain = captured(arch)
    assert ops(merged) == ops(plain) and len(all_nodes(merged)) == len(all_nodes(plain))
    assert not any(".lora_" in name for name in merged.state_dict()) and lora_fx.adapters(merged) == []
    assert all_code(gm) == code
    assert_unchanged(gm, before_graph)
    assert_unchanged(model, before_model)
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in plain.parameters())


def test_merge_shares_unchanged_storage_never_parameters_and_picks_adapters(llama):
    gm = lora_fx.apply(llama, LoraSpec(targets=["q_proj"], rank=2), **CAPTURE)
    lora_fx.apply(gm, LoraSpec(targets=["v_proj"], rank=2, adapter="b"))
    randomize_lora(gm)
    lora_fx.set_active(gm, ["b"])
    merged = lora_fx.merge(gm)               # the active adapter only
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        ours, theirs = merged.get_parameter(name), gm.get_parameter(name)
        assert ours is not theirs and ours.data_ptr() == theirs.data_ptr()     # own object, shared storage
    assert not torch.equal(merged.get_parameter("model.layers.0.self_attn.v_proj.weight"),
                           gm.get_parameter("model.layers.0.self_attn.v_proj.weight"))
    torch.testing.assert_close(merged(ids()).logits, gm(ids()).logits, rtol=1e-5, atol=1e-5)
    both = lora_fx.merge(gm, ["default", "b"])
    lora_fx.set_active(gm, ["default", "b"])
    torch.testing.assert_close(both(ids()).logits, gm(ids()).logits, rtol=1e-5, atol=1e-5)


def test_merged_graph_switches_modes_like_the_source(mlp):
    gm = lora_fx.apply(mlp, LoraSpec(rank=2), example_args=(torch.randn(4, 8),))
    randomize_lora(gm)
    merged = lora_fx.merge(gm)
    assert merged.training
    x = torch.ones(64, 8)
    assert not torch.equal(merged(x), merged(x))    # the model's dropout is live in training mode
    merged.eval(), gm.eval()
    torch.testing.assert_close(merged(x), gm(x))


def test_non_finite_merge_is_refused(mlp):
    gm = lora_fx.apply(mlp, LoraSpec(rank=2), example_args=(torch.randn(4, 8),))
    with torch.no_grad():
        gm.get_parameter("up.lora_B.default.weight").fill_(float("inf"))
    with pytest.raises(AdapterError, match=r"non-finite weights at \['up'\]"):
        lora_fx.merge(gm)
    with pytest.raises(AdapterError, match="unknown adapter"):
        lora_fx.merge(gm, ["nope"])
