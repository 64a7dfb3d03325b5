"""Matching: which reads of which weights a spec adapts. Pure: it reads a plain graph and changes nothing.

A *site* is one module's weight and every *read* of it: each node that uses the weight through a registered linear
form (`aten.linear`, the `addmm`/`mm` forms of HF GPT-2's `Conv1D`, `F.linear` in torch.fx graphs). Each read
keeps its own layout: `x @ W.T` (nn.Linear) or `x @ W` (Conv1D). The site's FQN is the weight's owner module, so
functional calls (`F.linear(x, self.weight)`) are found too, and a module called twice is one site with two reads.

Only reads of the weight matter. A targeted weight that is also read by an op no form understands is an error,
never a silent partial adaptation: LoRA would be missing from that read (the Mamba2 fused kernel reads
`out_proj.weight` directly), and a merged weight would differ from the unmerged graph there.
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


def lowerable(node: fx.Node, weight: str) -> bool:
    """Whether a registered lowering turns `node`'s read of the parameter `weight` into a linear read."""
    lowering = LOWERINGS.get(node.target) if node.op == "call_function" else None
    read = argument(node, lowering.weight_argument) if lowering else None
    return isinstance(read, fx.Node) and read.op == "get_attr" and read.target == weight


def supported_ops() -> str:
    return ", ".join(sorted(str(op) if hasattr(op, "_schema") else f"{op.__module__}.{op.__name__}"
                            for op in LINEAR_FORMS))


@dataclass(frozen=True)
class Read:
    """One node reading a site's weight through a linear form."""

    node: fx.Node
    transposed: bool            # the node computes x @ W (weight as stored is (in, out)), not x @ W.T

    @property
    def input(self) -> fx.Node:
        return self.node.args[LINEAR_FORMS[self.node.target].input_index]


@dataclass(frozen=True)
class Site:
    """A module weight and its linear reads: what a spec's callable target receives."""

    fqn: str                    # the module's name in the user's model, e.g. "model.layers.0.self_attn.q_proj"
    in_features: int
    out_features: int
    layer: int | None           # first numeric component of the FQN ("model.layers.3.mlp.up_proj" -> 3)
    op: str                     # the reading ops, e.g. "linear", "addmm", or "linear+mm"
    weight: str                 # the weight's parameter name
    fan_in_fan_out: bool        # the weight is stored (in, out), as HF Conv1D does: every read computes x @ W
    reads: tuple[Read, ...] = field(default=(), repr=False, compare=False)

    @property
    def nodes(self) -> tuple[fx.Node, ...]:
        return tuple(read.node for read in self.reads)


@dataclass(frozen=True)
class Skipped:
    fqn: str
    reason: str


@dataclass
class WeightUses:
    """How the graph reads one module's parameters."""

    fqn: str
    sites: list[Site]           # at most one (the module's `.weight` read by linear forms)
    foreign: list[fx.Node]      # nodes reading its `.weight` other than through a linear form
    others: list[fx.Node]       # nodes reading its other parameters (a bias, say): they never block a site
    notes: list[str]            # why a linear read is not a site


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


def op_names(nodes) -> list[str]:
    return sorted({_op_name(n.target) if n.op == "call_function" else n.op for n in nodes})


def plain_graph_of(gm: fx.GraphModule) -> fx.Graph:
    """The graph matching reads: a lora_fx graph module's plain capture (current mode), else `gm.graph`."""
    plain = getattr(gm, "plain_graph", None)
    return plain() if callable(plain) else gm.graph


def _linear_read(weight: fx.Node, user: fx.Node) -> Read | None:
    """How `user` reads `weight` as the weight of a linear form, if it does."""
    form = LINEAR_FORMS.get(user.target) if user.op == "call_function" else None
    if (form is not None and form.accepts(user) and len(user.args) > form.weight_index
            and user.args[form.weight_index] is weight and sum(a is weight for a in user.args) == 1
            and weight not in user.kwargs.values()):
        return Read(user, form.weight_transposed)
    return None


def analyse(gm: fx.GraphModule, graph: fx.Graph | None = None) -> dict[str, WeightUses]:
    """Every module whose parameters `graph` (default: `gm`'s plain graph) reads, keyed by FQN."""
    graph = plain_graph_of(gm) if graph is None else graph
    uses: dict[str, WeightUses] = {}
    reads: dict[str, list[Read]] = defaultdict(list)
    for node in graph.nodes:
        if node.op != "get_attr" or tag_of(node) or is_lora_state_name(node.target):
            continue
        try:
            param = gm.get_parameter(node.target)
        except AttributeError:
            continue
        fqn, _, attr = node.target.rpartition(".")
        entry = uses.setdefault(fqn, WeightUses(fqn, [], [], [], []))
        users = [u for u in node.users if not tag_of(u)]
        if attr != "weight" or not fqn:
            entry.others += users
            if any(_linear_read(node, u) for u in users):
                entry.notes.append(f"parameter {node.target!r} is read by a linear op but is not a module's `.weight`")
            continue
        for user in users:
            read = _linear_read(node, user) if param.dim() == 2 else None
            if read is None:
                entry.foreign.append(user)
            else:
                reads[fqn].append(read)
    for fqn, site_reads in reads.items():
        weight = f"{fqn}.weight"
        rows, cols = gm.get_parameter(weight).shape
        fan_in_fan_out = all(read.transposed for read in site_reads)
        in_features, out_features = (rows, cols) if fan_in_fan_out else (cols, rows)
        op = "+".join(dict.fromkeys(_op_name(read.node.target) for read in site_reads))
        uses[fqn].sites.append(Site(fqn=fqn, in_features=in_features, out_features=out_features,
                                    layer=layer_index(fqn), op=op, weight=weight, fan_in_fan_out=fan_in_fan_out,
                                    reads=tuple(site_reads)))
    return uses


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


def match(gm: fx.GraphModule, spec: LoraSpec, state: GraphState, graph: fx.Graph | None = None) -> Match:
    """The sites `spec` adapts in `graph` (default: `gm`'s plain graph), what it skipped and why, and every problem
    that blocks applying it."""
    uses = analyse(gm, graph)
    sites, skipped, problems, to_lower, pending_sites = [], [], [], [], []
    for fqn, entry in uses.items():
        site = entry.sites[0] if entry.sites else None
        weight = f"{fqn}.weight"
        pending = [node for node in entry.foreign if lowerable(node, weight)]
        unknown = [n for n in entry.foreign if n not in pending]
        candidate = site or (_pending_site(gm, fqn) if pending else None)
        reason = _skip_reason(spec, fqn, candidate, state)
        if reason is not None:
            skipped.append(Skipped(fqn, reason))
        elif site is None and not pending:
            problems.append(f"module {fqn!r} is targeted but has no linear use lora_fx can adapt: its parameters "
                            f"are read by {op_names(entry.foreign + entry.others)}{_notes(entry)}; supported ops: "
                            f"{supported_ops()}{_lowerings_note()}")
        elif unknown:
            problems.append(f"module {fqn!r} is targeted but its weight is also read by {op_names(unknown)}, which "
                            f"lora_fx cannot rewrite, so LoRA would be silently missing there (and a merged weight "
                            f"would differ); exclude it, or register a lowering for that op")
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
