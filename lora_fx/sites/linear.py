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

from lora_fx.sites.base import Read, Site, SiteKind, peft_initialize
from lora_fx.sites.dora import read_problems as dora_read_problems
from lora_fx.sites.variants import variant_of
from lora_fx.sites.views import Factor, op_name, replay, transposes, value, walk
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
    weight_dims = (2,)

    def reads(self, weight: fx.Node, param: torch.Tensor):
        reads, foreign = walk(weight, _consumer_form)
        return reads, foreign, []

    def describe(self, fqn, weight, param, reads, module_kind, layer) -> Site:
        rows, columns = param.shape
        if module_kind in ("linear", "conv1d_hf"):
            fan_in_fan_out = module_kind == "conv1d_hf"
        else:                                       # a raw parameter: the layout all its reads agree on
            fan_in_fan_out = all(not _reads_as_out_in(read) for read in reads)
        in_features, out_features = (rows, columns) if fan_in_fan_out else (columns, rows)
        op = "+".join(dict.fromkeys(op_name(read.node.target) for read in reads))
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
        return dora_read_problems(site)

    def insert(self, graph, read, site, factors, spec, training) -> fx.Node:
        add = factors[3]
        x = read.node.args[read.detail.input_index]
        dropped = add("dropout", aten.dropout.default, (x, spec.dropout, True)) if spec.dropout > 0 and training \
            else None
        branch = self._branch(read, site, factors, x if dropped is None else dropped)
        return variant_of(spec).term(read, site, factors, spec.adapter, branch, dropped)

    def _branch(self, read, site, factors, x) -> fx.Node:
        """s·(read of ΔW) at rank r, for the read's input `x`."""
        masked_A, masked_B, scale, add = factors
        form: LinearForm = read.detail
        left, right = delta_factors(site, masked_A, masked_B)
        for view in read.chain:
            left, right = replay(view, left, right, add)
        if form.weight_first:                                       # (L·R)·x = L·(R·x)
            down = add("down", aten.matmul.default, (value(right, add), x))
            scaled = add("scale_mul", aten.mul.Tensor, (down, scale))
            return add("up", aten.matmul.default, (value(left, add), scaled))
        down_factor, up_factor = read_factors(form, left, right)
        down = add("down", aten.linear.default, (x, value(down_factor, add)))          # (..., r)
        scaled = add("scale_mul", aten.mul.Tensor, (down, scale))                       # (..., r)
        return add("up", aten.linear.default, (scaled, value(up_factor, add)))        # (..., out)


def delta_factors(site: Site, lora_A: fx.Node, lora_B: fx.Node, lead: int = 0) -> tuple[Factor, Factor]:
    """ΔW = L·R in the weight's layout: (B, A) for an (out, in) weight, (Aᵀ, Bᵀ) for an (in, out) one; `lead`
    leading dims (a mixed batch's adapter stack) before each 2-D factor."""
    if site.fan_in_fan_out:
        return Factor(lora_A, True, lead), Factor(lora_B, True, lead)
    return Factor(lora_B, False, lead), Factor(lora_A, False, lead)


def read_factors(form: LinearForm, left: Factor, right: Factor) -> tuple[Factor, Factor]:
    """(down, up) with x·ΔWᵀ = linear(linear(x, down), up) for a read of the viewed delta L·R: (R, L), or for a read
    y = x·V, x·(L·R) = x·(Rᵀ·Lᵀ)ᵀ, (Lᵀ, Rᵀ)."""
    return (left.flipped(), right.flipped()) if form.weight_transposed else (right, left)


def _reads_as_out_in(read: Read) -> bool:
    """Whether the read uses the weight as stored like nn.Linear does (y = x·Wᵀ or y = W·x)."""
    form: LinearForm = read.detail
    return (not form.weight_transposed) != (transposes(read.chain) % 2 == 1)
