"""`all-linear` on transformers-5 MoE models resolves as PEFT 0.21 resolves it (lora_fx.moe_all_linear): experts and
router as parameters, gate_up_proj at 2r and 2α; adapters PEFT saves that way load here, ours load in PEFT; dropout is
refused as PEFT refuses it. (tests/zoo compares sites, outputs, gradients and keys on Qwen3-MoE by default, and on
Mixtral, OLMoE, DeepSeek-V2/V3 and Qwen3-Next with `-m zoo`.)"""

import copy

import peft
import pytest
import torch

import lora_fx
from lora_fx import LoraSpec, LoraSpecError
from tests.conftest import randomize_lora
from tests.zoo.architectures import BY_NAME

SPEC = LoraSpec(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def qwen3_moe():
    """(model, inputs, its capture): copy the capture before changing it."""
    arch = BY_NAME["qwen3_moe"]
    model, inputs = arch.model(), {**arch.example_inputs(), "use_cache": False}
    return model, inputs, lora_fx.capture(model, example_kwargs=inputs)


def logits(module, inputs) -> torch.Tensor:
    return module(**inputs).logits


def test_all_linear_is_peft_s_and_adapters_load_both_ways(qwen3_moe, tmp_path):
    model, inputs, captured = qwen3_moe
    gm = lora_fx.apply(copy.deepcopy(captured), SPEC)
    spec = gm.meta["lora_fx"].specs["default"]
    gate_up, down = "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"
    assert set(spec.target_parameters) == {"gate_up_proj", "down_proj", "gate.weight"}
    assert (spec.rank_for(gate_up), spec.alpha_for(gate_up), spec.rank_for(down)) == (8, 16.0, 4)
    assert not {"gate_proj", "up_proj"} & set(spec.targets) and lora_fx.apply(gm, SPEC) is gm        # idempotent
    assert gm.get_parameter("model.layers.0.mlp.gate.lora_A.default.weight").shape == (4, 32)    # the router

    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules="all-linear", r=4,
                                                                            lora_alpha=8)).eval()
    randomize_lora(reference, seed=1)
    reference.save_pretrained(tmp_path / "peft")
    loaded = lora_fx.load_adapter(copy.deepcopy(captured), tmp_path / "peft").eval()
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


def test_dropout_is_refused_as_peft_refuses_it_for_parameters(qwen3_moe):
    gm = copy.deepcopy(qwen3_moe[2])
    with pytest.raises(LoraSpecError, match=r"on Qwen3MoeForCausalLM, 'all-linear' adapts the experts and the router "
                                            r"as parameters .* PEFT refuses `lora_dropout` for parameters"):
        lora_fx.apply(gm, LoraSpec(dropout=0.1))
    lora_fx.apply(gm, LoraSpec(targets=["q_proj"], dropout=0.1))                                  # modules: fine
    with pytest.raises(lora_fx.TargetError, match=r"`dropout` must be 0 for the weights `target_parameters` selects "
                                                  r"\(model.layers.0.mlp.gate"):
        lora_fx.apply(gm, LoraSpec(target_parameters=["gate.weight"], dropout=0.1, adapter="router"))


def test_families_peft_does_not_convert_keep_the_linear_modules():
    arch = BY_NAME["gpt_oss"]
    gm = lora_fx.apply(arch.model(), SPEC, example_kwargs={**arch.example_inputs(), "use_cache": False})
    assert gm.meta["lora_fx"].specs["default"] == SPEC
