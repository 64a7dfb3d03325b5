"""Matching: which linear uses of which weights a spec adapts. Pure: it reads the graph and changes nothing.

A *site* is one module's weight as read by linear ops: every node that uses the weight through a registered
linear form (`aten.linear`, the `addmm`/`mm` forms of HF GPT-2's `Conv1D`, `F.linear` in torch.fx graphs). The
site's FQN is the weight's owner module, so functional calls (`F.linear(x, self.weight)`) are found too, and a
module called twice is one site with two nodes.

A targeted module whose weight is also read by an op no matcher understands is an error, never a silent partial
adaptation: LoRA would be missing from that use (the Mamba2 fused kernel reads `out_proj.weight` directly).
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx

from lora_fx.errors import TargetError
from lora_fx.spec import ALL_LINEAR, LoraSpec, name_matches
from lora_fx.state import GraphState, is_lora_state_name, tag_of

aten = torch.ops.aten


@dataclass(frozen=True)
class LinearForm:
    """Where a linear-like op takes its input and weight. `y = x @ W.T` (nn.Linear layout, weight (out, in)), or
    with `weight_transposed`, `y = x @ W` (HF Conv1D layout, weight (in, out))."""

    input_index: int
    weight_index: int
    weight_transposed: bool = False
    accepts: Callable[[fx.Node], bool] = lambda node: True


LINEAR_FORMS: dict = {}


def register_linear_op(op, form: LinearForm) -> None:
    """Teach matching a new linear-like op. Its output must be the linear map of the input by the weight."""
    LINEAR_FORMS[op] = form


def _unit_addmm(node: fx.Node) -> bool:
    return node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1


register_linear_op(aten.linear.default, LinearForm(input_index=0, weight_index=1))
register_linear_op(torch._C._nn.linear, LinearForm(input_index=0, weight_index=1))
register_linear_op(aten.addmm.default, LinearForm(input_index=1, weight_index=2, weight_transposed=True,
                                                  accepts=_unit_addmm))
register_linear_op(aten.mm.default, LinearForm(input_index=0, weight_index=1, weight_transposed=True))


@dataclass(frozen=True)
class Lowering:
    """How to rewrite an op that reads a module's weight itself (a fused kernel's output projection) into that op
    plus an ordinary linear on the weight, which is then a site. `lower(gm, node)` must preserve the values."""

    weight_argument: str                                  # the op's argument that reads the module's `.weight`
    lower: Callable[[fx.GraphModule, fx.Node], None]


LOWERINGS: dict = {}


def register_lowering(op, lowering: Lowering) -> None:
    """Let targeted weights read by `op` be adapted: `lowering` turns that read into a linear site."""
    LOWERINGS[op] = lowering


def argument(node: fx.Node, name: str):
    """The value `node` passes for its op's schema argument `name` (positional or keyword)."""
    names = [a.name for a in node.target._schema.arguments]
    index = names.index(name)
    return node.args[index] if index < len(node.args) else node.kwargs.get(name)


def lowerable(node: fx.Node, fqn: str) -> bool:
    """Whether a registered lowering turns `node`'s reads of module `fqn` into a linear use."""
    lowering = LOWERINGS.get(node.target) if node.op == "call_function" else None
    weight = argument(node, lowering.weight_argument) if lowering else None
    return isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target == f"{fqn}.weight"


def supported_ops() -> str:
    return ", ".join(sorted(str(op) if hasattr(op, "_schema") else f"{op.__module__}.{op.__name__}"
                            for op in LINEAR_FORMS))


@dataclass(frozen=True)
class Site:
    """A module weight read by linear ops: what a spec's callable target receives."""

    fqn: str                    # the module's name in the user's model, e.g. "model.layers.0.self_attn.q_proj"
    in_features: int
    out_features: int
    layer: int | None           # first numeric component of the FQN ("model.layers.3.mlp.up_proj" -> 3)
    op: str                     # "linear", "addmm" or "mm"
    weight: str                 # the weight's parameter name
    fan_in_fan_out: bool        # weight stored (in, out), as HF Conv1D does
    nodes: tuple[fx.Node, ...] = field(default=(), repr=False, compare=False)


