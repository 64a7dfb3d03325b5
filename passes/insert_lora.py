"""insert_lora: add one adapter's low-rank branch at every read of every matched site.

For a frozen base weight W0 (out × in) and input x (Hu et al. 2021, https://arxiv.org/abs/2106.09685):

    y = W0·x + s · B·A·dropout(x),   A: (r × in), B: (out × r), s = alpha / r (alpha / sqrt(r) with rsLoRA)

The weight's delta is one matrix, ΔW = s·B·A in the site's own layout ((out, in), or (in, out) for HF Conv1D), and
every read of the weight sees it in that read's layout: a read computing `x @ W.T` gets `linear(linear(x, A)·s, B)`;
a read computing `x @ W` of a weight stored (out, in) gets `x @ ΔW = linear(linear(x, Bᵀ)·s, Aᵀ)`. So merging
`W0 + ΔW` always equals the unmerged graph, however the weight is read.

Scaling the rank-r activation costs r/out of scaling the output. The factors are read through
`where(s != 0, A, 0)`: an inactive or disabled adapter (s = 0) contributes exactly nothing, even when its
weights hold NaN or Inf (0·NaN would be NaN). Dropout is in the training-mode graph only (eval is the identity).

A further adapter's branch is added after the previous adapter's `add`, so adapters sum in the order they were
applied and never nest. Every inserted node is tagged `node.meta["lora_fx"] = {"adapter", "site", "role"}`;
matching never treats tagged nodes or LoRA weights as sites. The pass only edits the graph: the factors and scales
it reads are registered by the caller (see `lora_fx.commit`).
"""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from lora_fx.match import Read, Site
from lora_fx.spec import LoraSpec
from lora_fx.state import LORA_A, LORA_B, META_KEY, factor_name, inherit_meta, scaling_name, tag_of

aten = torch.ops.aten


def insert_lora(gm: fx.GraphModule, sites: list[Site], spec: LoraSpec, training: bool) -> PassResult:
    """Add `spec.adapter`'s branch after every read of each site (`training` selects the dropout)."""
    top = next(node for node in gm.graph.nodes if node.op != "placeholder")
    for site in sites:
        factors = _masked_factors(gm.graph, top, site, spec.adapter)
        for read in site.reads:
            _insert_branch(gm.graph, read, site, spec, training, factors)
    gm.graph.lint()
    return PassResult(gm, modified=bool(sites))


class _Inserter:
    """Creates tagged nodes for one branch, each with the module stack of the node the branch belongs to."""

    def __init__(self, graph: fx.Graph, source: fx.Node, adapter: str, site: str):
        self.graph, self.source, self.tag = graph, source, {"adapter": adapter, "site": site}

    def __call__(self, role: str, op: str, target, args=()) -> fx.Node:
        new = self.graph.create_node(op, target, args)
        inherit_meta(new, self.source)
        new.meta[META_KEY] = {**self.tag, "role": role}
        return new


def _masked_factors(graph: fx.Graph, top: fx.Node, site: Site, adapter: str):
    """(where(s != 0, A, 0), where(s != 0, B, 0), s) for the site, once, at the top of the graph (so every read,
    and any pass that regroups branches, finds them defined)."""
    add = _Inserter(graph, site.reads[0].node, adapter, site.fqn)
    with graph.inserting_before(top):
        lora_A = add("lora_A", "get_attr", factor_name(site.fqn, LORA_A, adapter))      # (r, in)
        lora_B = add("lora_B", "get_attr", factor_name(site.fqn, LORA_B, adapter))      # (out, r)
        scale = add("scale", "get_attr", scaling_name(site.fqn, adapter))               # 0-d
        active = add("active", "call_function", aten.ne.Scalar, (scale, 0))
        masked_A = add("mask_A", "call_function", aten.where.ScalarOther, (active, lora_A, 0.0))
        masked_B = add("mask_B", "call_function", aten.where.ScalarOther, (active, lora_B, 0.0))
    return masked_A, masked_B, scale


def _chain_tail(node: fx.Node) -> fx.Node:
    """The last adapter `add` already stacked on `node`'s output (or `node` itself)."""
    while True:
        adds = [u for u in node.users if tag_of(u).get("role") == "add" and u.args[0] is node]
        if not adds:
            return node
        node = adds[0]


def _insert_branch(graph: fx.Graph, read: Read, site: Site, spec: LoraSpec, training: bool, factors) -> None:
    masked_A, masked_B, scale = factors
    tail = _chain_tail(read.node)
    add = _Inserter(graph, read.node, spec.adapter, site.fqn)
    with graph.inserting_before(tail.next):
        x = read.input
        if spec.dropout > 0 and training:
            x = add("dropout", "call_function", aten.dropout.default, (x, spec.dropout, True))
        if read.transposed == site.fan_in_fan_out:         # the read sees the weight in the site's own layout
            down_weight, up_weight = masked_A, masked_B
        else:                                              # x @ ΔW for ΔW = s·B·A: project by Bᵀ, expand by Aᵀ
            down_weight = add("transpose", "call_function", aten.permute.default, (masked_B, [1, 0]))
            up_weight = add("transpose", "call_function", aten.permute.default, (masked_A, [1, 0]))
        down = add("down", "call_function", aten.linear.default, (x, down_weight))         # (..., r)
        scaled = add("scale_mul", "call_function", aten.mul.Tensor, (down, scale))          # (..., r)
        up = add("up", "call_function", aten.linear.default, (scaled, up_weight))          # (..., out)
        out = add("add", "call_function", aten.add.Tensor, (tail, up))
    tail.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
