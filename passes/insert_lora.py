"""insert_lora: add one adapter's low-rank branch at every matched site.

For a frozen base weight W0 (out × in) and input x (Hu et al. 2021, https://arxiv.org/abs/2106.09685):

    y = W0·x + s · B·A·dropout(x),   A: (r × in), B: (out × r), s = alpha / r (alpha / sqrt(r) with rsLoRA)

Init mirrors PEFT's `LoraLayer.reset_lora_parameters` (peft/tuners/lora/layer.py): "default" is
A ~ kaiming_uniform(a=sqrt(5)), "gaussian" is A ~ N(0, 1/r); B = 0 either way, so a new adapter is the identity.

The branch is `aten.linear(aten.linear(dropout(x), A) * s, B)` added to the base output: s·B·(A·x) = B·(s·A·x),
and scaling the rank-r activation costs r/out of scaling the output (forward and backward). A further adapter's
branch is added after the previous adapter's `add`, so adapters sum in the order they were applied and never
nest. Every inserted node is tagged `node.meta["lora_fx"] = {"adapter", "site", "role"}`; matching never treats
tagged nodes or LoRA weights as sites.
Factors are created on the base weight's device and in its dtype, so the branch runs in the activation dtype.
"""

from __future__ import annotations

import math

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from lora_fx.match import LINEAR_FORMS, Site
from lora_fx.spec import LoraSpec
from lora_fx.state import (LORA_A, LORA_B, LORA_SCALING, META_KEY, factor_name, inherit_meta, scaling_name, submodule,
                           tag_of)

aten = torch.ops.aten


def insert_lora(gm: fx.GraphModule, sites: list[Site], spec: LoraSpec) -> PassResult:
    """Register `spec.adapter`'s factors and scale for each site and add its branch after each site node."""
    for site in sites:
        _register_state(gm, site, spec)
        for node in site.nodes:
            _insert_branch(gm, node, site, spec)
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, modified=bool(sites))


def _register_state(gm: fx.GraphModule, site: Site, spec: LoraSpec) -> None:
    base_weight = gm.get_parameter(site.weight)
    rank, adapter = spec.rank_for(site.fqn), spec.adapter
    owner = submodule(gm, site.fqn, create=True)
    factory = {"device": base_weight.device, "dtype": base_weight.dtype}
    lora_A = nn.Linear(site.in_features, rank, bias=False, **factory)
    lora_B = nn.Linear(rank, site.out_features, bias=False, **factory)
    with torch.no_grad():
        if spec.init == "gaussian":
            nn.init.normal_(lora_A.weight, std=1 / rank)
        else:
            nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(lora_B.weight)
    for kind, layer in ((LORA_A, lora_A), (LORA_B, lora_B)):
        if kind not in owner._modules:
            owner.add_module(kind, nn.ModuleDict())
        owner._modules[kind][adapter] = layer
    if LORA_SCALING not in owner._modules:
        owner.add_module(LORA_SCALING, nn.Module())
    scale = torch.tensor(spec.scale_for(site.fqn), dtype=torch.float32, device=base_weight.device)
    owner._modules[LORA_SCALING].register_buffer(adapter, scale, persistent=False)


def _chain_tail(node: fx.Node) -> fx.Node:
    """The last adapter `add` already stacked on `node`'s output (or `node` itself)."""
    while True:
        adds = [u for u in node.users if tag_of(u).get("role") == "add" and u.args[0] is node]
        if not adds:
            return node
        node = adds[0]


def _insert_branch(gm: fx.GraphModule, node: fx.Node, site: Site, spec: LoraSpec) -> None:
    graph, adapter = gm.graph, spec.adapter
    x = node.args[LINEAR_FORMS[node.target].input_index]
    tail = _chain_tail(node)
    inserted = []

    def add(role: str, op: str, target, args) -> fx.Node:
        new = graph.create_node(op, target, args)
        inherit_meta(new, node)
        new.meta[META_KEY] = {"adapter": adapter, "site": site.fqn, "role": role}
        inserted.append(new)
        return new

    with graph.inserting_before(tail.next):
        weight_A = add("lora_A", "get_attr", factor_name(site.fqn, LORA_A, adapter), ())
        weight_B = add("lora_B", "get_attr", factor_name(site.fqn, LORA_B, adapter), ())
        scale = add("scale", "get_attr", scaling_name(site.fqn, adapter), ())
        if spec.dropout > 0:
            x = add("dropout", "call_function", aten.dropout.default, (x, spec.dropout, gm.training))
        down = add("down", "call_function", aten.linear.default, (x, weight_A))          # (..., r)
        scaled = add("scale_mul", "call_function", aten.mul.Tensor, (down, scale))      # (..., r)
        up = add("up", "call_function", aten.linear.default, (scaled, weight_B))        # (..., out)
        out = add("add", "call_function", aten.add.Tensor, (tail, up))
    tail.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
