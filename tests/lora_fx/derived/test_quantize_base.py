"""quantize_base: outputs and gradients equal LoRA on torchao's own dequantized weights, training works with only
the quantized weights kept for backward, the base shrinks, and every way a graph is rebuilt keeps it quantized."""

import copy
import io
import subprocess
import sys

import peft
import pytest
import torch
import transformers

import lora_fx
from lora_fx import LoraSpec, QuantizeError
from lora_fx.passes.dequantize_reads import quantized_read
from lora_fx.quantize import dequantize, is_quantized
from tests.conftest import assert_graph_unchanged, captured, graph_snapshot, ids, randomize_lora

torchao_quantization = pytest.importorskip("torchao.quantization")
FORMATS = ["nf4", "int8"]
SPEC = LoraSpec(targets=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], rank=4, alpha=8.0)


def wide_llama() -> transformers.LlamaForCausalLM:
    """Every linear weight's element count divides by 64·256, as nf4's blocks need."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


_CAPTURE = {}


def wide_capture():
    if not _CAPTURE:
        _CAPTURE["gm"] = lora_fx.capture(wide_llama(), (ids(),), {"use_cache": False})
    return copy.deepcopy(_CAPTURE["gm"])


def library_dequantized(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """torchao's own round trip of a dense weight, independent of lora_fx."""
    if fmt == "nf4":
        return torchao_quantization.to_nf4(weight.detach()).get_original_weight()
    return torchao_quantization.Int8Tensor.from_hp(weight.detach(), torchao_quantization.PerRow()).dequantize()


def adapted(dora: bool = False):
    gm = lora_fx.apply(wide_capture(), LoraSpec(**{**SPEC.__dict__, "use_dora": dora}))
    randomize_lora(gm)
    return gm


def on_dequantized_base(gm, fmt):
    """`gm` with each adapted base weight replaced by torchao's dequantized copy: the reference."""
    reference = copy.deepcopy(gm)
    for site in reference.meta["lora_fx"].adapted_sites():
        reference.get_parameter(site.weight).data = library_dequantized(gm.get_parameter(site.weight), fmt)
    return reference