@dataclass(frozen=True)
class Skipped:
    fqn: str
    reason: str


@dataclass
class WeightUses:
    """How the graph reads one module's parameters."""

    fqn: str
    sites: list[Site]           # at most one (a module's `.weight` read by linear ops)
    foreign: list[fx.Node]      # nodes reading its parameters other than through a linear form
    notes: list[str]            # why a linear use is not a site

    @property
    def foreign_ops(self) -> list[str]:
        return _op_names(self.foreign)


@dataclass
class Match:
    sites: list[Site]
    skipped: list[Skipped]
    problems: list[str]         # targeted modules that cannot be adapted, and targets that matched nothing
    to_lower: list[fx.Node]     # ops to lower first (see Lowering) so that targeted weights become sites
    pending: list[Site]         # the sites those lowerings will create

    def raise_problems(self) -> None:
        if self.problems:
            raise TargetError("cannot apply LoRA:\n  - " + "\n  - ".join(self.problems))


def layer_index(fqn: str) -> int | None:
    for part in fqn.split(".")[:-1]:
        if part.isdigit():
            return int(part)
    return None


def _op_name(target) -> str:
    if hasattr(target, "_schema"):
        return target._schema.name.split("::")[-1]
    return getattr(target, "__name__", str(target))


def _op_names(nodes) -> list[str]:
    return sorted({_op_name(n.target) if n.op == "call_function" else n.op for n in nodes})


def _weight_use(node: fx.Node, user: fx.Node, param: torch.Tensor) -> LinearForm | None:
    """The linear form by which `user` reads `node` as its weight, if it does."""
    form = LINEAR_FORMS.get(user.target) if user.op == "call_function" else None
    if (form is not None and form.accepts(user) and len(user.args) > form.weight_index
            and user.args[form.weight_index] is node and sum(a is node for a in user.args) == 1 and param.dim() == 2):
        return form
    return None


def analyse(gm: fx.GraphModule) -> dict[str, WeightUses]:
    """Every module whose parameters the graph reads, keyed by FQN, with its linear site and other uses."""
    params = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and not tag_of(node) and not is_lora_state_name(node.target):
            try:
                params[node] = gm.get_parameter(node.target)
            except AttributeError:
                continue
    linear_nodes: dict[str, list[fx.Node]] = defaultdict(list)
    forms: dict[str, LinearForm] = {}
    for node, param in params.items():
        for user in node.users:
            if form := _weight_use(node, user, param):
                linear_nodes[node.target].append(user)
                forms[node.target] = form

    uses: dict[str, WeightUses] = {}
    for node in params:
        fqn = node.target.rpartition(".")[0]
        entry = uses.setdefault(fqn, WeightUses(fqn, [], [], []))
        own_linear_nodes = set(linear_nodes.get(f"{fqn}.weight", ()))   # they may also read this module's bias
        entry.foreign += [u for u in node.users if u not in own_linear_nodes and not tag_of(u)
                          and u not in entry.foreign]
    for name, nodes in linear_nodes.items():
        fqn, _, attr = name.rpartition(".")
        entry = uses[fqn]
        if attr != "weight" or not fqn:
            entry.notes.append(f"parameter {name!r} is read by a linear op but is not a module's `.weight`")
            entry.foreign += nodes
            continue
        form = forms[name]
        rows, cols = gm.get_parameter(name).shape
        in_features, out_features = (rows, cols) if form.weight_transposed else (cols, rows)
        entry.sites.append(Site(fqn=fqn, in_features=in_features, out_features=out_features, layer=layer_index(fqn),
                                op=_op_name(nodes[0].target), weight=name, fan_in_fan_out=form.weight_transposed,
                                nodes=tuple(dict.fromkeys(nodes))))
    return uses


def sites_by_fqn(gm: fx.GraphModule) -> dict[str, Site]:
    """Every linear site of `gm` (adapted or not), keyed by module FQN."""
    return {fqn: uses.sites[0] for fqn, uses in analyse(gm).items() if uses.sites}


