"""The graph module behaves like the module it replaces: its own buffers and parameter objects, moves and casts,
copies, saving, the captured calling convention, grad mode — and the user's model is never written."""

import copy
import io

import pytest
import torch

import lora_fx
from lora_fx import CallError, LoraSpec
from tests.conftest import (all_code, all_nodes, assert_graph_unchanged, assert_unchanged, captured, graph_snapshot,
                            ids, randomize_lora, snapshot, tiny_llama)


def adapted_llama():
    gm = captured("llama")
    lora_fx.apply(gm, LoraSpec(rank=4, alpha=8.0))
    randomize_lora(gm)
    return gm


def test_merged_parameters_are_their_own_objects_and_copy_makes_them_independent(llama):
    gm = lora_fx.apply(llama.eval(), LoraSpec(targets=["q_proj"], rank=2), (ids(),), {"use_cache": False})
    randomize_lora(gm)
    before_model, before_graph = snapshot(llama), snapshot(gm)
    merged = lora_fx.merge(gm)
    merged.requires_grad_(True)                      # flags never couple
    assert not any(p.requires_grad for n, p in gm.named_parameters() if ".lora_" not in n)
    assert_unchanged(llama, before_model)
    independent = lora_fx.merge(gm, copy=True)
    independent.requires_grad_(True)
    optimizer = torch.optim.SGD(independent.parameters(), lr=1.0)
    independent(ids()).logits.sum().backward()
    optimizer.step()                                 # trains the copy: neither gm nor the user's model moves
    assert_unchanged(llama, before_model)
    assert_unchanged(gm, before_graph)
    shared = merged.get_parameter("model.embed_tokens.weight")
    assert shared.data_ptr() == llama.model.embed_tokens.weight.data_ptr()          # no copy without copy=True
    assert independent.get_parameter("model.embed_tokens.weight").data_ptr() != shared.data_ptr()


def test_buffers_are_the_graphs_own():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).train()
    gm = lora_fx.capture(model, (torch.randn(3, 4),))
    before = snapshot(model)
    gm(torch.randn(5, 4) * 3)
    assert gm.get_buffer("1.num_batches_tracked") == 1
    assert_unchanged(model, before)
    assert gm.get_buffer("1.running_mean").data_ptr() != model[1].running_mean.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_casting_after_apply_recaptures_in_that_dtype_and_adapters_follow(dtype):
    gm = adapted_llama().eval()
    reference = copy.deepcopy(gm)
    x = ids(2, 6, seed=3)
    expected = reference(x).logits.double()
    gm.half() if dtype is torch.float16 else gm.to(dtype)
    assert gm.get_parameter("model.layers.0.self_attn.q_proj.lora_A.default.weight").dtype == dtype
    out = gm(x).logits
    assert out.dtype == dtype
    tolerance = {torch.float64: 1e-5, torch.bfloat16: 0.15, torch.float16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=tolerance)
    if dtype is torch.float64:
        gm.train()                                # the other mode is captured in the new dtype too
        assert gm(x).logits.dtype == dtype
        gm.float()
        torch.testing.assert_close(gm.eval()(x).logits.double(), expected, rtol=0, atol=tolerance)


