"""mixed_batch: every row of a mixed batch equals that row run alone with its adapter active (the base for -1),
forward and gradients, on Llama (Linear sites) and GPT-2 (Conv1D sites); the source graph is untouched; the LoRA
parameters are the source's; torch.compile never recompiles on new adapter_ids; ONNX serves a mixed batch; bad
input is a clear error that changes nothing."""

from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

import lora_fx
from lora_fx import AdapterError, CallError, LoraSpec
from lora_fx.ops.mixed_lora import SHRINK_OP
from tests.conftest import (VOCAB, all_nodes, assert_graph_unchanged, captured, graph_snapshot, ids,
                            randomize_lora, tiny_llama)
from tests.lora_fx.sites.test_linear_kind import MatmulForms, reference

TARGETS = {"llama": (["q_proj", "v_proj"], ["o_proj", "up_proj"]), "gpt2": (["c_attn"], ["c_fc", "attn.c_proj"])}


def three_adapters(arch: str):
    """Adapters of different ranks, alphas and site sets (most sites lack some adapter)."""
    some, others = TARGETS[arch]
    gm = captured(arch)
    lora_fx.apply(gm, LoraSpec(rank=4, alpha=8.0, adapter="a"))
    lora_fx.apply(gm, LoraSpec(targets=some, rank=2, alpha=3.0, adapter="b"))
    lora_fx.apply(gm, LoraSpec(targets=others, rank=6, alpha=5.0, use_rslora=True, adapter="c"))
    randomize_lora(gm)
    return gm


def lora_grads(module) -> dict:
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_each_row_equals_that_row_alone_forward_and_gradients(arch):
    gm = three_adapters(arch)
    order = ["c", "a", "b"]                                   # ids follow this order, not the applied one
    mixed = lora_fx.mixed_batch(gm, order)
    assert lora_fx.adapters(mixed) == order
    x, rows = ids(7, 8, seed=3), torch.tensor([1, 0, -1, 2, 1, 0, 2])
    weights = torch.randn(7, 8, VOCAB, generator=torch.Generator().manual_seed(4))
    out = mixed(x, adapter_ids=rows).logits
    (out * weights).sum().backward()
    got = lora_grads(mixed)
    for index, name in enumerate([None, *order], start=-1):
        chosen = rows == index
        if name is None:
            lora_fx.set_active(gm, [])
        else:
            lora_fx.set_active(gm, name)
        expected = gm(x[chosen]).logits
        torch.testing.assert_close(out[chosen], expected, rtol=1e-5, atol=1e-5)
        (expected * weights[chosen]).sum().backward()
    want = lora_grads(gm)
    assert got.keys() == want.keys() and len(got) == 2 * sum(map(len, gm.meta["lora_fx"].sites.values()))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_every_matmul_form_gets_each_rows_delta_through_transposes_slices_and_casts():
    torch.manual_seed(0)
    model = MatmulForms()
    targets = list("abcdeg")                                   # "f" reads W @ x (below)
    gm = lora_fx.apply(model, LoraSpec(targets=targets, rank=2, alpha=3.0, adapter="a"), (torch.randn(2, 5, 8),))
    lora_fx.apply(gm, LoraSpec(targets=targets[1:], rank=3, alpha=2.0, adapter="b"))
    randomize_lora(gm)
    mixed = lora_fx.mixed_batch(gm, ["b", "a"])
    x, rows = torch.randn(4, 3, 8), torch.tensor([1, -1, 0, 1])
    got = mixed(x, adapter_ids=rows)
    for row, index in enumerate(rows.tolist()):
        factors = lora_fx.adapter_weights(gm, ["b", "a"][index]) if index >= 0 else {}
        torch.testing.assert_close(got[row], reference(model, factors)(x[row:row + 1])[0], rtol=1e-5, atol=1e-5)
    lora_fx.apply(gm, LoraSpec(targets=["f"], rank=2, adapter="c"))
    before = graph_snapshot(gm)
    with pytest.raises(AdapterError, match=r"site 'f' is read as W @ x .*: its batch is not dim 0 of the input"):
        lora_fx.mixed_batch(gm, ["a", "c"])
    assert_graph_unchanged(gm, before)


