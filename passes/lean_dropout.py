"""lean_dropout: LoRA dropout in a training graph, with its masks drawn where x is read and no dropped copy of x kept.

    down = linear(dropout(x, p), A)    →    down = counter_dropout_linear(x, A, seeds[i], p)        ("counter")
                                       →    down = dropout_linear(x, A, p)[0]                       ("peft")

Plain `dropout` + `linear` keep the dropped copy x ⊙ noise (for ∂A) and the noise for the backward: per site, 5
bytes an element of x in fp32 on top of x itself. Both rewrites keep x instead (shared with the base path and the
sibling sites) and recompute the dropped copy in the backward. The graph's `dropout_masks` (`lora_fx.dropout_masks`)
picks where masks come from:

- "counter" (the default): a counter-based stream (`lora_fx.ops.counter_masks`). One `step_seeds` node at the top
  of the graph draws a seed per LoRA dropout from torch's generator at every call; site i's mask is a hash of its
  seed and each element's index, drawn again in the backward, so nothing but x is kept. The distribution of
  `nn.Dropout`, other draws. Blocks (see `split_blocks`) take the seeds as an input, so a checkpointed block's
  recomputation draws the same masks.
- "peft": the draws of `nn.Dropout`, hence PEFT's from the same RNG state (`lora_fx.ops.dropout_linear`: `bernoulli_`,
  the mask kept packed a bit an element), for parity checks.

Any other LoRA dropout (a DoRA term also reads it; mixed-batch rows) draws from the stream as `counter_dropout`, and
a mixed-batch shrink of a dropped input takes the seed itself (its Triton kernel draws the mask in its prologue); in
"peft" mode those stay `aten.dropout`. Siblings that share one mask (`lora_fx.fuse_siblings(gm,
share_dropout=True)`) are rewritten the same way, through their fused shrink.
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from lora_fx.ops import DROPOUT_LINEAR
from lora_fx.ops.counter_masks import COUNTER_DROPOUT, COUNTER_DROPOUT_LINEAR, STEP_SEEDS, decompose_under_inductor
from lora_fx.ops.mixed_lora import SHRINK_OP
from lora_fx.state import META_KEY, inherit_meta, tag_of

aten = torch.ops.aten
DROPOUT_MASKS = ("counter", "peft")


def lean_dropout(gm: fx.GraphModule) -> PassResult:
    """Rewrite every live LoRA `dropout(x, p, True)` as the graph's `dropout_masks` say (its state's; "counter"
    for a graph without one)."""
    state = gm.meta.get(META_KEY)
    dropouts = [n for n in gm.graph.nodes if tag_of(n).get("role") == "dropout"
                and n.target is aten.dropout.default and n.args[2]]
    rewrite = _peft_draws if getattr(state, "dropout_masks", "counter") == "peft" else _counter_draws
    modified = rewrite(gm.graph, dropouts)
    gm.graph.lint()
    return PassResult(gm, modified=modified)


def _sole_shrink(dropout: fx.Node) -> fx.Node | None:
    """The `down = linear(dropout, A)` that is the dropout's only reader, if so."""
    down = next(iter(dropout.users), None)
    if (len(dropout.users) == 1 and down.target is aten.linear.default and len(down.args) == 2
            and down.args[0] is dropout and tag_of(down).get("role") in ("down", "fused_down")):
        return down
    return None


def _tagged(graph: fx.Graph, target, args, source: fx.Node, role: str) -> fx.Node:
    node = graph.call_function(target, args)
    inherit_meta(node, source)
    node.meta[META_KEY] = {**tag_of(source), "role": role}
    return node


def _peft_draws(graph: fx.Graph, dropouts: list[fx.Node]) -> bool:
    rewritten = False
    for dropout in dropouts:
        down = _sole_shrink(dropout)
        if down is None:
            continue
        x, p = dropout.args[0], dropout.args[1]
        with graph.inserting_before(down):
            fused = _tagged(graph, DROPOUT_LINEAR, (x, down.args[1], p), down, "dropout_down")
            value = _tagged(graph, operator.getitem, (fused, 0), down, tag_of(down)["role"])
        down.replace_all_uses_with(value)
        graph.erase_node(down)
        graph.erase_node(dropout)
        rewritten = True
    return rewritten


def _counter_draws(graph: fx.Graph, dropouts: list[fx.Node]) -> bool:
    if not dropouts:
        return False
    decompose_under_inductor()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    like = next((n for n in placeholders if isinstance(n.meta.get("val"), torch.Tensor)), placeholders[0])
    with graph.inserting_after(placeholders[-1]):
        seeds = graph.call_function(STEP_SEEDS, (like, len(dropouts)))              # (sites,) int64
    seeds.meta[META_KEY] = {"adapter": "*", "site": "", "role": "step_seeds"}         # shared by every adapter
    for index, dropout in enumerate(dropouts):
        x, p = dropout.args[0], dropout.args[1]
        with graph.inserting_before(dropout):
            seed = _tagged(graph, aten.select.int, (seeds, 0, index), dropout, "seed")
        down, user = _sole_shrink(dropout), next(iter(dropout.users), None)
        if down is not None:
            with graph.inserting_before(down):
                fused = _tagged(graph, COUNTER_DROPOUT_LINEAR, (x, down.args[1], seed, p), down, tag_of(down)["role"])
            down.replace_all_uses_with(fused)
            graph.erase_node(down)
            graph.erase_node(dropout)
        elif len(dropout.users) == 1 and user.target is SHRINK_OP and user.args[0] is dropout:
            user.args = (x, *user.args[1:], seed, p)                  # mixed batch: the shrink draws the mask
            graph.erase_node(dropout)
        else:
            dropout.target, dropout.args = COUNTER_DROPOUT, (x, seed, p)
    return True
