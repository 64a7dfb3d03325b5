"""The linear site kind: a 2-D weight read by linear maps, in any layout, through views and casts.

A read is a *consumer* — `linear(x, W)` (y = x·Wᵀ), `matmul`/`mm`/`addmm` with W on the right (y = x·W) or the
left (y = W·x), HF Conv1D's `addmm` — reached from the weight through a chain of *view ops*: transposes, slices,
aliases and dtype/device casts. The weight's delta is one low-rank matrix in the weight's own layout,

    ΔW = s·B·A        (nn.Linear, stored (out, in); A: (r, in), B: (out, r))
    ΔW = s·(B·A)ᵀ     (HF Conv1D, stored (in, out))

kept as a pair of factors ΔW = L·R through the chain (a transpose swaps and transposes them, a slice slices the
factor it touches, a cast casts both), and the consumer reads it at rank r, never materialised:

    x·(L·R)ᵀ = linear(linear(x, R), L)      x·(L·R) = linear(linear(x, Lᵀ), Rᵀ)      (L·R)·x = L·(R·x)

with s applied to the rank-r activation. So every read sees the same delta as the merged weight W + ΔW: merge
equals the unmerged graph however the weight is read. (Hu et al. 2021, https://arxiv.org/abs/2106.09685.)
DoRA adapters (`use_dora`) add their magnitude term at each read, see `lora_fx.sites.dora`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx

from lora_fx.sites import dora
from lora_fx.sites.base import Read, Site, SiteKind, peft_initialize, value_users
from lora_fx.spec import LoraSpec

aten = torch.ops.aten


@dataclass(frozen=True)
class LinearForm:
    """Where a linear-like op takes its input and weight. `y = x @ W.T` (nn.Linear layout, weight (out, in)), or
    with `weight_transposed`, `y = x @ W` (HF Conv1D layout, weight (in, out)); `weight_first`: `y = W @ x`."""

    input_index: int
    weight_index: int
    weight_transposed: bool = False
    accepts: Callable[[fx.Node], bool] = lambda node: True
    weight_first: bool = False


LINEAR_FORMS: dict = {}


def register_linear_op(op, form: LinearForm) -> None:
    """Teach the linear kind a new linear-like op. Its output must be the linear map of the input by the weight."""
    LINEAR_FORMS[op] = form


def _unit_addmm(node: fx.Node) -> bool:
    return node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1


register_linear_op(aten.linear.default, LinearForm(input_index=0, weight_index=1))
register_linear_op(torch._C._nn.linear, LinearForm(input_index=0, weight_index=1))
register_linear_op(aten.addmm.default, LinearForm(input_index=1, weight_index=2, weight_transposed=True,
                                                  accepts=_unit_addmm))
for _op in (aten.mm.default, aten.matmul.default, torch.matmul, operator.matmul):
    register_linear_op(_op, LinearForm(input_index=0, weight_index=1, weight_transposed=True))


def supported_ops() -> str:
    return ", ".join(sorted(str(op) if hasattr(op, "_schema") else f"{op.__module__}.{op.__name__}"
                            for op in LINEAR_FORMS))


# ---- view ops a weight may pass through on its way to a consumer ---------------------------------------------------

_TRANSPOSES = {aten.t.default, aten.numpy_T.default}
IDENTITIES = {aten.alias.default, aten.contiguous.default}
_CASTS = {aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default}


def is_transpose(node: fx.Node) -> bool:
    """Whether the view op `node` swaps a 2-D tensor's dims."""
    if node.target in _TRANSPOSES:
        return True
    if node.target is aten.transpose.int:
        return {node.args[1] % 2, node.args[2] % 2} == {0, 1}
    if node.target is aten.permute.default:
        return [d % 2 for d in node.args[1]] == [1, 0]
    return False