def base_bytes(tensor: torch.Tensor) -> int:
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(base_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_outputs_and_gradients_equal_lora_on_the_dequantized_weights(fmt, dora):
    gm = adapted(dora)
    before = graph_snapshot(gm)
    qgm = lora_fx.quantize_base(gm, fmt)
    assert_graph_unchanged(gm, before)                                   # the source is untouched
    reference = on_dequantized_base(gm, fmt)
    quantized = qgm.meta["lora_fx"].quantized
    assert sorted(quantized) == sorted(site.weight for site in gm.meta["lora_fx"].adapted_sites())
    assert all(is_quantized(qgm.get_parameter(name)) for name in quantized)
    for node in qgm.graph.nodes:                                         # no op but dequantize reads them
        if node.op == "get_attr" and node.target in quantized:
            assert {user.target for user in node.users} <= {dequantize, quantized_read}
    x = ids(3, 6, seed=5)
    ours, expected = qgm(x).logits, reference(x).logits
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(ours, gm(x).logits, atol=1e-4)            # quantization did change the base
    ours.pow(2).mean().backward()
    expected.pow(2).mean().backward()
    trainable = {name: p for name, p in qgm.named_parameters() if p.requires_grad}
    assert trainable.keys() == {name for name, p in reference.named_parameters() if p.requires_grad}
    for name, param in trainable.items():
        torch.testing.assert_close(param.grad, reference.get_parameter(name).grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("fmt", FORMATS)
def test_training_lowers_the_loss_and_backward_keeps_only_quantized_weights(fmt):
    qgm = lora_fx.quantize_base(adapted(dora=fmt == "nf4"), fmt)
    quantized = {name: qgm.get_parameter(name) for name in qgm.meta["lora_fx"].quantized}
    stored = {name: base_bytes(weight) for name, weight in quantized.items()}
    shapes = {tuple(weight.shape) for weight in quantized.values()}
    qgm.train()
    optimizer = torch.optim.AdamW([p for p in qgm.parameters() if p.requires_grad], lr=1e-2)
    x = ids(4, 8, seed=1)
    saved = []

    stored_dense = {p.untyped_storage().data_ptr() for p in qgm.parameters() if not is_quantized(p)}

    def pack(tensor):           # a weight-shaped tensor that no parameter stores is a dequantized weight
        if type(tensor) is torch.Tensor and tensor.untyped_storage().data_ptr() not in stored_dense:
            saved.append(tuple(tensor.shape))
        return tensor

    losses = []
    for step in range(8):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            logits = qgm(x).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert not shapes & set(saved), "a dequantized weight was kept for backward"
    assert all(qgm.get_parameter(name) is weight and base_bytes(weight) == stored[name]
               for name, weight in quantized.items())


@pytest.mark.parametrize("fmt, bound", [("nf4", 0.3), ("int8", 0.55)])
def test_base_weights_shrink(fmt, bound):
    gm = wide_capture()
    qgm = lora_fx.quantize_base(gm, fmt, modules="all-linear")
    names = list(qgm.meta["lora_fx"].quantized)
    assert len(names) == 14 and "lm_head.weight" not in names          # every linear but the output layer
    bf16_bytes = sum(gm.get_parameter(name).numel() * 2 for name in names)
    assert sum(base_bytes(qgm.get_parameter(name)) for name in names) <= bound * bf16_bytes


def test_modes_copies_saving_and_adapter_changes_keep_the_base_quantized(tmp_path):
    qgm = lora_fx.quantize_base(adapted(), "nf4")
    x = ids(3, 6, seed=5)
    expected = qgm(x).logits
    qgm.train()                                   # a mode captured after quantizing: capture sees stand-ins
    torch.testing.assert_close(qgm.eval()(x).logits, expected, rtol=0, atol=0)
    torch.testing.assert_close(copy.deepcopy(qgm)(x).logits, expected, rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(qgm, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    torch.testing.assert_close(loaded(x).logits, expected, rtol=0, atol=0)
    assert all(is_quantized(loaded.get_parameter(name)) for name in loaded.meta["lora_fx"].quantized)
    lora_fx.apply(qgm, LoraSpec(targets=["q_proj"], rank=2, adapter="b"))     # on a quantized weight
    with torch.no_grad():                         # b non-identity; the default adapter keeps its weights
        for name, param in qgm.named_parameters():
            if name.endswith(".b.weight"):
                param.normal_(0, 0.1)
    with_b = qgm(x).logits
    assert not torch.allclose(with_b, expected)
    lora_fx.delete_adapter(qgm, "b")
    torch.testing.assert_close(qgm(x).logits, expected, rtol=0, atol=0)
    assert all(is_quantized(qgm.get_parameter(name)) for name in qgm.meta["lora_fx"].quantized)


def test_merge_dequantizes_and_saved_adapters_are_plain_peft_adapters(tmp_path):
    gm = adapted()
    qgm = lora_fx.quantize_base(gm, "int8")
    x = ids(3, 6, seed=5)
    merged = lora_fx.merge(qgm)
    assert not merged.meta["lora_fx"].quantized and not any(is_quantized(p) for p in merged.parameters())
    torch.testing.assert_close(merged(x).logits, qgm(x).logits, rtol=0, atol=1e-5)
    requantized = lora_fx.merge(qgm, requantize=True)
    assert requantized.meta["lora_fx"].quantized == qgm.meta["lora_fx"].quantized
    torch.testing.assert_close(requantized(x).logits, qgm(x).logits, rtol=0, atol=0.05)   # a new rounding
    lora_fx.save_adapter(qgm, tmp_path)
    theirs = peft.PeftModel.from_pretrained(wide_llama(), str(tmp_path))
    torch.testing.assert_close(theirs(input_ids=x, use_cache=False).logits, gm(x).logits, rtol=0, atol=1e-5)


def test_onnx_export_of_a_quantized_base_merged_and_unmerged(tmp_path):
    pytest.importorskip("onnxruntime")
    qgm = lora_fx.quantize_base(adapted(dora=True), "nf4")
    qgm.eval()
    lora_fx.export_onnx(qgm, tmp_path / "m.onnx")                      # verified in onnxruntime against torch
    lora_fx.export_onnx(lora_fx.quantize_base(adapted(), "int8").eval(), tmp_path / "u.onnx", merged=False)


class TiedProjection(torch.nn.Module):
    """A linear layer (not the output layer) whose weight is also an embedding table."""

    def __init__(self):
        super().__init__()
        self.emb, self.proj, self.out = torch.nn.Embedding(8, 4), torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)
        self.proj.weight = self.emb.weight

    def forward(self, ids):
        return self.out(self.proj(self.emb(ids)))


def test_bad_input_is_refused_naming_the_module_and_changes_nothing():
    qgm = lora_fx.quantize_base(adapted(), "nf4")
    before = graph_snapshot(qgm)
    with pytest.raises(QuantizeError, match=r"already quantized .*module 'model\.layers\.\d\.\w+\.\w+_proj' as nf4"):
        lora_fx.quantize_base(qgm, "int8")
    assert_graph_unchanged(qgm, before)
    narrow = lora_fx.apply(captured("llama"), LoraSpec(targets=["q_proj", "k_proj"], rank=2))
    before = graph_snapshot(narrow)
    with pytest.raises(QuantizeError, match=r"module 'model\.layers\.0\.self_attn\.k_proj' \(weight \(16, 32\)\): "
                                            r"nf4 .* divide by 16384; 16x32 = 512 does not"):
        lora_fx.quantize_base(narrow, "nf4")
    with pytest.raises(QuantizeError, match=r"unknown quantization format 'fp3'; supported: \['bnb-fp4', 'bnb-nf4', "
                                            r"'int8', 'nf4'\]"):
        lora_fx.quantize_base(narrow, "fp3")
    with pytest.raises(QuantizeError, match=r"no adapted linear site"):
        lora_fx.quantize_base(captured("llama"), "int8")
    tied = lora_fx.capture(TiedProjection(), (torch.tensor([[1, 2]]),))
    with pytest.raises(QuantizeError, match=r"module 'proj': its weight is also read by .*embedding"):
        lora_fx.quantize_base(tied, "int8", modules="all-linear")
    assert_graph_unchanged(narrow, before)
    int8 = lora_fx.quantize_base(adapted(), "int8")       # torchao's int8 tensors keep their dtype under .double()
    before = graph_snapshot(int8)
    with pytest.raises(QuantizeError, match=r"'model\.layers\.0\.self_attn\.q_proj\.weight' is a int8 tensor of dtype "
                                            r"torch\.float32, but the graph's other weights are \['torch\.float64'\]"):
        int8.double()
    assert_graph_unchanged(int8, before)


def test_lora_fx_imports_and_works_without_torchao():
    program = ("import sys; sys.modules['torchao'] = None\n"
               "import torch, lora_fx\n"
               "gm = lora_fx.apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), lora_fx.LoraSpec(targets=['0']))\n"
               "assert gm(torch.ones(2, 4)).shape == (2, 4)\n"
               "try:\n    lora_fx.quantize_base(gm, 'int8')\nexcept ImportError as err:\n    print(err)\n")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert 'pip install "lora_fx[quant]"' in result.stdout
    assert "Failed to load" not in result.stderr
