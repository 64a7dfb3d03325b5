"""ONNX export checked by running the files in onnxruntime against torch."""

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import lora_fx
from lora_fx import LoraSpec
from lora_fx.errors import ExportError
from lora_fx.exporters.onnx import export_onnx, export_onnx_adapter
from tests.conftest import all_nodes, captured, ids, randomize_lora

CAPTURE = {"example_args": (ids(),), "example_kwargs": {"use_cache": False}}
SHAPES = [(1, 3), (3, 5), (4, 11)]     # none seen at capture (2, 8)


def session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_export_equals_torch_with_the_plain_node_count(arch, tmp_path):
    plain = captured(arch)
    gm = lora_fx.apply(copy.deepcopy(plain), LoraSpec(rank=4, alpha=8.0))
    randomize_lora(gm)
    export_onnx(gm, tmp_path / "merged.onnx")
    merged = onnx.load(tmp_path / "merged.onnx")
    if arch == "llama":                                 # one plain export is enough to compare node counts with
        export_onnx(plain, tmp_path / "plain.onnx")
        assert len(merged.graph.node) == len(onnx.load(tmp_path / "plain.onnx").graph.node)
    assert [i.name for i in merged.graph.input] == ["input_ids"] and [o.name for o in merged.graph.output] == ["logits"]
    assert all(d.dim_param for d in merged.graph.input[0].type.tensor_type.shape.dim)    # batch and seq symbolic
    run = session(tmp_path / "merged.onnx")
    for batch, seq in SHAPES:
        x = ids(batch, seq, seed=batch * seq)
        np.testing.assert_allclose(run.run(None, {"input_ids": x.numpy()})[0], gm(x).logits.detach().numpy(),
                                   atol=1e-4, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.onnx"] + (["plain.onnx"] if arch == "llama" else [])


def test_unmerged_export_swaps_adapters_of_different_ranks_in_one_session(tmp_path):
    gm = lora_fx.apply(captured("llama"), LoraSpec(rank=4, alpha=8.0))
    lora_fx.apply(gm, LoraSpec(targets=["q_proj", "v_proj"], rank=2, alpha=6.0, adapter="b"))
    randomize_lora(gm)
    gm.eval()
    lora_fx.set_active(gm, "b")
    export_onnx(gm, tmp_path / "unmerged.onnx", merged=False)
    for name in ("default", "b"):
        export_onnx_adapter(gm, tmp_path / f"{name}.onnx_adapter", adapter=name)
    graph = onnx.load(tmp_path / "unmerged.onnx").graph
    lora_inputs = [i.name for i in graph.input if ".lora_" in i.name]
    assert len(lora_inputs) == 28 and "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in lora_inputs
    assert {i.name for i in graph.initializer} >= set(lora_inputs)          # defaults (the active adapter)
    run = session(tmp_path / "unmerged.onnx")
    x = ids(3, 5, seed=9)
    outputs = {}
    for name in ("default", "b"):
        adapter = ort.LoraAdapter()
        adapter.Load(str(tmp_path / f"{name}.onnx_adapter"))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        outputs[name] = run.run(None, {"input_ids": x.numpy()}, options)[0]
        lora_fx.set_active(gm, name)
        np.testing.assert_allclose(outputs[name], gm(x).logits.detach().numpy(), atol=1e-4, rtol=0)
    assert not np.allclose(outputs["default"], outputs["b"], atol=1e-3)
    lora_fx.set_active(gm, "b")
    np.testing.assert_allclose(run.run(None, {"input_ids": x.numpy()})[0], gm(x).logits.detach().numpy(), atol=1e-4)


def test_export_errors_are_clear_and_leave_no_files(mlp, tmp_path):
    gm = lora_fx.apply(mlp.eval(), LoraSpec(rank=2), example_args=(torch.randn(3, 8),))
    with pytest.raises(ExportError, match="is not a writable directory"):
        export_onnx(gm, tmp_path / "missing" / "m.onnx")
    with pytest.raises(ExportError, match="it is a directory"):
        export_onnx(gm, tmp_path)
    with pytest.raises(lora_fx.AdapterError, match=r"unknown adapter\(s\) \['nope'\]"):
        export_onnx_adapter(gm, tmp_path / "x.onnx_adapter", adapter="nope")
    with pytest.raises(ExportError, match="needs the example inputs"):
        export_onnx(lora_fx.apply(mlp, LoraSpec(rank=2)), tmp_path / "fx.onnx")
    with pytest.raises(ExportError, match="no adapter, so there is nothing to keep unmerged"):
        export_onnx(lora_fx.capture(mlp, (torch.randn(3, 8),)), tmp_path / "u.onnx", merged=False)
    lora_fx.apply(gm, LoraSpec(rank=2, adapter="b"))
    with pytest.raises(ExportError, match=r"one adapter at a time, but \['default', 'b'\] are active"):
        export_onnx(gm, tmp_path / "u.onnx", merged=False)
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_leaves_no_file(mlp, tmp_path):
    gm = lora_fx.apply(mlp.eval(), LoraSpec(rank=2), example_args=(torch.randn(3, 8),))
    randomize_lora(gm)
    with pytest.raises(ExportError, match="differs from torch"):
        export_onnx(gm, tmp_path / "m.onnx", atol=-1.0)       # an impossible tolerance: every output "differs"
    assert list(tmp_path.iterdir()) == []


def test_merged_fused_op_exports_through_its_decomposition_and_runs_in_onnxruntime(tmp_path):
    from lora_fx.ops import FUSED_OP
    from tests.passes.test_lower_mamba2 import HandWrittenMamba2

    torch.manual_seed(0)
    gm = lora_fx.apply(HandWrittenMamba2().eval(), LoraSpec(targets=["in_proj", "out_proj"], rank=2),
                       example_args=(torch.randn(2, 8, 16),))
    randomize_lora(gm, std=0.05)
    assert any(n.target is FUSED_OP for n in all_nodes(gm))
    export_onnx(gm, tmp_path / "mamba2.onnx")                 # through the op's registered decomposition
    run = session(tmp_path / "mamba2.onnx")
    for batch, length in ((3, 9), (1, 21)):                        # lengths not multiples of chunk_size, unseen
        u = torch.randn(batch, length, 16)
        np.testing.assert_allclose(run.run(None, {"u": u.numpy()})[0], gm(u).detach().numpy(), atol=1e-4, rtol=0)


class EmbedConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 8)
        self.conv = torch.nn.Conv1d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, ids):
        hidden = self.conv(self.embed(ids).transpose(1, 2)).transpose(1, 2)
        return self.head(hidden.relu())


