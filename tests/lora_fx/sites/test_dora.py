"""DoRA (use_dora=True) against HF PEFT's own DoRA with the same non-identity weights: initial magnitudes, outputs,
gradients (magnitude vectors included), merge, PEFT adapter files both ways; and what DoRA refuses."""

import copy

import peft
import pytest
import torch

import lora_fx
from lora_fx import AdapterError, ExportError, LoraSpec, TargetError
from tests.conftest import assert_graph_unchanged, graph_snapshot, ids, tiny_gpt2, tiny_llama

BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}
TARGETS = {"llama": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "c_proj", "c_fc"]}
PREFIX = "base_model.model."


def model_of(arch: str):
    torch.manual_seed(0)
    return BUILD[arch]().eval()


def ours_and_peft(arch: str, alpha: float = 8.0):
    """(our DoRA graph, PEFT's DoRA model) on copies of one model, both freshly initialised."""
    model = model_of(arch)
    spec = LoraSpec(targets=TARGETS[arch], rank=4, alpha=alpha, use_dora=True)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=TARGETS[arch], r=4,
                                                                           lora_alpha=alpha, use_dora=True))
    gm = lora_fx.apply(model, spec, example_args=(ids(),), example_kwargs={"use_cache": False})
    return gm, reference


def randomize(gm, seed: int = 0) -> None:
    """Non-identity DoRA: A, B ~ N(0, 0.1), and each magnitude m scaled by a factor in [0.5, 1.5] (m stays > 0
    and of W's row-norm size, as trained magnitudes are)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if ".lora_magnitude_vector." in name:
                param.mul_(0.5 + torch.rand(param.shape, generator=generator))
            elif ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def copy_into_peft(gm, reference) -> dict:
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if param.requires_grad:
                params[PREFIX + name].copy_(param)
    return params


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_magnitudes_outputs_and_gradients_equal_peft(arch):
    gm, reference = ours_and_peft(arch)
    ours = {name: p for name, p in gm.named_parameters() if p.requires_grad}
    theirs = {name: p for name, p in reference.named_parameters() if p.requires_grad}
    assert {PREFIX + name for name in ours} == set(theirs)                  # PEFT's names, magnitudes included
    assert any(".lora_magnitude_vector." in name for name in ours)
    for name, param in ours.items():                                          # PEFT's initial m = ‖W‖ per row
        if ".lora_magnitude_vector." in name:
            torch.testing.assert_close(param, theirs[PREFIX + name], rtol=1e-6, atol=1e-6, msg=name)
    randomize(gm)
    params = copy_into_peft(gm, reference)
    x = ids(3, 6, seed=5)                                                     # a shape not seen at capture
    ours_logits, reference_logits = gm(x).logits, reference(input_ids=x, use_cache=False).logits
    torch.testing.assert_close(ours_logits, reference_logits, rtol=0, atol=1e-5)
    plain = model_of(arch)(x, use_cache=False).logits
    assert not torch.allclose(ours_logits, plain, atol=1e-3)                 # the adapter is live
    ours_logits.pow(2).mean().backward()
    reference_logits.pow(2).mean().backward()
    for name, param in ours.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        torch.testing.assert_close(param.grad, params[PREFIX + name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_equals_the_unmerged_graph_and_peft_merge(arch):
    gm, reference = ours_and_peft(arch)
    randomize(gm, seed=1)
    copy_into_peft(gm, reference)
    x = ids(3, 6, seed=5)
    merged = lora_fx.merge(gm)
    assert not any(".lora_" in name for name in merged.state_dict())
    torch.testing.assert_close(merged(x).logits, gm(x).logits, rtol=0, atol=1e-5)
    theirs = reference.merge_and_unload()
    ours_weights = merged.state_dict()
    for name, weight in theirs.state_dict().items():
        torch.testing.assert_close(ours_weights[name], weight, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapter_files_load_both_ways(arch, tmp_path):
    gm, reference = ours_and_peft(arch)
    randomize(gm, seed=2)
    x = ids(3, 6, seed=5)
    expected = gm(x).logits
    lora_fx.save_adapter(gm, tmp_path / "ours")                           # ours -> PEFT
    loaded_by_peft = peft.PeftModel.from_pretrained(model_of(arch), str(tmp_path / "ours"))
    assert loaded_by_peft.peft_config["default"].use_dora
    torch.testing.assert_close(loaded_by_peft(input_ids=x, use_cache=False).logits, expected, rtol=0, atol=1e-5)

    randomize(gm, seed=3)                                                   # PEFT -> ours, other weights
    copy_into_peft(gm, reference)
    reference.save_pretrained(str(tmp_path / "theirs"))
    fresh = lora_fx.capture(model_of(arch), (ids(),), {"use_cache": False})
    lora_fx.load_adapter(fresh, tmp_path / "theirs")
    assert fresh.meta["lora_fx"].specs["default"].use_dora
    torch.testing.assert_close(fresh(x).logits, reference(input_ids=x, use_cache=False).logits, rtol=0, atol=1e-5)
    assert not torch.allclose(fresh(x).logits, expected, atol=1e-4)       # not the first file's weights

    lora_fx.hotswap_adapter(gm, tmp_path / "theirs")                       # into an existing DoRA slot, in place
    torch.testing.assert_close(gm(x).logits, fresh(x).logits, rtol=0, atol=1e-6)


def test_dora_refusals_name_the_module_and_change_nothing(tmp_path):
    gm = lora_fx.capture(model_of("llama"), (ids(),), {"use_cache": False})
    before = graph_snapshot(gm)
    with pytest.raises(TargetError, match=r"module 'model\.embed_tokens' is a embedding site, and lora_fx has no "
                                          r"DoRA rule for embedding sites"):
        lora_fx.apply(gm, LoraSpec(targets=["embed_tokens", "q_proj"], rank=2, use_dora=True))
    assert_graph_unchanged(gm, before)

    lora_fx.apply(gm, LoraSpec(targets=["q_proj"], rank=2, use_dora=True))
    lora_fx.apply(gm, LoraSpec(targets=["q_proj"], rank=2, adapter="plain"))
    randomize(gm)
    lora_fx.save_adapter(gm, tmp_path / "dora")
    lora_fx.save_adapter(gm, tmp_path / "plain", adapter="plain")
    before = graph_snapshot(gm)
    with pytest.raises(AdapterError, match=r"holds a DoRA adapter \(use_dora=True\) but slot 'plain' is a LoRA "
                                           r"adapter .*'model\.layers\.0\.self_attn\.q_proj'"):
        lora_fx.hotswap_adapter(gm, tmp_path / "dora", adapter="plain")
    with pytest.raises(AdapterError, match=r"holds a LoRA adapter \(use_dora=False\) but slot 'default' is a DoRA"):
        lora_fx.hotswap_adapter(gm, tmp_path / "plain", adapter="default")
    with pytest.raises(AdapterError, match=r"\['default'\] are DoRA adapters"):
        lora_fx.add_weighted_adapter(gm, ["default", "plain"], [1.0, 1.0], "sum")
    with pytest.raises(ExportError, match=r"DoRA adapters \['default'\] have no unmerged ONNX form"):
        lora_fx.export_onnx(gm, tmp_path / "m.onnx", merged=False)
    assert_graph_unchanged(gm, before)
