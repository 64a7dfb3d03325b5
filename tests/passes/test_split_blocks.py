"""Per-block structure: the model's repeated blocks run as modules of their own holding their tensors (LoRA
included) under unchanged names; outputs, gradients, merge and ONNX equal the flat graph's."""

import copy

import pytest
import torch

import lora_fx
from lora_fx import CaptureWarning, LoraSpec
from lora_fx.graph_module import LoraBlock
from tests.conftest import ids, randomize_lora, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("build, block", [(tiny_llama, "model.layers"), (tiny_gpt2, "transformer.h")])
def test_blocks_equal_the_flat_graph(build, block):
    torch.manual_seed(0)
    model = build().eval()
    capture = {"example_args": (ids(),), "example_kwargs": {"use_cache": False}}
    gm = lora_fx.apply(model, LoraSpec(rank=2, alpha=4.0), **capture)
    flat = lora_fx.apply(model, LoraSpec(rank=2, alpha=4.0), **capture, blocks=False)
    randomize_lora(gm)
    flat.load_state_dict(gm.state_dict())
    blocks = lora_fx.blocks(gm)
    assert [b for b in blocks] == [gm.get_submodule(f"{block}.{i}") for i in range(2)] and lora_fx.blocks(flat) == []
    assert all(isinstance(b, LoraBlock) for b in blocks) and type(blocks[0]).__name__ != "LoraBlock"
    assert "self_attn.q_proj.lora_A.default.weight" in dict(blocks[0].named_parameters()) or \
        "attn.c_attn.lora_A.default.weight" in dict(blocks[0].named_parameters())
    assert list(gm.state_dict()) == list(flat.state_dict())
    assert not any(n.op == "call_module" and n.target.startswith(block) for n in flat.graph.nodes)
    x = ids(3, 5, seed=1)
    ours, expected = gm(x).logits, flat(x).logits
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    ours.pow(2).mean().backward()
    expected.pow(2).mean().backward()
    grads = dict(flat.named_parameters())
    for name, param in gm.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name].grad, rtol=0, atol=0)
    torch.testing.assert_close(lora_fx.merge(gm)(x).logits, expected, rtol=1e-5, atol=1e-5)
    assert len(lora_fx.blocks(lora_fx.merge(gm))) == 2


def test_onnx_of_the_blocks_equals_the_flat_graphs(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = tiny_llama().eval()
    gm = lora_fx.apply(model, LoraSpec(rank=2, alpha=4.0), (ids(),), {"use_cache": False})
    flat = lora_fx.apply(model, LoraSpec(rank=2, alpha=4.0), (ids(),), {"use_cache": False}, blocks=False)
    randomize_lora(gm)
    flat.load_state_dict(gm.state_dict())
    x = ids(3, 5, seed=1).numpy()
    outputs = []
    for name, graph in (("blocks", gm), ("flat", flat)):
        lora_fx.export_onnx(graph, tmp_path / f"{name}.onnx", merged=False)
        session = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {session.get_inputs()[0].name: x})[0])
    torch.testing.assert_close(torch.from_numpy(outputs[0]), torch.from_numpy(outputs[1]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(outputs[0]), gm(torch.from_numpy(x)).logits.detach(), rtol=1e-4,
                               atol=1e-5)


def test_blocks_keep_their_identity_across_adapter_changes_and_modes():
    torch.manual_seed(0)
    gm = lora_fx.apply(tiny_llama().eval(), LoraSpec(rank=2), (ids(),), {"use_cache": False})
    first = lora_fx.blocks(gm)
    lora_fx.apply(gm, LoraSpec(targets=["q_proj"], rank=2, adapter="b"))
    gm.train()
    lora_fx.delete_adapter(gm, "default")
    assert lora_fx.blocks(gm) == first and all(a is b for a, b in zip(lora_fx.blocks(gm), first))
    assert copy.deepcopy(gm)(ids()).logits.shape == (2, 8, 97)


class SharedWeight(torch.nn.Module):
    """Reads a block's weight outside the block, before the block runs: the blocks cannot be cut."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))

    def forward(self, x):
        x = x * self.layers[0].weight.mean()
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_model_whose_blocks_cannot_be_cut_says_so_and_stays_flat():
    torch.manual_seed(0)
    model = SharedWeight()
    with pytest.warns(CaptureWarning, match=r"the graph stays flat in training mode, without per-block modules .*"
                                            r"block 'layers.0'"):
        gm = lora_fx.capture(model, (torch.randn(2, 4),))
    assert lora_fx.blocks(gm) == []
    x = torch.randn(3, 4)
    torch.testing.assert_close(gm(x), model(x))
