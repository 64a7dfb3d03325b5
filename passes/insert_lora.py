"""insert_lora: add one adapter's low-rank branch at every read of every matched site.

For a frozen base weight W0 and input x (Hu et al. 2021, https://arxiv.org/abs/2106.09685):

    y = f(x; W0) + f(x; ΔW),    ΔW = s · (B·A in the site's layout),   s = alpha / r (alpha / sqrt(r) with rsLoRA)

where f is the read (linear, matmul, embedding lookup, conv) and is linear in the weight, so the branch is exactly
the read of the delta — each site kind (`lora_fx.sites`) emits it at rank r, in the read's own layout, and merging
W0 + ΔW equals the unmerged graph however the weight is read.

The factors are read through `where(s != 0, A, 0)`: an inactive or disabled adapter (s = 0) contributes exactly
nothing, even when its weights hold NaN or Inf (0·NaN would be NaN). The scale buffer is read through a clone,
so autograd saves the forward's value: switching adapters (an in-place write of the buffer) between a forward and
its backward (a DPO reference pass with the adapter disabled) is allowed. Dropout (where the kind has it) is in the
training-mode graph only.

A further adapter's branch is added after the previous adapter's `add`, so adapters sum in the order they were
applied and never nest. Every inserted node is tagged `node.meta["lora_fx"] = {"adapter", "site", "role"}`;
matching never treats tagged nodes or LoRA weights as sites. The pass only edits the graph: the factors and scales
it reads are registered by the caller (see `lora_fx.commit`). In the build pipeline, `insert_adapters` adds every
adapter of the state, at the reads `lora_fx.match.bind` finds for its sites in the graph being built.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from lora_fx.match import bind
from lora_fx.sites import Read, Site, kind_of, tensor_names
from lora_fx.spec import LoraSpec
from lora_fx.state import META_KEY, building_of, inherit_meta, tag_of

aten = torch.ops.aten


def insert_adapters(gm: fx.GraphModule) -> PassResult:
    """Every adapter of the state being built, in applied order, at its sites' reads in this graph (a site this
    mode does not read has no branch here)."""
    building = building_of(gm)
    state = building.state
    bound = bind(gm, gm.graph, state.adapted_sites())
    modified = False
    for adapter, spec in state.specs.items():
        sites = [bound[key] for key in state.sites[adapter] if key in bound]
        modified |= insert_lora(gm, sites, spec, building.training).modified
    return PassResult(gm, modified=modified)


def insert_lora(gm: fx.GraphModule, sites: list[Site], spec: LoraSpec, training: bool) -> PassResult:
    """Add `spec.adapter`'s branch after every read of each site (`training` selects the dropout)."""
    top = next(node for node in gm.graph.nodes if node.op != "placeholder")
    for site in sites:
        factors = _masked_factors(gm.graph, top, site, spec.adapter)
        for read in site.reads:
            _insert_branch(gm.graph, read, site, spec, training, factors)
    gm.graph.lint()
    return PassResult(gm, modified=bool(sites))


def _tagger(graph: fx.Graph, source: fx.Node, adapter: str, site: str):
    """`add(role, target, args, kwargs)`: a tagged call_function node with the module stack of `source`."""
    def add(role: str, target, args=(), kwargs=None, op: str = "call_function") -> fx.Node:
        new = graph.create_node(op, target, args, kwargs or {})
        inherit_meta(new, source)
        new.meta[META_KEY] = {"adapter": adapter, "site": site, "role": role}
        return new
    return add


def _masked_factors(graph: fx.Graph, top: fx.Node, site: Site, adapter: str):
    """(where(s != 0, A, 0), where(s != 0, B, 0), s) for the site, once, at the top of the graph (so every read,
    and any pass that regroups branches, finds them defined)."""
    add = _tagger(graph, site.reads[0].node, adapter, site.key)
    name_A, name_B, name_scale = tensor_names(site, adapter)
    with graph.inserting_before(top):
        lora_A = add("lora_A", name_A, op="get_attr")
        lora_B = add("lora_B", name_B, op="get_attr")
        buffer = add("scale", name_scale, op="get_attr")                                   # 0-d
        scale = add("scale_value", aten.clone.default, (buffer,))
        active = add("active", aten.ne.Scalar, (scale, 0))
        masked_A = add("mask_A", aten.where.ScalarOther, (active, lora_A, 0.0))
        masked_B = add("mask_B", aten.where.ScalarOther, (active, lora_B, 0.0))
    return masked_A, masked_B, scale


def _chain_tail(node: fx.Node) -> fx.Node:
    """The last adapter `add` already stacked on `node`'s output (or `node` itself)."""
    while True:
        adds = [u for u in node.users if tag_of(u).get("role") == "add" and u.args[0] is node]
        if not adds:
            return node
        node = adds[0]


def _insert_branch(graph: fx.Graph, read: Read, site: Site, spec: LoraSpec, training: bool, factors) -> None:
    tail = _chain_tail(read.node)
    add = _tagger(graph, read.node, spec.adapter, site.key)
    with graph.inserting_before(tail.next):
        branch = kind_of(site).insert(graph, read, site, (*factors, add), spec, training)
        out = add("add", aten.add.Tensor, (tail, branch))
    own = lambda user: tag_of(user).get("adapter") == spec.adapter and tag_of(user).get("site") == site.key
    tail.replace_all_uses_with(out, delete_user_cb=lambda user: not own(user))     # a DoRA term reads the base y
