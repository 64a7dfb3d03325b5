"""The view algebra: how a weight reaches the op that reads it, and how a low-rank delta follows it there.

A read of a weight passes through *view ops* on its way to the consumer: transposes of the weight's last two dims,
slices, aliases (`alias`, `contiguous`, `clone`), dtype/device casts, and for batched (3-D expert) weights gathers
of experts (`W[ids]`). Every site kind, DoRA, mixed batches and quantized bases read weights through this one
algebra:

- **Reads.** `walk(weight, consumer, ndim)` follows the weight's users through view ops to the nodes that consume
  it (each a `Read` with its chain of views), and returns the users it cannot follow.
- **Factors.** A delta ΔW = L·R in the weight's own layout is kept as two `Factor`s through the chain: a factor is
  a node whose last two dims hold the 2-D factor, swapped when `transposed`, after `lead` leading dims (the experts,
  or the adapters of a mixed-batch stack). `replay(view, L, R)` gives the factors of the viewed delta:

      ΔWᵀ = Rᵀ·Lᵀ      ΔW[rows] = L[rows]·R      ΔW[:, cols] = L·R[:, cols]      ΔW[lead index] = L[..]·R[..]

  and casts cast both. `value(factor)` materialises a factor's node in its plain layout.
- **Output features.** `output_dim(chain, dim)`: where a weight's dim ends up after the chain's transposes.
- **Names.** `op_name(target)`: how errors and site descriptions name an op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx

from lora_fx.sites.base import Read, value_users

aten = torch.ops.aten

TRANSPOSES = {aten.t.default, aten.numpy_T.default}
IDENTITIES = {aten.alias.default, aten.contiguous.default, aten.clone.default}
CASTS = {aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default}
GATHER = aten.index.Tensor


def _dim(value, ndim: int) -> int | None:
    return value % ndim if isinstance(value, int) else None


def is_transpose(node: fx.Node, ndim: int = 2) -> bool:
    """Whether the view op `node` swaps the last two dims of an `ndim`-D tensor (keeping any leading dims)."""
    if node.target in TRANSPOSES:
        return ndim == 2
    if node.target is aten.transpose.int:
        return {_dim(node.args[1], ndim), _dim(node.args[2], ndim)} == {ndim - 2, ndim - 1}
    if node.target is aten.permute.default:
        return [_dim(d, ndim) for d in node.args[1]] == [*range(ndim - 2), ndim - 1, ndim - 2]
    return False


def is_view(node: fx.Node, value: fx.Node, ndim: int = 2) -> bool:
    """Whether `node` is a view op of `value` (an `ndim`-D weight) that factors can follow: a transpose of its last
    two dims, a constant slice, an alias, a cast, or (batched weights) a gather along the leading dim."""
    if node.op != "call_function" or not node.args or node.args[0] is not value:
        return False
    if node.target is GATHER:
        indices = node.args[1]
        return ndim > 2 and len(indices) == 1 and isinstance(indices[0], fx.Node) and indices[0] is not value
    if node.target is aten.slice.Tensor:
        return all(not isinstance(a, fx.Node) for a in node.args[1:]) and _dim(
            node.args[1] if len(node.args) > 1 else 0, ndim) is not None
    return is_transpose(node, ndim) or node.target in IDENTITIES or node.target in CASTS


def walk(weight: fx.Node, consumer: Callable[[fx.Node, fx.Node], object], ndim: int = 2):
    """(reads, foreign): every node that consumes `weight` through a chain of view ops — `consumer(node, value)`
    returns how `node` reads `value` (the read's detail), or None — and the users of the weight or its views that
    neither consume nor view it."""
    reads, foreign = [], []

    def follow(value: fx.Node, chain: tuple[fx.Node, ...]) -> None:
        for user in value_users(value):
            detail = consumer(user, value)
            if detail is not None:
                reads.append(Read(user, chain, detail))
            elif is_view(user, value, ndim):
                follow(user, chain + (user,))
            else:
                foreign.append(user)
    follow(weight, ())
    return reads, foreign


def transposes(chain) -> int:
    """How many times the chain swaps the weight's last two dims (views of 2-D or 3-D weights)."""
    return sum(is_transpose(view, 2) or is_transpose(view, 3) for view in chain)


def output_dim(chain, dim: int) -> int:
    """Where the weight's last-two-dims index `dim` (0: rows, 1: columns) is after the chain's transposes."""
    return dim if transposes(chain) % 2 == 0 else 1 - dim


@dataclass(frozen=True)
class Factor:
    """A node whose last two dims hold one 2-D factor of a delta, swapped when `transposed`, after `lead` leading
    dims."""

    node: fx.Node
    transposed: bool = False
    lead: int = 0

    def flipped(self) -> "Factor":
        """This factor transposed (the swap is folded in when its value is taken)."""
        return Factor(self.node, not self.transposed, self.lead)

    def replaced(self, node: fx.Node) -> "Factor":
        return Factor(node, self.transposed, self.lead)


def value(factor: Factor, add) -> fx.Node:
    """The factor's node with its last two dims in their plain order (`add(role, target, args)` makes nodes)."""
    if not factor.transposed:
        return factor.node
    dims = [*range(factor.lead), factor.lead + 1, factor.lead]
    return add("transpose", aten.permute.default, (factor.node, dims))


def replay(view: fx.Node, left: Factor, right: Factor, add, ndim: int = 2) -> tuple[Factor, Factor]:
    """The factors (L', R') of the viewed delta, for ΔW = L·R of an `ndim`-D weight (see the module docstring); a
    factor's leading dims are the weight's own (the experts) after any it adds (a mixed batch's adapter stack).
    `add(role, target, args, kwargs)` makes the nodes."""
    stacked = left.lead - (ndim - 2)                               # leading dims the weight does not have
    if is_transpose(view, ndim):
        return right.flipped(), left.flipped()
    if view.target in IDENTITIES:
        return left, right
    if view.target is GATHER:                                      # the same experts of both factors
        gather = lambda factor: factor.replaced(add("gather", GATHER, (factor.node, view.args[1])))
        return gather(left), gather(right)
    if view.target is aten.slice.Tensor:
        dim = _dim(view.args[1] if len(view.args) > 1 else 0, ndim)
        bounds = view.args[2:]
        sliced = lambda factor, at: factor.replaced(add("slice", aten.slice.Tensor, (factor.node, at, *bounds)))
        if dim < ndim - 2:                                         # the weight's leading dims: both
            return sliced(left, stacked + dim), sliced(right, stacked + dim)
        if dim == ndim - 2:                                        # rows of ΔW: rows of L
            return sliced(left, left.lead + (1 if left.transposed else 0)), right
        return left, sliced(right, right.lead + (0 if right.transposed else 1))     # columns of ΔW: columns of R
    cast = lambda factor: factor.replaced(add("cast", view.target, (factor.node, *view.args[1:]), dict(view.kwargs)))
    return cast(left), cast(right)


def apply(view: fx.Node, tensor: torch.Tensor) -> torch.Tensor:
    """The view op `view` applied to a tensor instead of its graph input (a dequantized weight, say)."""
    return view.target(tensor, *view.args[1:], **view.kwargs)


def op_name(target) -> str:
    """An op's short name: `linear` for aten.linear.default, a function's `__name__`."""
    if hasattr(target, "_schema"):
        return target._schema.name.split("::")[-1]
    return getattr(target, "__name__", str(target))
