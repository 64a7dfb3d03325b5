"""lower_mamba2: the fused Mamba2 kernel's output projection as an ordinary linear, so LoRA on `out_proj` trains.

The fused op reads `out_proj.weight` itself (`outproj_weight=self.out_proj.weight`), so a branch around the module is
never run (PEFT issue 2274). Lowering splits the call exactly, as the kernel computes it:

    op(..., outproj_weight=W, outproj_bias=b)  ->  linear(op(..., outproj_weight=None, outproj_bias=None), W, b)

and the new `aten.linear` on `out_proj.weight` is a site like any other. Graphs are rebuilt from the plain capture
whenever adapters change (see `lora_fx.build`), and the builder lowers only the ops whose weights an adapter
needs: a graph without such adapters (a merged one, or one whose adapters were deleted) keeps the op whole.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from lora_fx.match import Lowering, argument, register_lowering
from lora_fx.ops import FUSED_OP
from lora_fx.state import inherit_meta

aten = torch.ops.aten
LOWERING_KEY = "lora_fx_lowering"


def _schema_kwargs(node: fx.Node) -> dict:
    return {a.name: argument(node, a.name) for a in node.target._schema.arguments}


def lower_outproj(gm: fx.GraphModule, node: fx.Node) -> None:
    """Rewrite one fused-op node as the op without its output projection, followed by `aten.linear`."""
    graph = gm.graph
    kwargs = _schema_kwargs(node)
    weight, bias = kwargs["outproj_weight"], kwargs["outproj_bias"]
    with graph.inserting_before(node):
        fused = graph.call_function(FUSED_OP, (), {**kwargs, "outproj_weight": None, "outproj_bias": None})
        activation = graph.call_function(operator.getitem, (fused, 0))          # (b, L, d_nonssm + dim)
        final_states = graph.call_function(operator.getitem, (fused, 1))
        projected = graph.call_function(aten.linear.default, (activation, weight, bias))
    for new, role in ((fused, "op"), (activation, "activation"), (final_states, "final_states"), (projected, "linear")):
        inherit_meta(new, node)
        new.meta[LOWERING_KEY] = role
    for user in list(node.users):
        user.replace_all_uses_with(projected if user.args[1] == 0 else final_states)
        graph.erase_node(user)
    graph.erase_node(node)
    graph.lint()


register_lowering(FUSED_OP, Lowering(weight_argument="outproj_weight", lower=lower_outproj))
