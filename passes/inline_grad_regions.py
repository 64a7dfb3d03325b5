"""inline_grad_regions: turn torch.export's `wrap_with_set_grad_enabled` regions back into plain graph nodes.

torch.export records a `with torch.no_grad():` block (HF's rotary embedding has one) as a higher-order op calling a
submodule. torch.compile cannot trace that op once sizes are symbolic ("unexpected freevars"), and matching would
only see the region's weights as foreign reads. Inlining the region between explicit grad-mode calls,

    prev = torch.is_grad_enabled(); torch._C._set_grad_enabled(enabled); <region>; torch._C._set_grad_enabled(prev)

keeps its semantics (nothing in it records gradients) and leaves one flat graph.
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from lora_fx.state import inherit_meta

GRAD_REGION = torch.ops.higher_order.wrap_with_set_grad_enabled


def inline_grad_regions(gm: fx.GraphModule) -> PassResult:
    graph = gm.graph
    regions = [node for node in graph.nodes if node.op == "call_function" and node.target is GRAD_REGION]
    for node in regions:
        enabled, body_attr, *inputs = node.args
        body = gm.get_submodule(body_attr.target)
        values: dict[fx.Node, object] = dict(zip([n for n in body.graph.nodes if n.op == "placeholder"], inputs))
        with graph.inserting_before(node):
            previous = graph.call_function(torch.is_grad_enabled, ())
            switches = [previous, graph.call_function(torch._C._set_grad_enabled, (enabled,))]
            for inner in body.graph.nodes:
                if inner.op == "output":
                    outputs = fx.node.map_arg(inner.args[0], values.__getitem__)
                elif inner.op != "placeholder":
                    values[inner] = graph.node_copy(inner, values.__getitem__)
            switches.append(graph.call_function(torch._C._set_grad_enabled, (previous,)))
        for switch in switches:             # the region's module stack: it stays with the module it runs in
            inherit_meta(switch, node)
        for user in list(node.users):       # the region's results are read with getitem
            if user.target is not operator.getitem:
                raise NotImplementedError(f"unexpected use of a grad region's result: {user.format_node()}")
            user.replace_all_uses_with(outputs[user.args[1]])
            graph.erase_node(user)
        graph.erase_node(node)
        graph.erase_node(body_attr)
        gm.delete_submodule(body_attr.target)
    graph.lint()
    gm.recompile()
    return PassResult(gm, modified=bool(regions))
