"""Embedding and convolution sites with PEFT's parametrisation: outputs and gradients equal PEFT's with the same
weights, adapters load both ways, merge equals unmerged; unsupported convs are refused by name."""

import copy

import peft
import pytest
import torch
from torch import nn

import lora_fx
from lora_fx import LoraSpec, TargetError
from tests.conftest import captured, ids, randomize_lora, tiny_llama


class ConvNet(nn.Module):
    def __init__(self, groups: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv1d(4, 6, 3, padding=1, groups=groups, dilation=dilation)
        self.conv2 = nn.Conv2d(6, 5, 3, stride=2, padding=1)
        self.head = nn.Linear(5, 3)

    def forward(self, x):                                          # x: (batch, 4, length)
        y = self.conv1(x).relu()                                   # (batch, 6, length)
        y = self.conv2(y.unsqueeze(-1).expand(-1, -1, -1, 4))      # (batch, 5, length / 2, 2)
        return self.head(y.mean((2, 3)))


def same_weights(ours, reference):
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if param.requires_grad:
                params["base_model.model." + name].copy_(param)


def assert_equal_to_peft(gm, reference, run_ours, run_reference):
    ours, expected = run_ours(), run_reference()
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    ours.pow(2).mean().backward()
    expected.pow(2).mean().backward()
    params = dict(reference.named_parameters())
    trainable = [(n, p) for n, p in gm.named_parameters() if p.requires_grad]
    assert trainable and len(trainable) == sum(p.requires_grad for p in reference.parameters())
    for name, param in trainable:
        torch.testing.assert_close(param.grad, params["base_model.model." + name].grad, rtol=1e-4, atol=1e-6,
                                   msg=name)


def test_embedding_sites_equal_peft_and_merge(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama().eval()
    gm = lora_fx.apply(captured("llama"), LoraSpec(targets=["embed_tokens", "q_proj"], rank=4, alpha=8.0))
    assert gm.meta["lora_fx"].site_info["model.embed_tokens"].kind == "embedding"
    assert "model.embed_tokens.lora_embedding_A.default" in gm.state_dict()
    randomize_lora(gm)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["embed_tokens", "q_proj"],
                                                                          r=4, lora_alpha=8))
    same_weights(gm, reference)
    x = ids(3, 5, seed=2)
    assert_equal_to_peft(gm, reference, lambda: gm(x).logits, lambda: reference(input_ids=x, use_cache=False).logits)
    torch.testing.assert_close(lora_fx.merge(gm)(x).logits, gm(x).logits, rtol=0, atol=1e-5)
    lora_fx.save_adapter(gm, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours"))
    torch.testing.assert_close(theirs(input_ids=x, use_cache=False).logits, gm(x).logits, rtol=0, atol=1e-5)
    reference.save_pretrained(str(tmp_path / "theirs"))
    loaded = lora_fx.load_adapter(captured("llama"), tmp_path / "theirs")
    torch.testing.assert_close(loaded(x).logits, reference(input_ids=x, use_cache=False).logits, rtol=0, atol=1e-5)


def test_conv_sites_equal_peft_and_merge(tmp_path):
    torch.manual_seed(0)
    model = ConvNet().eval()
    example = torch.randn(2, 4, 8)
    gm = lora_fx.apply(model, LoraSpec(targets=["conv1", "conv2"], rank=2, alpha=6.0), (example,))
    info = gm.meta["lora_fx"].site_info
    assert (info["conv1"].kind, info["conv2"].details.kernel) == ("conv", (3, 3))
    assert gm.get_parameter("conv2.lora_B.default.weight").shape == (5, 2, 1, 1)
    randomize_lora(gm)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["conv1", "conv2"], r=2,
                                                                          lora_alpha=6))
    same_weights(gm, reference)
    x = torch.randn(3, 4, 10)
    assert_equal_to_peft(gm, reference, lambda: gm(x), lambda: reference(x))
    torch.testing.assert_close(lora_fx.merge(gm)(x), gm(x), rtol=0, atol=1e-5)
    lora_fx.save_adapter(gm, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path))
    torch.testing.assert_close(theirs(x), gm(x), rtol=0, atol=1e-5)
    loaded = lora_fx.load_adapter(lora_fx.capture(model, (example,)), tmp_path)
    torch.testing.assert_close(loaded(x), gm(x), rtol=0, atol=0)


@pytest.mark.parametrize("groups, dilation", [(2, 1), (1, 2)])
def test_grouped_or_dilated_convs_are_refused_naming_the_module(groups, dilation):
    gm = lora_fx.capture(ConvNet(groups=groups, dilation=dilation), (torch.randn(2, 4, 8),))
    with pytest.raises(TargetError, match=rf"'conv1' is targeted .*groups={groups} and dilation=\[{dilation}\]; "
                                          r"the conv kind supports groups=1 and dilation=1 only"):
        lora_fx.apply(gm, LoraSpec(targets=["conv1"]))
    assert lora_fx.adapters(gm) == []
