"""lean_dropout: where a training graph's LoRA dropout masks come from. Counter masks (the default): one seeds draw
per call at the top of the graph, as Inductor's `inductor_seeds`, each site reading its own seed; PEFT's draws (the
opt-in): `dropout_linear` per site. Every LoRA dropout form is rewritten (shrinks, DoRA terms, mixed-batch rows)."""

from collections import Counter

import torch

import lora_fx
from lora_fx import LoraSpec
from lora_fx.ops import COUNTER_DROPOUT, COUNTER_DROPOUT_LINEAR, DROPOUT_LINEAR, STEP_SEEDS
from lora_fx.ops.mixed_lora import SHRINK_OP
from tests.conftest import MLP, all_nodes, captured, ids, randomize_lora

aten = torch.ops.aten
SITES = 14                                             # all-linear on the 2-layer tiny llama


def targets(gm) -> Counter:
    return Counter(n.target for n in all_nodes(gm) if n.op == "call_function")


def lora_dropouts(gm) -> list:
    return [n for n in all_nodes(gm) if n.target is aten.dropout.default and "lora_fx" in n.meta]


def test_counter_masks_one_seeds_draw_per_call_and_a_seed_per_site():
    gm = lora_fx.apply(captured("llama", training=True), LoraSpec(rank=2, dropout=0.1))
    (seeds,) = [n for n in gm.graph.nodes if n.target is STEP_SEEDS]           # in the root graph
    assert seeds.args[1] == SITES and targets(gm)[COUNTER_DROPOUT_LINEAR] == SITES and not lora_dropouts(gm)
    for block in lora_fx.blocks(gm):                  # blocks take the seeds as an input: recomputation reuses them
        assert any(n.op == "placeholder" and n.name == seeds.name for n in block.graph.nodes)
    indices = [n.args[2] for n in all_nodes(gm) if n.meta.get("lora_fx", {}).get("role") == "seed"]
    assert sorted(indices) == list(range(SITES))
    gm.eval()
    assert not targets(gm)[STEP_SEEDS] and not targets(gm)[COUNTER_DROPOUT_LINEAR]            # eval drops nothing


def test_a_step_consumes_the_generator_as_one_inductor_seeds_call():
    """One `torch.randint(2**63 - 1, (sites,))` per call, whatever the number of sites and blocks."""
    gm = lora_fx.apply(captured("llama", training=True), LoraSpec(rank=2, dropout=0.1))
    torch.manual_seed(0)
    gm(ids())
    after_step = torch.rand(4)
    torch.manual_seed(0)
    torch.randint(2 ** 63 - 1, (SITES,))
    assert torch.equal(after_step, torch.rand(4))


def test_peft_draws_use_dropout_linear():
    gm = lora_fx.apply(captured("llama", training=True), LoraSpec(rank=2, dropout=0.1))
    lora_fx.dropout_masks(gm, "peft")
    counts = targets(gm)
    assert counts[DROPOUT_LINEAR] == SITES and not counts[STEP_SEEDS] and not counts[COUNTER_DROPOUT_LINEAR]
    lora_fx.dropout_masks(gm, "counter")
    assert targets(gm)[COUNTER_DROPOUT_LINEAR] == SITES and not targets(gm)[DROPOUT_LINEAR]


def test_a_dropout_read_twice_shared_masks_and_mixed_rows_draw_from_the_stream():
    """DoRA's term also reads the dropped input (a `counter_dropout`); siblings sharing one mask shrink it through
    their fused projection; a mixed batch's shrink takes the seed itself (its Triton kernel draws the mask)."""
    dora = lora_fx.apply(captured("llama", training=True), LoraSpec(rank=2, dropout=0.1, use_dora=True))
    assert targets(dora)[COUNTER_DROPOUT] == SITES and not lora_dropouts(dora)

    shared = lora_fx.apply(captured("llama", training=True), LoraSpec(rank=2, dropout=0.1))
    lora_fx.fuse_siblings(shared, share_dropout=True)
    fused = [n for n in all_nodes(shared) if n.target is COUNTER_DROPOUT_LINEAR]
    assert len(fused) == 8 and sum(n.meta["lora_fx"]["role"] == "fused_down" for n in fused) == 4  # qkv, gate/up

    gm = lora_fx.apply(MLP().train(), LoraSpec(rank=2, dropout=0.1, adapter="a"), example_args=(torch.randn(4, 8),))
    lora_fx.apply(gm, LoraSpec(targets=["up"], rank=3, dropout=0.3, adapter="b"))
    randomize_lora(gm)
    mixed = lora_fx.mixed_batch(gm, ["a", "b"])
    shrinks = [n for n in all_nodes(mixed) if n.target is SHRINK_OP]
    assert len(shrinks) == 3 and all(n.args[4] in (0.1, 0.3) for n in shrinks) and not lora_dropouts(mixed)
    x, rows = torch.randn(6, 8), torch.tensor([0, 1, -1, 1, 0, 0])
    torch.manual_seed(1)
    first = mixed(x, adapter_ids=rows)
    torch.manual_seed(1)
    again = mixed(x, adapter_ids=rows)
    next_step = mixed(x, adapter_ids=rows)
    assert torch.equal(again, first) and not torch.equal(next_step, first)
