"""lora_fx.checkpoint: per-block activation checkpointing that changes no output or gradient, recomputes what its
policy says (counted op by op in the backward), and refuses what it cannot do without changing anything."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lora_fx
from lora_fx import AdapterError, LoraSpec
from lora_fx.ops import COUNTER_DROPOUT_LINEAR
from tests.conftest import all_nodes, assert_graph_unchanged, captured, graph_snapshot, ids, randomize_lora, tiny_llama

aten = torch.ops.aten
SPEC = LoraSpec(rank=4, alpha=8.0, dropout=0.1)        # dropout: the recomputation must draw the same masks


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] = self.counts.get(func, 0) + 1
        return func(*args, **(kwargs or {}))


def adapted(training: bool = True):
    gm = captured("llama", training)
    lora_fx.apply(gm, SPEC)
    randomize_lora(gm)
    return gm


def step(gm):
    """Outputs, LoRA gradients and the ops the backward ran, from a seeded training step."""
    gm.zero_grad()
    torch.manual_seed(7)
    logits = gm(ids(2, 8, seed=3)).logits
    with CountOps() as backward:
        logits.pow(2).mean().backward()
    grads = {name: p.grad.clone() for name, p in gm.named_parameters() if p.requires_grad}
    return logits.detach(), grads, backward.counts


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_outputs_and_gradients_are_unchanged_and_the_policy_decides_what_is_recomputed(policy):
    plain = adapted()
    assert any(n.target is COUNTER_DROPOUT_LINEAR for n in all_nodes(plain))    # counter masks, seeds a block input
    logits, grads, plain_ops = step(plain)
    checkpointed = copy.deepcopy(plain)
    assert lora_fx.checkpoint(checkpointed, policy) is checkpointed
    assert "run_block" in checkpointed.code
    logits_c, grads_c, ops = step(checkpointed)
    torch.testing.assert_close(logits_c, logits, rtol=0, atol=0)
    assert grads_c.keys() == grads.keys() and len(grads) == 28         # all-linear, 2 layers
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=0, atol=0, msg=name)
    # the forward's RMSNorm (rsqrt) runs again in the backward under both policies; the matmuls (mm) only under full
    assert plain_ops.get(aten.rsqrt.default, 0) == 0 and ops.get(aten.rsqrt.default, 0) > 0
    extra_mm = ops.get(aten.mm.default, 0) - plain_ops.get(aten.mm.default, 0)
    assert extra_mm > 0 if policy == "full" else extra_mm == 0
    shrinks_again = ops.get(COUNTER_DROPOUT_LINEAR, 0)                  # selective keeps the LoRA shrinks' outputs
    assert shrinks_again > 0 if policy == "full" else shrinks_again == 0


def test_policy_survives_new_adapters_copies_and_turns_off():
    gm = adapted()
    plain_code = gm.code
    lora_fx.checkpoint(gm, "full")
    state = gm.meta["lora_fx"]
    lora_fx.checkpoint(gm, "full")
    assert gm.meta["lora_fx"] is state                            # idempotent: nothing committed
    lora_fx.apply(gm, LoraSpec(rank=2, adapter="second", targets=["o_proj"]))
    assert "run_block" in gm.code and "run_block" in copy.deepcopy(gm).code
    gm.eval()
    assert "run_block" in gm.code                                 # every mode
    gm.train()
    lora_fx.delete_adapter(gm, "second")
    lora_fx.checkpoint(gm, "none")
    assert gm.code == plain_code


def test_bad_policy_and_flat_graphs_are_refused_unchanged():
    gm = adapted()
    before = graph_snapshot(gm)
    with pytest.raises(ValueError, match="unknown checkpoint policy 'some': valid policies are 'none', 'full', "
                                         "'selective'"):
        lora_fx.checkpoint(gm, "some")
    assert_graph_unchanged(gm, before)
    torch.manual_seed(0)
    flat = lora_fx.apply(tiny_llama(), SPEC, (ids(),), {"use_cache": False}, blocks=False)
    before = graph_snapshot(flat)
    with pytest.raises(AdapterError, match="checkpoint works per block, and this graph is flat"):
        lora_fx.checkpoint(flat, "selective")
    assert_graph_unchanged(flat, before)
