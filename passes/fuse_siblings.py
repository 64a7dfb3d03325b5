"""fuse_siblings: branches of one adapter that read the same input share one low-rank projection.

q/k/v (and gate/up) read the same activation x. Instead of one projection per site, x·A_qᵀ, x·A_kᵀ, x·A_vᵀ, a
single projection by the stacked factor reads x once, and its output is split back per site:

    [h_q, h_k, h_v] = split(x · [A_q; A_k; A_v]ᵀ, [r_q, r_k, r_v])

Exact: each chunk is its site's own projection, and gradients reach each A through cat/split. The backward gets
one input-gradient GEMM instead of one per site plus their sum. Branches with dropout are left alone: each site
draws its own dropout mask, as in PEFT. `lora_fx.fuse_siblings(gm)` turns the pass on for a graph: its graphs
are rebuilt with it, now and whenever adapters change.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from lora_fx.state import META_KEY, inherit_meta, tag_of

aten = torch.ops.aten
NAME = "fuse_siblings"


def fuse_sibling_branches(gm: fx.GraphModule) -> PassResult:
    """Fuse every group of >= 2 unfused `down` projections of one adapter that read the same node by their own
    (masked) A factor."""
    graph = gm.graph
    groups: dict[tuple[str, fx.Node], list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        if (tag_of(node).get("role") == "down" and tag_of(node.args[1]).get("role") == "mask_A"
                and tag_of(node.args[0]).get("role") != "dropout"):
            groups[(tag_of(node)["adapter"], node.args[0])].append(node)
    fused = 0
    for (adapter, x), downs in groups.items():
        if len(downs) < 2:
            continue
        sites = ",".join(tag_of(d)["site"] for d in downs)
        factors = [d.args[1] for d in downs]                                       # where(s != 0, A, 0), (r, in)
        ranks = [gm.get_parameter(factor.args[1].target).shape[0] for factor in factors]

        def add(role, op, target, args):
            new = graph.create_node(op, target, args)
            inherit_meta(new, downs[0])
            new.meta[META_KEY] = {"adapter": adapter, "site": sites, "role": role}
            return new

        with graph.inserting_before(downs[0]):
            stacked = add("stacked_A", "call_function", aten.cat.default, (factors, 0))        # (sum r, in)
            projected = add("fused_down", "call_function", aten.linear.default, (x, stacked))  # (..., sum r)
            chunks = add("split", "call_function", aten.split_with_sizes.default, (projected, ranks, -1))
            parts = [add("chunk", "call_function", operator.getitem, (chunks, i)) for i in range(len(downs))]
        for down, part in zip(downs, parts):
            down.replace_all_uses_with(part)
            graph.erase_node(down)
        fused += 1
    graph.lint()
    return PassResult(gm, modified=fused > 0)
