"""torch.compile on lora_fx graphs: fullgraph for training and inference, and no recompiles when adapters are
switched, disabled or hot-swapped (scales are buffers, slots keep their shapes)."""

import copy

import peft
import pytest
import torch
from torch._dynamo.utils import counters

import lora_fx
from lora_fx import AdapterError, LoraSpec
from tests.conftest import assert_unchanged, ids, randomize_lora, snapshot, tiny_llama

pytestmark = pytest.mark.slow
CAPTURE = {"example_args": (ids(),), "example_kwargs": {"use_cache": False}}


@pytest.fixture
def small_llama():
    torch.manual_seed(0)
    return tiny_llama(layers=1).eval()


def graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


def test_fullgraph_training_matches_eager(small_llama):
    """The training graph, with its passes (lean dropout's custom op, grouped-query SDPA): from the same seed the
    compiled step draws the same dropout masks as eager."""
    torch._dynamo.reset()
    gm = lora_fx.apply(small_llama, LoraSpec(rank=4, dropout=0.2), **CAPTURE).train()
    randomize_lora(gm)
    reference = copy.deepcopy(gm)
    compiled = torch.compile(gm, fullgraph=True)
    x = ids(2, 8, seed=1)
    torch.manual_seed(3)
    ours = compiled(x).logits
    torch.manual_seed(3)
    expected_logits = reference(x).logits
    torch.testing.assert_close(ours, expected_logits, rtol=1e-5, atol=1e-5)
    ours.pow(2).mean().backward()
    expected_logits.pow(2).mean().backward()
    expected = dict(reference.named_parameters())
    for name, param in gm.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, expected[name].grad, rtol=1e-4, atol=1e-6)


def test_switching_disabling_and_hot_swapping_never_recompile(small_llama, tmp_path):
    torch._dynamo.reset()
    gm = lora_fx.apply(small_llama, LoraSpec(rank=4, alpha=8.0), **CAPTURE)
    lora_fx.apply(gm, LoraSpec(targets=["q_proj", "v_proj"], rank=2, adapter="b"))
    randomize_lora(gm)
    compiled = torch.compile(gm, fullgraph=True)
    x = ids(2, 8, seed=2)
    states = []

    def check():
        with torch.no_grad():
            torch.testing.assert_close(compiled(x).logits, gm(x).logits, rtol=1e-5, atol=1e-5)
            states.append(gm(x).logits)

    check()
    compiled_once = graphs_compiled()
    lora_fx.set_active(gm, "b")
    check()
    with lora_fx.disabled(gm):
        check()
        torch.testing.assert_close(states[-1], small_llama(x, use_cache=False).logits)
    lora_fx.set_active(gm, ["default", "b"])
    check()
    other = peft.get_peft_model(copy.deepcopy(small_llama), peft.LoraConfig(target_modules=["q_proj", "o_proj"],
                                                                            r=2, lora_alpha=3))
    randomize_lora(other, seed=7)
    other.save_pretrained(str(tmp_path))
    lora_fx.hotswap_adapter(gm, tmp_path, adapter="default")      # smaller rank, subset of sites
    lora_fx.set_active(gm, "default")
    check()
    torch.testing.assert_close(states[-1], other(input_ids=x, use_cache=False).logits, rtol=0, atol=1e-5)
    assert graphs_compiled() == compiled_once
    assert not any(torch.allclose(a, b) for a, b in zip(states, states[1:]))


def test_hot_swap_refuses_bigger_ranks_and_new_sites_and_changes_nothing(small_llama, tmp_path):
    gm = lora_fx.apply(small_llama, LoraSpec(targets=["q_proj"], rank=2), **CAPTURE)
    other = peft.get_peft_model(copy.deepcopy(small_llama), peft.LoraConfig(target_modules=["q_proj", "k_proj"], r=4))
    other.save_pretrained(str(tmp_path))
    before = snapshot(gm)
    with pytest.raises(AdapterError) as caught:
        lora_fx.hotswap_adapter(gm, tmp_path)
    assert "rank 4 > the slot's rank 2" in str(caught.value)
    assert "'model.layers.0.self_attn.k_proj' is not adapted by slot 'default'" in str(caught.value)
    assert_unchanged(gm, before)


def test_compile_caches_are_keyed_on_lora_fx_ops_and_keep_a_users_tag(monkeypatch):
    from torch._inductor.codecache import FxGraphHashDetails

    from lora_fx.ops import cache_key

    with torch.compiler.config.patch(cache_key_tag="mine"):        # restored on exit (a config, not a plain attribute)
        tag = cache_key.tag_compile_caches()
        assert tag == f"mine+lora_fx-ops-{cache_key.ops_digest()}" and cache_key.tag_compile_caches() == tag
        details = FxGraphHashDetails(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)), [], {}, [])
        assert details.cache_key_tag == tag                         # what Inductor hashes into the key
        monkeypatch.setattr(cache_key, "ops_digest", lambda: "changed-op")
        assert cache_key.tag_compile_caches() == "mine+lora_fx-ops-changed-op"    # another op source: another key
