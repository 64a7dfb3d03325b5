import copy

import pytest
import torch

import lora_fx
from lora_fx import AdapterError, LoraSpec
from tests.conftest import (MLP, all_code, all_nodes, assert_graph_unchanged, assert_unchanged, captured,
                            graph_snapshot, ids, randomize_lora, snapshot)

LLAMA_KW = {"example_args": (ids(),), "example_kwargs": {"use_cache": False}}


@pytest.fixture
def adapted():
    gm = captured("llama")
    lora_fx.apply(gm, LoraSpec(rank=4, alpha=8))
    randomize_lora(gm)
    return gm


def lora_keys(gm):
    return sorted(k for k in gm.state_dict() if ".lora_" in k)


def test_default_init_is_identity(llama):
    gm = lora_fx.apply(llama, LoraSpec(rank=4), **LLAMA_KW)
    x = ids(3, 6)
    torch.testing.assert_close(gm(x).logits, llama(x, use_cache=False).logits, rtol=0, atol=0)
    assert any(p.abs().sum() > 0 for n, p in gm.named_parameters() if "lora_A" in n)


def test_gaussian_init_std(mlp):
    gm = lora_fx.apply(mlp, LoraSpec(rank=4, init="gaussian"))
    torch.testing.assert_close(gm.get_parameter("up.lora_A.default.weight").std().item(), 1 / 4, atol=0.1, rtol=0)


def test_state_dict_keys_are_pefts(adapted):
    keys = lora_keys(adapted)
    assert "model.layers.0.self_attn.q_proj.lora_A.default.weight" in keys
    assert "model.layers.1.mlp.down_proj.lora_B.default.weight" in keys
    assert len(keys) == 2 * 14 and not any("lora_scaling" in k for k in adapted.state_dict())


def test_reapplying_the_same_spec_changes_nothing(adapted):
    code, params = all_code(adapted), dict(adapted.named_parameters())
    out = lora_fx.apply(adapted, LoraSpec(rank=4, alpha=8))
    assert out is adapted and all_code(adapted) == code and dict(adapted.named_parameters()) == params


def test_same_name_different_spec_is_an_error_and_changes_nothing(adapted):
    code = all_code(adapted)
    with pytest.raises(AdapterError, match=r"'default' already exists with a different spec \(fields \['rank'\]"):
        lora_fx.apply(adapted, LoraSpec(rank=2, alpha=8))
    assert all_code(adapted) == code


def test_second_all_linear_adapter_is_parallel_not_nested(adapted):
    """PEFT issue 2390: a second all-linear adapter must not wrap the first adapter's lora_A/lora_B."""
    lora_fx.apply(adapted, LoraSpec(rank=2, adapter="b"))
    keys = lora_keys(adapted)
    assert not any(k.count(".lora_") > 1 for k in keys)
    sites = lambda name: sorted(k.split(f".lora_A.{name}.")[0] for k in keys if f".lora_A.{name}." in k)
    assert sites("b") == sites("default") and len(sites("b")) == 14
    adds = [n for n in all_nodes(adapted) if n.meta.get("lora_fx", {}).get("role") == "add"]
    assert len(adds) == 28 and lora_fx.adapters(adapted) == ["default", "b"]


def test_set_active_selects_and_disabled_gives_the_base(llama, adapted):
    lora_fx.apply(adapted, LoraSpec(rank=2, adapter="b"))
    randomize_lora(adapted, seed=1)
    only_default = copy.deepcopy(adapted)
    lora_fx.delete_adapter(only_default, "b")
    x = ids(2, 7)
    base = llama(x, use_cache=False).logits
    both = adapted(x).logits
    lora_fx.set_active(adapted, ["default"])
    torch.testing.assert_close(adapted(x).logits, only_default(x).logits, rtol=0, atol=0)
    assert not torch.allclose(both, adapted(x).logits)
    with lora_fx.disabled(adapted):
        torch.testing.assert_close(adapted(x).logits, base, rtol=0, atol=0)
    lora_fx.set_active(adapted, [])
    torch.testing.assert_close(adapted(x).logits, base, rtol=0, atol=0)
    lora_fx.set_active(adapted, ["default", "b"])
    torch.testing.assert_close(adapted(x).logits, both, rtol=0, atol=0)
    assert lora_fx.active_adapters(adapted) == ["default", "b"]


def test_switching_adapters_between_a_forward_and_its_backward_keeps_that_forwards_gradients(adapted):
    """The DPO pattern: a forward with the adapter, a reference forward with it disabled, then backward. The scales
    are buffers written in place; the backward must use the ones its forward ran with."""
    x = ids(2, 5)
    lora_A = adapted.get_parameter("model.layers.0.self_attn.q_proj.lora_A.default.weight")
    (adapted(x).logits ** 2).mean().backward()
    expected, lora_A.grad = lora_A.grad, None
    loss = (adapted(x).logits ** 2).mean()
    with lora_fx.disabled(adapted):
        reference = adapted(x).logits
    lora_fx.set_active(adapted, [])
    (loss + 0 * reference.sum()).backward()
    torch.testing.assert_close(lora_A.grad, expected, rtol=0, atol=0)


def test_unknown_adapter_names_are_errors(adapted):
    with pytest.raises(AdapterError, match=r"unknown adapter\(s\) \['x'\]; this graph has \['default'\]"):
        lora_fx.set_active(adapted, ["x"])
    with pytest.raises(AdapterError, match="unknown adapter"):
        lora_fx.delete_adapter(adapted, "x")
    assert lora_fx.active_adapters(adapted) == ["default"]