def test_embedding_and_conv_sites_export_merged_and_unmerged(tmp_path):
    torch.manual_seed(0)
    example = torch.randint(0, 20, (2, 6))
    gm = lora_fx.apply(EmbedConv().eval(), LoraSpec(targets=["embed", "conv", "head"], rank=2), (example,))
    lora_fx.apply(gm, LoraSpec(targets=["embed", "conv"], rank=3, adapter="b"))
    randomize_lora(gm)
    lora_fx.set_active(gm, "default")
    export_onnx(gm, tmp_path / "merged.onnx")
    export_onnx(gm, tmp_path / "unmerged.onnx", merged=False)
    export_onnx_adapter(gm, tmp_path / "b.onnx_adapter", adapter="b")
    x = torch.randint(0, 20, (3, 9))
    np.testing.assert_allclose(session(tmp_path / "merged.onnx").run(None, {"ids": x.numpy()})[0],
                               gm(x).detach().numpy(), atol=1e-5)
    adapter = ort.LoraAdapter()
    adapter.Load(str(tmp_path / "b.onnx_adapter"))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    swapped = session(tmp_path / "unmerged.onnx").run(None, {"ids": x.numpy()}, options)[0]
    lora_fx.set_active(gm, "b")
    np.testing.assert_allclose(swapped, gm(x).detach().numpy(), atol=1e-5)
