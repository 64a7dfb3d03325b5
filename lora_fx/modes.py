"""`train()` / `eval()` for captured graphs.

torch.export bakes each dropout's train flag into the graph as a literal (`aten.dropout(x, p, train)`) and the
stock exported module refuses `.train()`. Our graphs rewrite those literals instead, so `gm.train()` and
`gm.eval()` switch every dropout in the graph: the model's own and LoRA's.
"""

from __future__ import annotations

import types

import torch
from torch import fx

aten = torch.ops.aten

# op -> where its train flag lives: an int is a positional index, a str a keyword
TRAIN_FLAGS = {
    aten.dropout.default: 2,
    torch.nn.functional.dropout: "training",
}


def set_train_flags(graph: fx.Graph, mode: bool) -> bool:
    """Set the train flag of every dropout in `graph` to `mode`; returns whether anything changed."""
    changed = False
    for node in graph.nodes:
        where = TRAIN_FLAGS.get(node.target) if node.op == "call_function" else None
        if isinstance(where, int) and len(node.args) > where and node.args[where] != mode:
            node.update_arg(where, mode)
            changed = True
        elif isinstance(where, str) and node.kwargs.get(where, mode) != mode:
            node.update_kwarg(where, mode)
            changed = True
    return changed


def _train(self: fx.GraphModule, mode: bool = True) -> fx.GraphModule:
    if not isinstance(mode, bool):
        raise ValueError(f"training mode must be a bool, got {mode!r}")
    if set_train_flags(self.graph, mode):
        self.recompile()
    torch.nn.Module.train(self, mode)
    return self


def enable_train_eval(gm: fx.GraphModule, mode: bool) -> None:
    """Give `gm` working `train()`/`eval()` (replacing torch.export's refusal) and put it in `mode`."""
    gm.__dict__.pop("eval", None)  # nn.Module.eval calls self.train(False)
    gm.train = types.MethodType(_train, gm)
    gm.train(mode)
