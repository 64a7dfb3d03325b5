from collections import Counter

import torch

import lora_fx
from lora_fx import LoraSpec
from tests.conftest import MLP


def test_removing_one_adapter_keeps_the_other_and_restores_counts():
    gm = lora_fx.capture(MLP().eval(), (torch.randn(4, 8),))
    lora_fx.apply(gm, LoraSpec(rank=2, dropout=0.2))
    counts = Counter(n.target for n in gm.graph.nodes)
    state_keys = set(gm.state_dict())
    lora_fx.apply(gm, LoraSpec(rank=3, adapter="b", dropout=0.2))
    lora_fx.delete_adapter(gm, "b")
    assert Counter(n.target for n in gm.graph.nodes) == counts and set(gm.state_dict()) == state_keys
    lora_fx.delete_adapter(gm, "default")
    assert not any("lora" in name for name, _ in gm.named_modules())
    assert not any("lora_fx" in n.meta for n in gm.graph.nodes)