def test_a_cast_that_cannot_be_captured_is_undone(monkeypatch):
    gm = adapted_llama()
    x = ids(2, 5)
    expected, before = gm(x).logits, graph_snapshot(gm)
    monkeypatch.setattr("lora_fx.programs.trace", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        gm.to(torch.float64)
    assert_graph_unchanged(gm, before)
    torch.testing.assert_close(gm(x).logits, expected, rtol=0, atol=0)


def test_deepcopy_is_independent():
    gm = adapted_llama()
    twin = copy.deepcopy(gm)
    x = ids(2, 5, seed=1)
    torch.testing.assert_close(twin(x).logits, gm(x).logits, rtol=0, atol=0)
    with torch.no_grad():
        twin.get_parameter("model.layers.0.self_attn.q_proj.lora_B.default.weight").add_(1.0)
        twin.get_parameter("model.norm.weight").mul_(2.0)
    lora_fx.apply(twin, LoraSpec(targets=["v_proj"], rank=2, adapter="b"))
    twin.train()
    assert lora_fx.adapters(gm) == ["default"] and not gm.training
    assert not torch.allclose(twin(x).logits, gm(x).logits)
    assert all(a.data_ptr() != b.data_ptr() for (_, a), (_, b) in zip(gm.named_parameters(), twin.named_parameters()))


def test_torch_save_and_load_round_trip():
    gm = adapted_llama().eval()
    lora_fx.apply(gm, LoraSpec(targets=["q_proj"], rank=2, adapter="b"))
    lora_fx.set_active(gm, ["b"])
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = ids(3, 4, seed=2)
    torch.testing.assert_close(loaded(x).logits, gm(x).logits, rtol=0, atol=0)
    assert lora_fx.adapters(loaded) == ["default", "b"] and lora_fx.active_adapters(loaded) == ["b"]
    assert not loaded.training and all_code(gm) == all_code(loaded)
    loaded.train()
    assert loaded(x).logits.requires_grad


def test_uncaptured_keywords_and_changed_constants_are_clear_errors():
    gm = captured("llama")
    x = ids()
    with pytest.raises(CallError, match=r"captured without the keyword input\(s\) \['labels'\].*example_kwargs"):
        gm(x, labels=x)
    with pytest.raises(CallError, match=r"use_cache=True differs from the captured use_cache=False"):
        gm(x, use_cache=True)
    with pytest.raises(CallError, match=r"missing input\(s\) \['input_ids'\]"):
        gm(use_cache=False)
    with pytest.raises(CallError, match=r"got 3 positional inputs, but the graph was captured with 2"):
        gm(x, False, x)
    torch.testing.assert_close(gm(input_ids=x).logits, gm(x, use_cache=False).logits)


def test_every_captured_keyword_is_accepted():
    torch.manual_seed(0)
    model = tiny_llama()
    x, mask = ids(2, 8), torch.ones(2, 8, dtype=torch.long)
    gm = lora_fx.capture(model, (), {"input_ids": x, "attention_mask": mask, "labels": x, "use_cache": False})
    out = gm(input_ids=x, attention_mask=mask, labels=x)
    expected = model(input_ids=x, attention_mask=mask, labels=x, use_cache=False)
    torch.testing.assert_close(out.loss, expected.loss)
    with pytest.raises(CallError, match=r"missing input\(s\) \['labels'\]"):
        gm(input_ids=x, attention_mask=mask)


class NoGradRegion(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x, index):
        with torch.no_grad():
            picked = torch.gather(x, 1, index)       # an out-of-range index raises inside the region
        return self.proj(x) + picked.sum()


def test_grad_mode_is_restored_when_a_forward_raises_inside_a_no_grad_region():
    gm = lora_fx.apply(NoGradRegion(), LoraSpec(rank=2), (torch.randn(3, 4), torch.zeros(3, 2, dtype=torch.long)))
    assert any(n.target is torch._C._set_grad_enabled for n in all_nodes(gm))
    with pytest.raises(RuntimeError):
        gm(torch.randn(3, 4), torch.full((3, 2), 99))
    assert torch.is_grad_enabled()
    assert gm(torch.randn(3, 4), torch.zeros(3, 2, dtype=torch.long)).requires_grad


def test_loading_a_state_dict_never_writes_the_users_weights(llama):
    gm = lora_fx.apply(llama, LoraSpec(rank=2), (ids(),), {"use_cache": False})
    before = snapshot(llama)
    state = {name: value + 1.0 for name, value in gm.state_dict().items()}
    gm.load_state_dict(state)
    assert_unchanged(llama, before)
    torch.testing.assert_close(gm.get_parameter("model.norm.weight"), llama.model.norm.weight + 1.0)
    torch.testing.assert_close(gm.get_parameter("model.layers.0.mlp.up_proj.lora_A.default.weight"),
                               state["model.layers.0.mlp.up_proj.lora_A.default.weight"])
