"""lean_dropout: a LoRA branch's dropout and shrink become one `lora_fx::dropout_linear`, which saves no dropped copy.

    down = linear(dropout(x, p), A)    →    down = dropout_linear(x, A, p)[0]

Plain `dropout` + `linear` keep x ⊙ noise (the dropped copy, for ∂A) and the noise for the backward: per site, 5
bytes an element of x in fp32 on top of x itself. `dropout_linear` keeps x (shared with the base path and the
sibling sites) and the mask packed a bit an element, and recomputes the dropped copy in the backward (see
`lora_fx.ops.dropout_linear`). Exact: the same draws from the same RNG state, the same outputs and gradients. Each
site still draws its own mask, as in PEFT, unless siblings share one (`lora_fx.fuse_siblings(gm,
share_dropout=True)`: then the fused shrink of the siblings is rewritten the same way). A dropout whose output feeds
anything but one shrink (a DoRA term also reads it) is left alone.
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from lora_fx.ops import DROPOUT_LINEAR
from lora_fx.state import META_KEY, inherit_meta, tag_of

aten = torch.ops.aten


def lean_dropout(gm: fx.GraphModule) -> PassResult:
    """Rewrite every LoRA `down = linear(dropout(x, p, True), A)` whose dropout has no other user."""
    graph = gm.graph
    rewritten = 0
    for dropout in [n for n in graph.nodes if tag_of(n).get("role") == "dropout"]:
        down = next(iter(dropout.users), None)
        if (dropout.target is not aten.dropout.default or len(dropout.users) != 1 or down.target is not
                aten.linear.default or tag_of(down).get("role") not in ("down", "fused_down") or
                len(down.args) != 2 or down.args[0] is not dropout or not dropout.args[2]):
            continue
        x, p = dropout.args[0], dropout.args[1]
        with graph.inserting_before(down):
            fused = graph.call_function(DROPOUT_LINEAR, (x, down.args[1], p))
            value = graph.call_function(operator.getitem, (fused, 0))
        for new, role in ((fused, "dropout_down"), (value, tag_of(down)["role"])):
            inherit_meta(new, down)
            new.meta[META_KEY] = {**tag_of(down), "role": role}
        down.replace_all_uses_with(value)
        graph.erase_node(down)
        graph.erase_node(dropout)
        rewritten += 1
    graph.lint()
    return PassResult(gm, modified=rewritten > 0)

