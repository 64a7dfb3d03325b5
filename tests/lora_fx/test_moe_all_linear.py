"""`all-linear` on transformers-5 MoE models resolves as PEFT 0.21 resolves it (lora_fx.moe_all_linear): experts and
router as parameters, gate_up_proj at 2r and 2α; adapters PEFT saves that way load here, ours load in PEFT; dropout is
refused as PEFT refuses it. (tests/zoo compares sites, outputs, gradients and keys on every such family.)"""

import copy

import peft
import pytest
import torch

import lora_fx
from lora_fx import LoraSpec, LoraSpecError
from tests.conftest import randomize_lora
from tests.zoo.architectures import BY_NAME

SPEC = LoraSpec(rank=4, alpha=8.0)


def model_and_inputs(name: str):
    arch = BY_NAME[name]
    return arch.model(), {**arch.example_inputs(), "use_cache": False}


def logits(module, inputs) -> torch.Tensor:
    return module(**inputs).logits


@pytest.mark.parametrize("name, fused", [("qwen3_moe", ("gate_proj", "up_proj")), ("mixtral", ("w1", "w3"))])
def test_all_linear_is_peft_s_and_adapters_load_both_ways(name, fused, tmp_path):
    model, inputs = model_and_inputs(name)
    gm = lora_fx.apply(model, SPEC, example_kwargs=inputs)
    spec = gm.meta["lora_fx"].specs["default"]
    gate_up, down = "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"
    assert set(spec.target_parameters) == {"gate_up_proj", "down_proj", "gate.weight"}
    assert (spec.rank_for(gate_up), spec.alpha_for(gate_up), spec.rank_for(down)) == (8, 16.0, 4)
    assert not set(fused) & set(spec.targets) and lora_fx.apply(gm, SPEC) is gm                 # idempotent
    assert gm.get_parameter("model.layers.0.mlp.gate.lora_A.default.weight").shape == (4, 32)    # the router

    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules="all-linear", r=4,
                                                                            lora_alpha=8)).eval()
    randomize_lora(reference, seed=1)
    reference.save_pretrained(tmp_path / "peft")
    loaded = lora_fx.load_adapter(lora_fx.capture(model, example_kwargs=inputs), tmp_path / "peft").eval()
    assert loaded.meta["lora_fx"].sites["default"] == gm.meta["lora_fx"].sites["default"]
    expected = logits(reference, inputs)
    with reference.disable_adapter():
        assert not torch.allclose(logits(reference, inputs), expected, atol=1e-3)       # the adapter is live
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=1e-5, atol=1e-5)

    randomize_lora(gm, seed=2)
    gm.eval()
    lora_fx.save_adapter(gm, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(back, inputs), logits(gm, inputs), rtol=1e-5, atol=1e-5)


def test_dropout_is_refused_as_peft_refuses_it_for_parameters():
    model, inputs = model_and_inputs("qwen3_moe")
    with pytest.raises(LoraSpecError, match=r"on Qwen3MoeForCausalLM, 'all-linear' adapts the experts and the router "
                                            r"as parameters .* PEFT refuses `lora_dropout` for parameters"):
        lora_fx.apply(model, LoraSpec(dropout=0.1), example_kwargs=inputs)
    gm = lora_fx.apply(model, LoraSpec(targets=["q_proj"], dropout=0.1), example_kwargs=inputs)      # modules: fine
    with pytest.raises(lora_fx.TargetError, match=r"`dropout` must be 0 for the weights `target_parameters` selects "
                                                  r"\(model.layers.0.mlp.gate"):
        lora_fx.apply(gm, LoraSpec(target_parameters=["gate.weight"], dropout=0.1, adapter="router"))


def test_families_peft_does_not_convert_keep_the_linear_modules():
    model, inputs = model_and_inputs("gpt_oss")
    gm = lora_fx.apply(model, SPEC, example_kwargs=inputs)
    assert gm.meta["lora_fx"].specs["default"] == SPEC