def test_source_untouched_and_its_active_set_or_disabled_state_do_not_matter():
    gm = three_adapters("llama")
    lora_fx.set_active(gm, ["b"])
    before = graph_snapshot(gm)
    mixed = lora_fx.mixed_batch(gm, ["a", "c"])
    x, rows = ids(4, 6, seed=5), torch.tensor([0, 1, -1, 1])
    out = mixed(x, adapter_ids=rows).logits
    assert_graph_unchanged(gm, before)
    with lora_fx.disabled(gm):
        torch.testing.assert_close(mixed(x, adapter_ids=rows).logits, out, rtol=0, atol=0)
    lora_fx.set_active(gm, "c")
    torch.testing.assert_close(out[[1, 3]], gm(x[[1, 3]]).logits, rtol=1e-5, atol=1e-5)
    counts = Counter(n.target for n in all_nodes(mixed))
    assert counts[SHRINK_OP] == 14 and not any(n.meta.get("lora_fx", {}).get("role") == "add"
                                               for n in all_nodes(mixed))
    assert not any(".b." in name for name in mixed.state_dict())


def test_blocks_stay_blocks_and_equal_the_flat_graph():
    gm = three_adapters("llama")
    mixed = lora_fx.mixed_batch(gm, ["c", "a", "b"])
    blocks = lora_fx.blocks(mixed)
    assert [type(b).__name__ for b in blocks] == ["LlamaDecoderLayer"] * 2
    assert all(Counter(n.target for n in b.graph.nodes)[SHRINK_OP] == 7 for b in blocks)    # each routes its sites
    torch.manual_seed(0)
    flat = lora_fx.capture(tiny_llama(), (ids(),), {"use_cache": False}, blocks=False)
    for name in ("a", "b", "c"):
        lora_fx.apply(flat, gm.meta["lora_fx"].specs[name])
    flat.load_state_dict({k: v for k, v in gm.state_dict().items() if ".lora_" in k}, strict=False)
    mixed_flat = lora_fx.mixed_batch(flat, ["c", "a", "b"])
    assert lora_fx.blocks(mixed_flat) == []
    x, rows = ids(4, 6, seed=9), torch.tensor([2, 0, -1, 1])
    torch.testing.assert_close(mixed(x, adapter_ids=rows).logits, mixed_flat(x, adapter_ids=rows).logits,
                               rtol=1e-5, atol=1e-5)


def test_parameters_are_the_sources_so_training_and_saving_work(tmp_path):
    gm = three_adapters("llama")
    mixed = lora_fx.mixed_batch(gm, ["a", "b"])
    for name, param in mixed.named_parameters():
        if ".lora_" in name:
            assert param is gm.get_parameter(name) and param.requires_grad
        else:
            assert param is not gm.get_parameter(name) and not param.requires_grad
            assert param.data_ptr() == gm.get_parameter(name).data_ptr()
    lora_fx.save_adapter(mixed, tmp_path / "from_mixed", adapter="b")
    lora_fx.save_adapter(gm, tmp_path / "from_source", adapter="b")
    saved, expected = (load_file(str(tmp_path / folder / "adapter_model.safetensors"))
                       for folder in ("from_mixed", "from_source"))
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    x, rows = ids(4, 6, seed=6), torch.tensor([0, 1, 1, 0])
    optimizer = torch.optim.SGD([p for p in mixed.parameters() if p.requires_grad], lr=0.5)
    lora_fx.set_active(gm, "b")
    before = gm(x[1:3]).logits.detach()
    mixed(x, adapter_ids=rows).logits.pow(2).mean().backward()
    optimizer.step()
    after = gm(x[1:3]).logits
    assert not torch.allclose(before, after)                              # training mixed trained gm's "b"
    torch.testing.assert_close(mixed(x, adapter_ids=rows).logits[1:3], after, rtol=1e-5, atol=1e-5)   # follows