def _is_view(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target is aten.slice.Tensor:
        return len(node.args) > 1 and node.args[1] in (0, 1, -1, -2) and all(
            not isinstance(a, fx.Node) for a in node.args[1:])
    return is_transpose(node) or node.target in IDENTITIES or node.target in _CASTS


def _consumer_form(node: fx.Node, value: fx.Node) -> LinearForm | None:
    """The form by which `node` uses `value` as its weight, if it does."""
    form = LINEAR_FORMS.get(node.target) if node.op == "call_function" else None
    if form is None or not form.accepts(node) or sum(a is value for a in node.args) != 1 or value in \
            node.kwargs.values():
        return None
    if len(node.args) > form.weight_index and node.args[form.weight_index] is value:
        return form
    left_form = form.weight_transposed and len(node.args) > form.input_index and node.args[form.input_index] is value
    if left_form and node.target is not aten.addmm.default:           # matmul(W, x): the weight on the left
        return LinearForm(input_index=form.weight_index, weight_index=form.input_index, weight_transposed=False,
                          weight_first=True)
    return None


class LinearKind(SiteKind):
    name = "linear"

    def reads(self, weight: fx.Node, param: torch.Tensor):
        if param.dim() != 2:
            return [], value_users(weight), []
        reads, foreign = [], []

        def walk(value: fx.Node, chain: tuple[fx.Node, ...]):
            for user in value_users(value):
                form = _consumer_form(user, value)
                if form is not None:
                    reads.append(Read(user, chain, form))
                elif _is_view(user) and user.args[0] is value:
                    walk(user, chain + (user,))
                else:
                    foreign.append(user)
        walk(weight, ())
        return reads, foreign, []

    def describe(self, fqn, weight, param, reads, module_kind, layer) -> Site:
        rows, columns = param.shape
        if module_kind in ("linear", "conv1d_hf"):
            fan_in_fan_out = module_kind == "conv1d_hf"
        else:                                       # a raw parameter: the layout all its reads agree on
            fan_in_fan_out = all(not _reads_as_out_in(read) for read in reads)
        in_features, out_features = (rows, columns) if fan_in_fan_out else (columns, rows)
        op = "+".join(dict.fromkeys(_op_name(read.node.target) for read in reads))
        return Site(fqn=fqn, in_features=in_features, out_features=out_features, layer=layer, op=op, weight=weight,
                    fan_in_fan_out=fan_in_fan_out, kind=self.name, reads=tuple(reads))

    def factor_shapes(self, site, rank):
        return (rank, site.in_features), (site.out_features, rank)

    def initialize(self, lora_A, lora_B, spec: LoraSpec) -> None:
        peft_initialize(lora_A, lora_B, spec, rank=lora_A.shape[0])

    def delta(self, site, lora_A, lora_B):
        delta = lora_B @ lora_A                                     # (out, in)
        return delta.T if site.fan_in_fan_out else delta

    def dora_problems(self, site) -> list[str]:
        return dora.read_problems(site)

    def insert(self, graph, read, site, factors, spec, training) -> fx.Node:
        add = factors[3]
        x = read.node.args[read.detail.input_index]
        dropped = add("dropout", aten.dropout.default, (x, spec.dropout, True)) if spec.dropout > 0 and training \
            else None
        branch = self._branch(read, site, factors, x if dropped is None else dropped)
        return dora.insert(read, site, factors, spec, branch, dropped) if spec.use_dora else branch

    def _branch(self, read, site, factors, x) -> fx.Node:
        """s·(read of ΔW) at rank r, for the read's input `x`."""
        masked_A, masked_B, scale, add = factors
        form: LinearForm = read.detail
        # ΔW = L·R as (node, transposed) pairs: (B, A) for an (out, in) weight, (Aᵀ, Bᵀ) for an (in, out) one
        left, right = ((masked_A, True), (masked_B, True)) if site.fan_in_fan_out else ((masked_B, False),
                                                                                        (masked_A, False))
        for view in read.chain:
            left, right = replay_view(view, left, right, add)
        if form.weight_first:                                       # (L·R)·x = L·(R·x)
            down = add("down", aten.matmul.default, (factor_value(right, add), x))
            scaled = add("scale_mul", aten.mul.Tensor, (down, scale))
            return add("up", aten.matmul.default, (factor_value(left, add), scaled))
        reads_transposed = form.weight_transposed                   # x·(L·R) = x·(Rᵀ·Lᵀ)ᵀ: swap and transpose
        down_factor, up_factor = (flipped(left), flipped(right)) if reads_transposed else (right, left)
        down = add("down", aten.linear.default, (x, factor_value(down_factor, add)))          # (..., r)
        scaled = add("scale_mul", aten.mul.Tensor, (down, scale))                       # (..., r)
        return add("up", aten.linear.default, (scaled, factor_value(up_factor, add)))        # (..., out)


def _reads_as_out_in(read: Read) -> bool:
    """Whether the read uses the weight as stored like nn.Linear does (y = x·Wᵀ or y = W·x)."""
    form: LinearForm = read.detail
    transposes = sum(is_transpose(view) for view in read.chain)
    return (not form.weight_transposed) != (transposes % 2 == 1)


def _op_name(target) -> str:
    if hasattr(target, "_schema"):
        return target._schema.name.split("::")[-1]
    return getattr(target, "__name__", str(target))


def flipped(factor):
    """A factor as a (node, transposed) pair, transposed once more (no node: transposes are folded in later)."""
    node, transposed = factor
    return node, not transposed


def factor_value(factor, add, lead: int = 0) -> fx.Node:
    """The node of a (node, transposed) factor, its last two dims swapped when `transposed`; `lead` leading dims
    (the adapter stack of `mixed_batch`) stay in place."""
    node, transposed = factor
    dims = [*range(lead), lead + 1, lead]
    return add("transpose", aten.permute.default, (node, dims)) if transposed else node


def replay_view(view: fx.Node, left, right, add, lead: int = 0):
    """The factors of the viewed delta: ΔWᵀ = Rᵀ·Lᵀ; ΔW[rows] = L[rows]·R; ΔW[:, cols] = L·R[:, cols]; casts cast.
    Factors are (node, transposed) pairs whose last two dims are the 2-D factor, after `lead` leading dims."""
    if is_transpose(view):
        return flipped(right), flipped(left)
    if view.target in IDENTITIES:
        return left, right
    if view.target is aten.slice.Tensor:
        dim, *bounds = view.args[1:]
        if dim % 2 == 0:                           # rows of ΔW: rows of L
            node, transposed = left
            return (add("slice", aten.slice.Tensor, (node, lead + (1 if transposed else 0), *bounds)),
                    transposed), right
        node, transposed = right                   # columns of ΔW: columns of R
        return left, (add("slice", aten.slice.Tensor, (node, lead + (0 if transposed else 1), *bounds)), transposed)
    cast = lambda factor: (add("cast", view.target, (factor[0], *view.args[1:]), dict(view.kwargs)), factor[1])
    return cast(left), cast(right)
