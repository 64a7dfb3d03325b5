import copy

import peft
import pytest
import torch

import lora_fx
from lora_fx import AdapterError, LoraSpec
from tests.conftest import captured, ids, randomize_lora

CAPTURE = {"example_args": (ids(),), "example_kwargs": {"use_cache": False}}


def test_cat_combination_equals_peft(llama):
    llama.eval()
    gm = lora_fx.apply(captured("llama"), LoraSpec(targets=["q_proj", "v_proj"], rank=4, alpha=8.0))
    lora_fx.apply(gm, LoraSpec(targets=["q_proj", "v_proj"], rank=2, alpha=6.0, adapter="b"))
    randomize_lora(gm)
    reference = peft.get_peft_model(copy.deepcopy(llama), peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4,
                                                                          lora_alpha=8))
    reference.add_adapter("b", peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=6))
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if param.requires_grad:
                params["base_model.model." + name].copy_(param)
    lora_fx.add_weighted_adapter(gm, ["default", "b"], [0.7, -1.5], "mix")
    reference.add_weighted_adapter(["default", "b"], [0.7, -1.5], "mix", combination_type="cat")
    assert lora_fx.active_adapters(gm) == ["default", "b"]
    lora_fx.set_active(gm, "mix")
    reference.set_adapter("mix")
    x = ids(2, 6, seed=8)
    torch.testing.assert_close(gm(x).logits, reference(input_ids=x, use_cache=False).logits, rtol=0, atol=1e-5)
    assert gm.get_parameter("model.layers.0.self_attn.q_proj.lora_A.mix.weight").shape == (6, 32)


def test_combination_over_different_sites_is_exact(mlp):
    mlp.eval()
    gm = lora_fx.apply(mlp, LoraSpec(targets=["up"], rank=2), example_args=(torch.randn(4, 8),))
    lora_fx.apply(gm, LoraSpec(targets=["up", "down"], rank=3, alpha=5.0, adapter="b"))
    randomize_lora(gm)
    lora_fx.add_weighted_adapter(gm, ["default", "b"], [2.0, 0.5], "mix")
    for fqn in ("up", "down"):
        delta = lambda a, w: w * gm.meta["lora_fx"].specs[a].scale_for(fqn) * (
            gm.get_parameter(f"{fqn}.lora_B.{a}.weight") @ gm.get_parameter(f"{fqn}.lora_A.{a}.weight"))
        expected = delta("b", 0.5) + (delta("default", 2.0) if fqn == "up" else 0)
        torch.testing.assert_close(gm.get_parameter(f"{fqn}.lora_B.mix.weight") @ gm.get_parameter(
            f"{fqn}.lora_A.mix.weight"), expected)
    assert gm.get_parameter("up.lora_A.mix.weight").shape[0] == 5 and gm.get_parameter(
        "down.lora_A.mix.weight").shape[0] == 3


def test_bad_combinations(mlp):
    gm = lora_fx.apply(mlp, LoraSpec(rank=2), example_args=(torch.randn(4, 8),))
    with pytest.raises(AdapterError, match="one numeric weight per adapter"):
        lora_fx.add_weighted_adapter(gm, ["default"], [1.0, 2.0], "mix")
    with pytest.raises(AdapterError, match="unknown adapter"):
        lora_fx.add_weighted_adapter(gm, ["nope"], [1.0], "mix")
    with pytest.raises(AdapterError, match="'default' already exists"):
        lora_fx.add_weighted_adapter(gm, ["default"], [1.0], "default")
    assert lora_fx.adapters(gm) == ["default"]