def test_delete_adapter_restores_the_graph(llama):
    gm = lora_fx.apply(llama, LoraSpec(rank=4), **LLAMA_KW)
    randomize_lora(gm)
    x = ids(2, 5)
    before, code = gm(x).logits, all_code(gm)
    lora_fx.apply(gm, LoraSpec(targets=["q_proj"], rank=2, adapter="b"))
    with torch.no_grad():
        gm.get_parameter("model.layers.0.self_attn.q_proj.lora_B.b.weight").fill_(0.5)
    assert not torch.allclose(gm(x).logits, before)
    lora_fx.delete_adapter(gm, "b")
    assert all_code(gm) == code and lora_fx.adapters(gm) == ["default"]
    assert not any(".b." in k for k in gm.state_dict())
    torch.testing.assert_close(gm(x).logits, before, rtol=0, atol=0)


def test_apply_rejects_example_inputs_for_a_graph_and_non_specs(adapted):
    with pytest.raises(TypeError, match="already captured"):
        lora_fx.apply(adapted, LoraSpec(adapter="b"), example_args=(ids(),))
    with pytest.raises(TypeError, match="spec must be a lora_fx.LoraSpec, got dict"):
        lora_fx.apply(adapted, {"rank": 4})


def test_only_lora_trains_and_the_user_model_is_bit_identical(llama):
    before = snapshot(llama)
    gm = lora_fx.apply(llama, LoraSpec(rank=4, dropout=0.1), **LLAMA_KW)
    trainable = [n for n, p in gm.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    optimizer = torch.optim.AdamW(gm.parameters(), lr=1e-2)
    for _ in range(2):
        x = ids(2, 8)
        loss = torch.nn.functional.cross_entropy(gm(x).logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert gm.get_parameter("model.layers.0.mlp.up_proj.lora_B.default.weight").abs().sum() > 0
    assert all(p.grad is None for n, p in gm.named_parameters() if not p.requires_grad)
    assert_unchanged(llama, before)


def test_lora_dropout_follows_train_and_eval():
    torch.manual_seed(0)
    gm = lora_fx.apply(MLP().eval(), LoraSpec(targets=["down"], dropout=0.5), example_args=(torch.randn(4, 8),))
    randomize_lora(gm)
    x = torch.randn(64, 8)
    assert torch.equal(gm(x), gm(x))
    gm.train()
    assert not torch.allclose(gm(x), gm(x))


def test_adapters_follow_base_dtype_and_device_moves(mlp):
    model = mlp.to(torch.bfloat16)
    gm = lora_fx.apply(model, LoraSpec(rank=2), example_args=(torch.randn(4, 8, dtype=torch.bfloat16),))
    assert gm.get_parameter("up.lora_A.default.weight").dtype == torch.bfloat16
    randomize_lora(gm)
    assert gm(torch.randn(3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    gm.to(torch.float32)
    assert gm(torch.randn(3, 8)).dtype == torch.float32
    assert model.up.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("names", [None, 3, [3], "nope"])
def test_set_active_with_bad_names_is_a_clear_error_and_changes_nothing(adapted, names):
    before = graph_snapshot(adapted)
    with pytest.raises(AdapterError, match="adapter names must be a str or a list of str|unknown adapter"):
        lora_fx.set_active(adapted, names)
    assert_graph_unchanged(adapted, before)


def test_an_adapter_name_that_clashes_with_module_attributes_is_refused_before_anything_changes(adapted):
    before = graph_snapshot(adapted)
    for name in ("training", "forward", "to"):
        with pytest.raises(lora_fx.LoraSpecError, match=f"`adapter` '{name}' is an nn.Module attribute name"):
            lora_fx.apply(adapted, LoraSpec(adapter=name))
    assert_graph_unchanged(adapted, before)


def test_inactive_or_disabled_adapters_never_change_outputs_whatever_they_hold(adapted):
    lora_fx.apply(adapted, LoraSpec(targets=["q_proj", "down_proj"], rank=2, adapter="broken"))
    lora_fx.set_active(adapted, ["default"])
    x = ids(2, 5)
    expected = adapted(x).logits
    with torch.no_grad():
        adapted.get_parameter("model.layers.0.self_attn.q_proj.lora_A.broken.weight").fill_(float("nan"))
        adapted.get_parameter("model.layers.1.mlp.down_proj.lora_B.broken.weight").fill_(float("inf"))
    torch.testing.assert_close(adapted(x).logits, expected, rtol=0, atol=0)       # inactive: exactly nothing
    lora_fx.set_active(adapted, ["default", "broken"])
    assert not torch.isfinite(adapted(x).logits).all()                          # active: it does contribute
    with lora_fx.disabled(adapted):
        assert torch.isfinite(adapted(x).logits).all()


def test_non_finite_combination_weights_are_refused(adapted):
    lora_fx.apply(adapted, LoraSpec(targets=["q_proj"], rank=2, adapter="b"))
    before = graph_snapshot(adapted)
    with pytest.raises(AdapterError, match=r"combination weights must be finite, got \[1.0, nan\]"):
        lora_fx.add_weighted_adapter(adapted, ["default", "b"], [1.0, float("nan")], "mix")
    with torch.no_grad():
        adapted.get_parameter("model.layers.1.self_attn.q_proj.lora_B.b.weight")[0, 0] = float("inf")
    with pytest.raises(AdapterError, match=r"non-finite weights at \['model.layers.1.self_attn.q_proj'\]"):
        lora_fx.add_weighted_adapter(adapted, ["default", "b"], [1.0, 1.0], "mix")
    assert lora_fx.adapters(adapted) == ["default", "b"]
    assert graph_snapshot(adapted)["code"] == before["code"]
