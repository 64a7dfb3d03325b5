"""Models loaded quantized by transformers (bitsandbytes 4-bit, torchao int8 weight-only) capture as they are and
train: outputs and LoRA gradients equal PEFT's on the same quantized model; save_adapter, merge (dequantized or
requantized) and quantize_base work or say why not; formats lora_fx does not read are refused by name."""

import copy

import peft
import pytest
import torch
import transformers
from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

import lora_fx
from lora_fx import CaptureError, LoraSpec, QuantizeError
from lora_fx.quantize import is_quantized
from tests.conftest import assert_unchanged, ids, randomize_lora, snapshot, tiny_llama

SPEC = LoraSpec(rank=4, alpha=8.0)
BNB = {"nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
       "nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                          bnb_4bit_compute_dtype=torch.float32),
       "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(directory)
    return directory


def loaded(checkpoint, quantization_config):
    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=quantization_config,
                                                             dtype=torch.float32).train()


def peft_with_the_same_weights(model, gm) -> tuple[peft.PeftModel, dict]:
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules="all-linear", r=4,
                                                                          lora_alpha=8)).train()
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if param.requires_grad:
                params["base_model.model." + name].copy_(param)
    return reference, params


def assert_equals_peft(model, gm, atol: float) -> None:
    """Outputs and LoRA gradients of `gm` against PEFT on `model` with the same (non-identity) weights. Training mode
    throughout: bitsandbytes repacks weights for its CPU inference kernel in eval mode without grad."""
    reference, params = peft_with_the_same_weights(model, gm)
    ours, theirs = gm(ids()).logits, reference(input_ids=ids(), use_cache=False).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=atol)
    with torch.no_grad(), lora_fx.disabled(gm):
        assert not torch.allclose(gm(ids()).logits, ours, atol=1e-3)            # the adapters are live
    ours.pow(2).mean().backward()
    theirs.pow(2).mean().backward()
    for name, param in gm.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, params["base_model.model." + name].grad, rtol=0, atol=1e-6,
                                       msg=name)


@pytest.mark.parametrize("settings", ["nf4-double", "fp4"])           # plain nf4: the tests below load it
def test_a_bitsandbytes_4bit_model_trains_as_peft_trains_it(checkpoint, settings):
    model = loaded(checkpoint, transformers.BitsAndBytesConfig(**BNB[settings]))
    before = snapshot(model)
    gm = lora_fx.apply(model, SPEC, (ids(),), {"use_cache": False})
    randomize_lora(gm)
    quantized = gm.meta["lora_fx"].quantized
    assert len(quantized) == 14 and set(quantized.values()) == {f"bnb-{settings[:3]}"}
    assert sum("library_linear" in str(node.target) for graph in gm.graphs().values() for node in graph.nodes) == 14
    assert all(is_quantized(gm.get_parameter(name)) for name in quantized)
    assert_equals_peft(model, gm, atol=0)                    # bitsandbytes' own matmul_4bit: the same numbers
    assert_unchanged(model, before)
    assert gm.dtype == torch.float32
    assert gm.num_parameters() == model.num_parameters() + gm.num_parameters(only_trainable=True)    # logical


def test_a_torchao_int8_model_trains_as_peft_trains_it(checkpoint):
    model = loaded(checkpoint, transformers.TorchAoConfig(Int8WeightOnlyConfig()))
    gm = lora_fx.apply(model, SPEC, (ids(),), {"use_cache": False})
    randomize_lora(gm)
    assert set(gm.meta["lora_fx"].quantized.values()) == {"int8"}
    assert_equals_peft(model, gm, atol=1e-5)             # torchao's int8 linear against dequantize-then-linear


def test_save_merge_and_quantize_base_on_a_bitsandbytes_base(checkpoint, tmp_path):
    model = loaded(checkpoint, transformers.BitsAndBytesConfig(**BNB["nf4-double"]))
    gm = lora_fx.apply(model, SPEC, (ids(),), {"use_cache": False})
    randomize_lora(gm)
    with torch.no_grad():
        expected = gm(ids()).logits
        merged = lora_fx.merge(gm)                       # dequantized base + ΔW: the unmerged graph's values
        torch.testing.assert_close(merged(ids()).logits, expected, rtol=1e-5, atol=1e-5)
        assert not merged.meta["lora_fx"].quantized
        requantized = lora_fx.merge(gm, requantize=True)     # W' quantized again, with the loaded settings
        weight = requantized.get_parameter("model.layers.0.self_attn.q_proj.weight")
        original = gm.get_parameter("model.layers.0.self_attn.q_proj.weight")
        assert type(weight) is type(original) and weight.quant_state.nested and len(
            requantized.meta["lora_fx"].quantized) == 14
        assert (requantized(ids()).logits - expected).abs().max() < 0.5      # only W' s new rounding differs
    lora_fx.save_adapter(gm, tmp_path / "adapter")
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter").train()
    with torch.no_grad():
        torch.testing.assert_close(reference(input_ids=ids(), use_cache=False).logits, expected, rtol=0, atol=0)
    with pytest.raises(QuantizeError, match=r"already quantized \(14 weights, e.g. module .* as bnb-nf4: loaded "
                                            r"quantized"):
        lora_fx.quantize_base(gm, "nf4")


def test_quantize_base_to_bitsandbytes_equals_loading_quantized(checkpoint, llama, tmp_path):
    full = lora_fx.apply(llama, SPEC, (ids(),), {"use_cache": False})
    randomize_lora(full)
    ours = lora_fx.quantize_base(full, "bnb-nf4", modules="all-linear")
    lora_fx.save_adapter(full, tmp_path)
    model = loaded(checkpoint, transformers.BitsAndBytesConfig(**BNB["nf4"]))
    gm = lora_fx.load_adapter(lora_fx.capture(model, (ids(),), {"use_cache": False}), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours.train()(ids()).logits, gm.train()(ids()).logits, rtol=0, atol=0)


def test_quantized_formats_lora_fx_does_not_read_are_refused(checkpoint):
    model = loaded(checkpoint, transformers.TorchAoConfig(Int8DynamicActivationInt8WeightConfig()))
    with pytest.raises(CaptureError, match=r"holds quantized weights in a format lora_fx does not read: "
                                           r"'model.layers.0.self_attn.q_proj.weight' \(Int8Tensor, activations "
                                           r"quantized too\)"):
        lora_fx.capture(model, (ids(),), {"use_cache": False})
