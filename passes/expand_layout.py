"""expand_layout: a LoRA expand reads its rank-r input stored rank-major, so that both of its backward GEMMs run in
the fast layout on CPU.

    up = linear(h, B)    →    up = matmul(rank_major(h), contiguous(Bᵀ))                         (rank r < 16)

rank_major(h) holds h's values stored r × N (a copy of the small rank-r activation, viewed back as h's shape). For
y = h·Bᵀ, autograd of `linear` computes ∂h = ∂y·B and ∂B = ∂yᵀ·h: outputs r columns wide, which this machine's CPU
BLAS (MKL, AVX2) runs 2-3x slower below r = 16 than the same products transposed. Autograd of `mm` computes the
gradient of a left operand stored column-major as (Bᵀ·∂yᵀ)ᵀ, and that of a row-major right operand as (hᵀ·∂y)ᵀ:
r rows each. The same products, so the values equal `linear`'s up to float summation order. From r = 16 up the two
layouts run alike or the other way round (`benchmarks/results/train_floor_layouts.md`), so those
expands, and expands by other forms than a site's own B, are left alone.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from lora_fx.state import META_KEY, inherit_meta, tag_of

aten = torch.ops.aten
NARROW_RANK = 16                 # expands of a lower rank are rewritten (measured on CPU, see the module docstring)


def expand_layout(gm: fx.GraphModule) -> PassResult:
    """Rewrite every `up = linear(h, masked B)` of rank below `NARROW_RANK` whose input's rank (ndim) is known."""
    graph = gm.graph
    rewritten = 0
    for up in [n for n in graph.nodes if tag_of(n).get("role") == "up" and n.target is aten.linear.default]:
        if len(up.args) != 2 or up.kwargs or tag_of(up.args[1]).get("role") != "mask_B":
            continue
        h, factor = up.args
        ndim, rank = _ndim(h), gm.get_parameter(factor.args[1].target).shape[1]
        if ndim is None or rank >= NARROW_RANK:
            continue

        def add(role, target, args, kwargs=None):
            new = graph.call_function(target, args, kwargs)
            inherit_meta(new, up)
            new.meta[META_KEY] = {**tag_of(up), "role": role}
            return new

        with graph.inserting_before(up):
            stored = add("rank_major", aten.clone.default, (add("rank_first", aten.permute.default,
                                                                (h, [ndim - 1, *range(ndim - 1)])),),
                         {"memory_format": torch.contiguous_format})                               # (r, ...)
            rank_major = add("rank_last", aten.permute.default, (stored, [*range(1, ndim), 0]))   # h's shape
            factor_t = add("B_t", aten.clone.default, (add("B_transposed", aten.permute.default, (factor, [1, 0])),),
                           {"memory_format": torch.contiguous_format})                             # (r, out)
        up.target, up.args = aten.matmul.default, (rank_major, factor_t)
        rewritten += 1
    graph.lint()
    return PassResult(gm, modified=rewritten > 0)


def _ndim(h: fx.Node) -> int | None:
    """The ndim of the LoRA branch's input, which the rank-r activation `h` shares: found by following first
    arguments back through the branch's own (tagged) nodes to the input it reads."""
    node = h
    while isinstance(node, fx.Node) and tag_of(node).get("role") and node.args:
        node = node.args[0]
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.ndim if isinstance(value, torch.Tensor) and value.ndim >= 2 else None
