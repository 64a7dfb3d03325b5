"""fuse_siblings: branches of one adapter that read the same input share one low-rank projection.

q/k/v (and gate/up) read the same activation x. Instead of one projection per site, x·A_qᵀ, x·A_kᵀ, x·A_vᵀ, a
single projection by the stacked factor reads x once, and its output is split back per site:

    [h_q, h_k, h_v] = split(x · [A_q; A_k; A_v]ᵀ, [r_q, r_k, r_v])

Exact: each chunk is its site's own projection, and gradients reach each A through cat/split. The backward gets
one input-gradient GEMM instead of one per site plus their sum. Branches with dropout are left alone: each site
draws its own dropout mask, as in PEFT. `lora_fx.fuse_siblings(gm)` turns the pass on for a graph: its graphs
are rebuilt with it, now and whenever adapters change.

With `share_dropout=True` (`GraphState.siblings == "fused_sharing_dropout"`, an opt-in) siblings with the same dropout p are fused too, behind one
dropout of x: [h_q, h_k, h_v] = split(dropout(x, p) · [A_q; A_k; A_v]ᵀ). The siblings then see the same mask, a
different regulariser from PEFT's independent masks (the masks of q, k and v are no longer independent draws), so
it is not the default. It draws one mask per input instead of one per site, which is most of dropout's cost on CPU,
and with `lean_dropout` keeps one packed mask per input for the backward.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from lora_fx.state import META_KEY, inherit_meta, tag_of

aten = torch.ops.aten


def fuse_sibling_branches(gm: fx.GraphModule) -> PassResult:
    """Fuse every group of >= 2 unfused `down` projections of one adapter that read the same node (no dropout) by
    their own (masked) A factor."""
    groups: dict[tuple, list[fx.Node]] = defaultdict(list)
    for down in _downs(gm.graph):
        if tag_of(down.args[0]).get("role") != "dropout":
            groups[(tag_of(down)["adapter"], down.args[0])].append(down)
    return _fuse(gm, groups)


def fuse_sibling_branches_sharing_dropout(gm: fx.GraphModule) -> PassResult:
    """Fuse every group of >= 2 `down` projections of one adapter that read dropouts (the same p) of the same node,
    each its dropout's only reader, behind one dropout."""
    groups: dict[tuple, list[fx.Node]] = defaultdict(list)
    for down in _downs(gm.graph):
        dropout = down.args[0]
        if (tag_of(dropout).get("role") == "dropout" and dropout.target is aten.dropout.default
                and len(dropout.users) == 1):
            groups[(tag_of(down)["adapter"], dropout.args[0], dropout.args[1:])].append(down)
    return _fuse(gm, groups)


def _downs(graph: fx.Graph) -> list[fx.Node]:
    """The graph's unfused `down = linear(input, masked A)` nodes."""
    return [n for n in graph.nodes if tag_of(n).get("role") == "down" and n.target is aten.linear.default
            and len(n.args) == 2 and tag_of(n.args[1]).get("role") == "mask_A"]


def _fuse(gm: fx.GraphModule, groups: dict[tuple, list[fx.Node]]) -> PassResult:
    """Replace each group of >= 2 downs (keyed by adapter first) by one projection of the first down's input
    through the stacked factors, split back per site; an input read by no one else is erased (a dropout)."""
    graph = gm.graph
    fused = 0
    for (adapter, *_), downs in groups.items():
        if len(downs) < 2:
            continue
        x, inputs = downs[0].args[0], [d.args[0] for d in downs]
        sites = ",".join(tag_of(d)["site"] for d in downs)
        factors = [d.args[1] for d in downs]                                       # where(s != 0, A, 0), (r, in)
        ranks = [gm.get_parameter(factor.args[1].target).shape[0] for factor in factors]

        def add(role, op, target, args):
            new = graph.create_node(op, target, args)
            inherit_meta(new, downs[0])
            new.meta[META_KEY] = {"adapter": adapter, "site": sites, "role": role}
            return new

        if tag_of(x).get("role") == "dropout":
            x.meta[META_KEY] = {**tag_of(x), "site": sites}
        with graph.inserting_before(downs[0]):
            stacked = add("stacked_A", "call_function", aten.cat.default, (factors, 0))        # (sum r, in)
            projected = add("fused_down", "call_function", aten.linear.default, (x, stacked))  # (..., sum r)
            chunks = add("split", "call_function", aten.split_with_sizes.default, (projected, ranks, -1))
            parts = [add("chunk", "call_function", operator.getitem, (chunks, i)) for i in range(len(downs))]
        for down, part in zip(downs, parts):
            down.replace_all_uses_with(part)
            graph.erase_node(down)
        for unread in {node: None for node in inputs if node is not x and not node.users}:
            graph.erase_node(unread)
        fused += 1
    graph.lint()
    return PassResult(gm, modified=fused > 0)