def test_fx_graphs_and_each_adapters_own_dropout(mlp):
    gm = lora_fx.apply(mlp, LoraSpec(rank=2, dropout=0.1, adapter="a"))        # torch.fx trace, training mode
    lora_fx.apply(gm, LoraSpec(targets=["up"], rank=3, dropout=0.3, adapter="b"))
    lora_fx.apply(gm, LoraSpec(rank=1, adapter="c"))
    randomize_lora(gm)
    mixed = lora_fx.mixed_batch(gm, ["a", "b", "c"])

    def shrinks_per_site():
        return Counter(n.meta["lora_fx"]["site"] for n in all_nodes(mixed) if n.target is SHRINK_OP)

    assert shrinks_per_site() == {"up": 3, "down": 2}           # one projection per dropout rate at the site
    mixed.eval(), gm.eval()
    assert shrinks_per_site() == {"up": 1, "down": 1}
    x, rows = torch.randn(5, 8), torch.tensor([2, -1, 0, 1, 0])
    out = mixed(x, adapter_ids=rows)
    for index, name in enumerate(["a", "b", "c"]):
        lora_fx.set_active(gm, name)
        torch.testing.assert_close(out[rows == index], gm(x[rows == index]), rtol=1e-5, atol=1e-6)
    with lora_fx.disabled(gm):
        torch.testing.assert_close(out[1], gm(x)[1], rtol=0, atol=0)


def test_bad_adapters_are_clear_errors_that_change_nothing():
    gm = three_adapters("llama")
    lora_fx.apply(gm, LoraSpec(targets=["embed_tokens"], rank=2, adapter="e"))
    lora_fx.apply(gm, LoraSpec(targets=["q_proj"], rank=2, adapter="d", use_dora=True))
    before = graph_snapshot(gm)
    with pytest.raises(AdapterError, match="adapter 'd' is a DoRA adapter: mixed_batch routes plain LoRA adapters "
                                           "only"):
        lora_fx.mixed_batch(gm, ["a", "d"])
    with pytest.raises(AdapterError, match="adapter 'e' adapts 'model.embed_tokens', a site of kind 'embedding': "
                                           "mixed_batch routes linear sites only"):
        lora_fx.mixed_batch(gm, ["a", "e"])
    with pytest.raises(AdapterError,
                       match=r"unknown adapter\(s\) \['zz'\]; this graph has \['a', 'b', 'c', 'e', 'd'\]"):
        lora_fx.mixed_batch(gm, ["a", "zz"])
    with pytest.raises(AdapterError, match="needs at least one adapter"):
        lora_fx.mixed_batch(gm, [])
    with pytest.raises(AdapterError, match=r"adapter\(s\) \['a'\] listed more than once"):
        lora_fx.mixed_batch(gm, ["a", "b", "a"])
    site = "model.layers.1.self_attn.q_proj"
    factor = gm.get_parameter(f"{site}.lora_A.b.weight")
    original = factor.data
    factor.data = original.double()
    with pytest.raises(AdapterError, match=f"site '{site}': the adapters' factors cannot be stacked"):
        lora_fx.mixed_batch(gm, ["a", "b"])
    factor.data = original
    assert_graph_unchanged(gm, before)

    mixed = lora_fx.mixed_batch(gm, ["a", "b"])                   # the unchosen DoRA adapter leaves nothing behind
    assert not [name for name in mixed.state_dict() if ".d." in name or "magnitude" in name]
    before = graph_snapshot(mixed)
    with pytest.raises(AdapterError, match="adapter 'd2' is a DoRA adapter: mixed_batch routes plain LoRA adapters"):
        lora_fx.apply(mixed, LoraSpec(targets=["o_proj"], rank=2, adapter="d2", use_dora=True))
    assert_graph_unchanged(mixed, before)


def test_bad_adapter_ids_are_clear_errors():
    mixed = lora_fx.mixed_batch(three_adapters("llama"), ["a", "b"])
    x = ids(3, 5)
    cases = [({}, r"missing input\(s\) \['adapter_ids'\]"),
             ({"adapter_ids": torch.tensor([0.0, 1.0, 1.0])}, "must be int32 or int64, got torch.float32"),
             ({"adapter_ids": torch.tensor([0, 1])}, "has 2 entries, but the batch has 3 rows"),
             ({"adapter_ids": torch.tensor([[0, 1, 1]])}, r"must be 1-D .* got shape \(1, 3\)"),
             ({"adapter_ids": torch.tensor([0, 2, -3])}, r"\[-3, 2\] out of range: .* 2 adapter\(s\), .* \[-1, 1\]"),
             ({"adapter_ids": torch.zeros(3, dtype=torch.int64, device="meta")}, "is on meta, but the model's")]
    for kwargs, message in cases:
        with pytest.raises(CallError, match=message):
            mixed(x, **kwargs)