def _skip_reason(spec: LoraSpec, fqn: str, site: Site | None, state: GraphState) -> str | None:
    """Why `spec` does not adapt module `fqn` (None: it does). `site` is None for modules with no linear use."""
    targets = spec.targets
    if targets == ALL_LINEAR:
        if site is None:
            return "not a linear use"
        if fqn in state.output_layers:
            return "the model's output layer ('all-linear' skips it)"
    elif callable(targets):
        if site is None or not targets(site):
            return "the targets callable did not select it"
    elif not name_matches(targets, fqn):
        return "not in targets"
    if spec.exclude is not None and name_matches(spec.exclude, fqn):
        return "excluded by `exclude`"
    if spec.layers is not None:
        layer = layer_index(fqn)
        if layer is None:
            return "`layers` is set and its name has no layer index"
        if layer not in spec.layers:
            return f"layer {layer} is not in `layers`"
    return None


def match(gm: fx.GraphModule, spec: LoraSpec, state: GraphState) -> Match:
    """The sites `spec` adapts in `gm`, what it skipped and why, and every problem that blocks applying it."""
    uses = analyse(gm)
    sites, skipped, problems, to_lower, pending_sites = [], [], [], [], []
    for fqn, entry in uses.items():
        site = entry.sites[0] if entry.sites else None
        pending = [node for node in entry.foreign if lowerable(node, fqn)]
        unknown = _op_names(n for n in entry.foreign if n not in pending)
        candidate = site or (_pending_site(gm, fqn) if pending else None)
        reason = _skip_reason(spec, fqn, candidate, state)
        if reason is not None:
            skipped.append(Skipped(fqn, reason))
        elif site is None and not pending:
            problems.append(f"module {fqn!r} is targeted but has no linear use lora_fx can adapt: its parameters "
                            f"are read by {unknown}{_notes(entry)}; supported ops: {supported_ops()}"
                            f"{_lowerings_note()}")
        elif unknown:
            problems.append(f"module {fqn!r} is targeted but its parameters are also read by {unknown}, which "
                            f"lora_fx cannot rewrite, so LoRA would be silently missing there; exclude it, or "
                            f"register a lowering for that op")
        elif pending:
            to_lower += [node for node in pending if node not in to_lower]
            pending_sites.append(_pending_site(gm, fqn))
        else:
            sites.append(site)
    problems += _unmatched_targets(spec, uses)
    if not sites and not problems and not to_lower:
        linear = [s.fqn for e in uses.values() for s in e.sites]
        problems.append(f"the spec selects no site (targets={spec.targets!r}, exclude={spec.exclude!r}, "
                        f"layers={spec.layers!r}); linear modules here include {_some(linear)}")
    return Match(sites, skipped, problems, to_lower, pending_sites)


def _pending_site(gm: fx.GraphModule, fqn: str) -> Site:
    """The site a lowerable weight becomes once lowered (a linear on `<fqn>.weight`), for the targets callable."""
    out_features, in_features = gm.get_parameter(f"{fqn}.weight").shape
    return Site(fqn=fqn, in_features=in_features, out_features=out_features, layer=layer_index(fqn), op="linear",
                weight=f"{fqn}.weight", fan_in_fan_out=False)


def _lowerings_note() -> str:
    return f"; ops with a lowering: {sorted(_op_name(op) for op in LOWERINGS)}" if LOWERINGS else ""


def _notes(entry: WeightUses) -> str:
    return "; " + "; ".join(entry.notes) if entry.notes else ""


def _some(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "") if names else "none"


def _unmatched_targets(spec: LoraSpec, uses: dict[str, WeightUses]) -> list[str]:
    """Each list entry (or the regex) that names no module at all, with the nearest module names."""
    targets = spec.targets
    if targets == ALL_LINEAR or callable(targets):
        return []
    fqns = list(uses)
    entries = [targets] if isinstance(targets, str) else list(targets)
    problems = []
    for entry in entries:
        if any(name_matches(entry if isinstance(targets, str) else [entry], fqn) for fqn in fqns):
            continue
        names = sorted({*fqns, *(fqn.rsplit(".", 1)[-1] for fqn in fqns)})
        nearest = difflib.get_close_matches(entry, names, n=5, cutoff=0.4)
        problems.append(f"target {entry!r} matched no module; nearest: {nearest or _some(fqns)}")
    return problems
