"""sdpa_gqa: attention over repeated key/value heads reads the grouped heads directly (`enable_gqa=True`).

transformers' eager call decides per call whether SDPA may group query heads itself; under torch.export it cannot
(the causal mask is materialised), and the captured graph repeats each key/value head n times first:

    k_rep = reshape(expand(unsqueeze(k, 2), [b, kv, n, s, d]), [b, kv·n, s, d])       (transformers' repeat_kv)
    sdpa(q, k_rep, v_rep, mask)    →    sdpa(q, k, v, mask, enable_gqa=True)

Exact: with `enable_gqa` query head j reads key/value head j // n, as repeat_kv arranges. The repeated copies were
what autograd saved for the backward (n times the key and value bytes) and cost a copy each per layer; SDPA reads
the grouped heads in place. Identity slices (`x[:, :]`) on the way are looked through.
"""

from __future__ import annotations

import sys

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.passes.infra.pass_base import PassResult

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


def sdpa_gqa(gm: fx.GraphModule) -> PassResult:
    """Rewrite every SDPA whose key and value are repeat_kv'd by the same factor into one with `enable_gqa`."""
    graph = gm.graph
    rewritten = 0
    for node in [n for n in graph.nodes if n.target is SDPA and not n.kwargs.get("enable_gqa", False)]:
        key, value = (_repeated(node.args[i]) for i in (1, 2))
        if key is None or value is None or key[1] != value[1] or len(node.args) > 7:      # > 7: enable_gqa given
            continue
        repeated = node.args[1], node.args[2]
        node.args = (node.args[0], key[0], value[0], *node.args[3:])
        node.kwargs = {**node.kwargs, "enable_gqa": True}
        for tail in repeated:
            _erase_unused(graph, tail)
        rewritten += 1
    graph.lint()
    return PassResult(gm, modified=rewritten > 0)


def _repeated(node) -> tuple[fx.Node, int] | None:
    """(k, n) if `node` is k (b, kv, s, d) with each head repeated n times as repeat_kv does, else None."""
    if not (isinstance(node, fx.Node) and node.target in (aten.reshape.default, aten.view.default)):
        return None
    expand = _through_identity_slices(node.args[0])
    if not (isinstance(expand, fx.Node) and expand.target is aten.expand.default and len(expand.args[1]) == 5):
        return None
    unsqueeze = _through_identity_slices(expand.args[0])
    if not (isinstance(unsqueeze, fx.Node) and unsqueeze.target is aten.unsqueeze.default and
            unsqueeze.args[1] == 2):
        return None
    base = _through_identity_slices(unsqueeze.args[0])
    b, kv, n, s, d = expand.args[1]
    shape = node.args[1]
    if not (isinstance(kv, int) and isinstance(n, int) and len(shape) == 4 and _same(shape[1], kv * n) and
            _same(shape[0], b) and _same(shape[2], s) and _same(shape[3], d)):
        return None
    base_shape, expanded = (getattr(v.meta.get("val"), "shape", None) for v in (base, expand))
    if base_shape is None or expanded is None or len(base_shape) != 4:
        return None
    # the expand broadcasts only the new dim: batch, length and head size are the base's own (none was a 1)
    if not all(statically_known_true(expanded[i] == base_shape[j]) for i, j in ((0, 0), (1, 1), (3, 2), (4, 3))):
        return None
    return base, n


def _through_identity_slices(node: fx.Node) -> fx.Node:
    """`node` with whole-dim slices (`x[:, :]`, as export records them) looked through."""
    while isinstance(node, fx.Node) and node.target is aten.slice.Tensor:
        given = tuple(node.args[2:5])
        start, end, step = given + (None, None, node.kwargs.get("step", 1))[len(given):]
        if start not in (0, None) or not (end is None or isinstance(end, int) and end >= sys.maxsize) or step != 1:
            break
        node = node.args[0]
    return node


def _same(a, b) -> bool:
    """Whether two size entries of a graph (ints, or nodes computing a SymInt) are the same size."""
    return a is b or (isinstance(a, int) and isinstance(b, int) and a == b)


def _erase_unused(graph: fx.Graph, node: fx.Node) -> None:
    """Erase `node` and then its inputs, as long as each is left without users."""
    while isinstance(node, fx.Node) and node.op == "call_function" and not node.users:
        inputs = node.args[0]
        graph.erase_node(node)
        node = inputs