@pytest.mark.slow
def test_compiled_fullgraph_never_recompiles_for_new_adapter_ids_or_batch_sizes():
    torch._dynamo.reset()
    torch.manual_seed(0)
    gm = lora_fx.apply(tiny_llama(layers=1), LoraSpec(rank=4, alpha=8.0, adapter="a"), (ids(),), {"use_cache": False})
    lora_fx.apply(gm, LoraSpec(targets=["q_proj", "v_proj"], rank=2, adapter="b"))
    randomize_lora(gm)
    mixed = lora_fx.mixed_batch(gm, ["a", "b"]).eval()
    compiled = torch.compile(mixed, fullgraph=True, dynamic=True)
    compiled_once = None
    with torch.no_grad():
        for batch, seq, rows in [(3, 8, [1, -1, 0]), (3, 8, [0, 0, 0]), (5, 6, [1, 0, -1, -1, 1]), (2, 9, [-1, -1])]:
            x, rows = ids(batch, seq, seed=batch), torch.tensor(rows)
            torch.testing.assert_close(compiled(x, adapter_ids=rows).logits, mixed(x, adapter_ids=rows).logits,
                                       rtol=1e-5, atol=1e-5)
            compiled_once = compiled_once or counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == compiled_once


def test_onnx_serves_a_mixed_batch_in_one_run(tmp_path):
    import onnx
    import onnxruntime as ort

    gm = lora_fx.apply(captured("gpt2"), LoraSpec(rank=4, alpha=8.0, adapter="a"))
    lora_fx.apply(gm, LoraSpec(targets=["c_attn"], rank=2, alpha=3.0, adapter="b"))
    randomize_lora(gm)
    mixed = lora_fx.mixed_batch(gm, ["a", "b"]).eval()
    lora_fx.export_onnx(mixed, tmp_path / "mixed.onnx")
    inputs = onnx.load(tmp_path / "mixed.onnx").graph.input
    assert [i.name for i in inputs] == ["input_ids", "adapter_ids"]
    batch_dims = [i.type.tensor_type.shape.dim[0].dim_param for i in inputs]
    assert batch_dims[0] and batch_dims[0] == batch_dims[1]                 # symbolic, and the same batch
    session = ort.InferenceSession(str(tmp_path / "mixed.onnx"), providers=["CPUExecutionProvider"])
    x, rows = ids(5, 7, seed=8), torch.tensor([1, -1, 0, 1, 0])
    logits = session.run(None, {"input_ids": x.numpy(), "adapter_ids": rows.numpy()})[0]
    np.testing.assert_allclose(logits, mixed(x, adapter_ids=rows).logits.detach().numpy(), atol=1e-4, rtol=0)


def test_a_site_read_with_rows_that_are_not_the_batch_is_refused():
    """nn.MultiheadAttention reads out_proj on (L·N, E) rows, sequence-major: routing them by batch row would be
    wrong, so it is refused; linear1, read on (N, L, E), routes."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(3, 5, 16)
    gm = lora_fx.apply(layer, LoraSpec(targets=["out_proj", "linear1"], rank=2, adapter="a"), (x,))
    before = graph_snapshot(gm)
    with pytest.raises(AdapterError, match="site 'self_attn.out_proj' is read .* with an input whose dim 0 is not the "
                                           "batch"):
        lora_fx.mixed_batch(gm, ["a"])
    assert_graph_unchanged(gm, before)
    lora_fx.apply(gm, LoraSpec(targets=["linear1"], rank=2, adapter="b"))
    randomize_lora(gm)
    mixed = lora_fx.mixed_batch(gm, ["b"])
    lora_fx.set_active(gm, "b")
    torch.testing.assert_close(mixed(x, adapter_ids=torch.tensor([0, 0, 0])), gm(x), rtol=0, atol=1e-6)
