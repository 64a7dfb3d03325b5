"""Matching: which reads of which weights a spec adapts. Pure: it reads a plain graph and changes nothing.

Every weight the graph reads is offered to the site kinds (`lora_fx.sites`); the kind that recognises its reads
makes it a *site* (a linear weight, an embedding table, a conv kernel, ...), with every read in its own layout. The
site's FQN is the weight's owner module, so functional calls (`F.linear(x, self.weight)`) are found too, and a module
called twice is one site with two reads. A module's `.weight` is selected by `targets` (PEFT's `target_modules`
rules); other parameters by `target_parameters`.

Only reads of the weight matter. A targeted weight that is also read by an op no kind understands is an error,
never a silent partial adaptation: LoRA would be missing from that read (the Mamba2 fused kernel reads
`out_proj.weight` directly), and a merged weight would differ from the unmerged graph there.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

from torch import fx

from lora_fx.errors import TargetError
from lora_fx.quantize import as_seen
from lora_fx.sites import SITE_KINDS, Site, kind_of, supported, variant_of
from lora_fx.sites.base import value_users
from lora_fx.sites.views import op_name
from lora_fx.spec import ALL_LINEAR, LoraSpec, name_matches
from lora_fx.state import GraphState, is_lora_state_name

LINEAR_MODULES = ("linear", "conv1d_hf")       # what "all-linear" adapts, as PEFT: nn.Linear and HF Conv1D modules


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


@dataclass(frozen=True)
class Skipped:
    fqn: str
    reason: str


@dataclass
class WeightUses:
    """How the graph reads one module's parameters."""

    fqn: str
    sites: list[Site]           # its `.weight` (at most one site), and parameter sites
    foreign: list[fx.Node]      # nodes reading its `.weight` that no site kind accounts for
    others: list[fx.Node]       # nodes reading its other parameters (a bias, say): they never block a site
    notes: list[str]            # why a read is not a site
    parameter_foreign: dict = field(default_factory=dict)   # parameter site weight -> its reads no kind accounts for

    @property
    def weight_site(self) -> Site | None:
        return next((s for s in self.sites if SITE_KINDS[s.kind].selected_by == "modules"), None)


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


def op_names(nodes) -> list[str]:
    """How errors name the ops of `nodes`: an aten op's or function's name, a torch.fx-traced method's name
    (`t`, `abs`), else the node kind."""
    return sorted({op_name(n.target) if n.op == "call_function" else n.target if n.op == "call_method" else n.op
                   for n in nodes})


def get_attrs(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    """{target: the `get_attr` nodes of `graph` that read it} (torch.fx may read one tensor several times), in one
    pass over the graph."""
    nodes: dict[str, list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        if node.op == "get_attr":
            nodes[node.target].append(node)
    return nodes


def bind(gm: fx.GraphModule, graph: fx.Graph, sites) -> dict[str, Site]:
    """{key: site with its reads in `graph`} for each of `sites` (as the state keeps them, without reads) that
    `graph` reads: the site's own kind finds them, nothing is matched again. `gm` holds the weights."""
    bound, nodes = {}, get_attrs(graph)
    for site in sites:
        param = as_seen(gm.get_parameter(site.weight))
        reads = [read for node in nodes.get(site.weight, ()) for read in kind_of(site).reads_of(node, param)[0]]
        if reads:
            bound[site.key] = dataclasses.replace(site, reads=tuple(reads))
    return bound


def plain_graph_of(gm: fx.GraphModule) -> fx.Graph:
    """The graph matching reads: a lora_fx graph module's plain capture (current mode), else `gm.graph`."""
    plain = getattr(gm, "plain_graph", None)
    return plain() if callable(plain) else gm.graph


def _module_kinds(gm) -> dict:
    state = getattr(gm, "meta", {}).get("lora_fx")
    return dict(state.module_kinds) if isinstance(state, GraphState) else {}


def analyse(gm: fx.GraphModule, graph: fx.Graph | None = None) -> dict[str, WeightUses]:
    """Every module whose parameters `graph` (default: `gm`'s plain graph) reads, keyed by FQN."""
    graph = plain_graph_of(gm) if graph is None else graph
    module_kinds = _module_kinds(gm)
    uses: dict[str, WeightUses] = {}
    reads: dict[tuple[str, str], list] = defaultdict(list)          # (weight, kind) -> reads
    for node in graph.nodes:
        if node.op != "get_attr" or is_lora_state_name(node.target):
            continue
        try:
            param = as_seen(gm.get_parameter(node.target))          # a quantized weight: its logical shape
        except AttributeError:
            continue
        fqn, _, attr = node.target.rpartition(".")
        entry = uses.setdefault(fqn, WeightUses(fqn, [], [], [], []))
        parameter_site = attr != "weight" or not fqn
        scans = {kind.name: kind.reads_of(node, param) for kind in SITE_KINDS.values()
                 if (kind.selected_by == "parameters") == parameter_site}
        users = value_users(node)
        found, foreign, _ = max(scans.values(), key=lambda scan: len(scan[0]), default=([], users, []))
        kind = next((name for name, scan in scans.items() if scan[0] is found), None)
        entry.notes += [note for scan in scans.values() for note in scan[2]]
        if not found and parameter_site and SITE_KINDS["linear"].reads_of(node, param)[0]:
            entry.notes.append(f"parameter {node.target!r} is read by a linear op but is not a module's `.weight`")
        if found:
            reads[(node.target, kind)] += found
            if parameter_site and foreign:
                entry.parameter_foreign.setdefault(node.target, []).extend(foreign)
        (entry.others if parameter_site else entry.foreign).extend(foreign if found else users)
    for (weight, kind), weight_reads in reads.items():
        fqn = weight.rpartition(".")[0]
        site = SITE_KINDS[kind].describe(fqn, weight, as_seen(gm.get_parameter(weight)), weight_reads,
                                         module_kinds.get(fqn), layer_index(fqn))
        uses[fqn].sites.append(site)
    return uses


def selected_as_parameter(spec: LoraSpec, fqn: str) -> bool:
    """Whether `target_parameters` names module `fqn`'s `.weight`: PEFT then wraps that parameter (`ParamWrapper`),
    which for a 2-D weight is LoRA on it under the module's keys, as a targeted module's is."""
    return bool(spec.target_parameters) and name_matches(spec.target_parameters, f"{fqn}.weight")


def _skip_reason(spec: LoraSpec, fqn: str, site: Site | None, state: GraphState) -> str | None:
    """Why `spec` does not adapt the `.weight` of module `fqn` (None: it does). `site` is None for modules whose
    weight no site kind can read."""
    if selected_as_parameter(spec, fqn):
        return None
    targets = spec.targets
    if targets is None:
        return "only `target_parameters` are targeted"
    if targets == ALL_LINEAR:
        if site is None or site.kind != "linear" or state.module_kinds.get(fqn) not in LINEAR_MODULES:
            return "not an nn.Linear or Conv1D module ('all-linear' adapts those, as PEFT does)"
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
        for site in entry.sites:
            if site is entry.weight_site:
                continue
            if not (spec.target_parameters and name_matches(spec.target_parameters, site.key)):
                skipped.append(Skipped(site.key, "not in `target_parameters`"))
            elif foreign := entry.parameter_foreign.get(site.weight):
                problems.append(f"parameter {site.key!r} is targeted but is also read by {op_names(foreign)}, which "
                                f"its site kind cannot rewrite{_notes(entry)}")
            else:
                sites.append(site)
        site = entry.weight_site
        weight = f"{fqn}.weight"
        pending = [node for node in entry.foreign if lowerable(node, weight)]
        unknown = [n for n in entry.foreign if n not in pending]
        candidate = site or (_pending_site(gm, fqn, state) if pending else None)
        reason = _skip_reason(spec, fqn, candidate, state)
        if reason is not None:
            skipped.append(Skipped(fqn, reason))
        elif site is None and not (pending or entry.foreign or entry.others):
            problems.append(f"module {fqn!r} is targeted but the graph never reads its parameters (unused in this "
                            f"mode, or tied to another module's weight, which the graph reads instead)")
        elif site is None and not pending:
            problems.append(f"module {fqn!r} is targeted but has no read lora_fx can adapt: its parameters are read "
                            f"by {op_names(entry.foreign + entry.others)}{_notes(entry)}; supported: {supported()}"
                            f"{_lowerings_note()}")
        elif unknown:
            problems.append(f"module {fqn!r} is targeted but its weight is also read by {op_names(unknown)}, which "
                            f"lora_fx cannot rewrite, so LoRA would be silently missing there (and a merged weight "
                            f"would differ){_notes(entry)}; exclude it, or register a lowering for that op")
        elif pending:
            to_lower += [node for node in pending if node not in to_lower]
            pending_sites.append(_pending_site(gm, fqn, state))
        else:
            sites.append(site)
    as_parameters = [site.fqn for site in sites + pending_sites if selected_as_parameter(spec, site.fqn)]
    if spec.dropout and as_parameters:
        problems.append(f"`dropout` must be 0 for the weights `target_parameters` selects ({_some(as_parameters, 3)}): "
                        f"PEFT's ParamWrapper refuses lora_dropout for parameters, got {spec.dropout}")
    problems += [problem for site in sites + pending_sites
                 for problem in variant_of(spec).site_problems(SITE_KINDS[site.kind], site)]
    sites, selection_problems = _completed(gm, sites, spec, state)
    problems += selection_problems + _unmatched_targets(gm, spec, uses)
    if not sites and not problems and not to_lower:
        adaptable = [s.key for e in uses.values() for s in e.sites]
        problems.append(f"the spec selects no site (targets={spec.targets!r}, exclude={spec.exclude!r}, "
                        f"layers={spec.layers!r}, target_parameters={spec.target_parameters!r}); adaptable weights "
                        f"here include {_some(adaptable)}")
    return Match(sites, skipped, problems, to_lower, pending_sites)


def _completed(gm: fx.GraphModule, sites: list[Site], spec: LoraSpec, state: GraphState):
    """Each kind completes the sites it adds to `spec`'s selection (see `SiteKind.selected`); and its problems."""
    completed, problems = {}, []
    for name, kind in SITE_KINDS.items():
        own = [site for site in sites if site.kind == name]
        if own:
            chosen, found = kind.selected(gm, own, spec, state)
            completed.update((site.key, site) for site in chosen)
            problems += found
    return [completed[site.key] for site in sites], problems


def _pending_site(gm: fx.GraphModule, fqn: str, state: GraphState) -> Site:
    """The site a lowerable weight becomes once lowered (a linear on `<fqn>.weight`), for the targets callable."""
    out_features, in_features = gm.get_parameter(f"{fqn}.weight").shape
    return Site(fqn=fqn, in_features=in_features, out_features=out_features, layer=layer_index(fqn), op="linear",
                weight=f"{fqn}.weight")


def _lowerings_note() -> str:
    return f"; ops with a lowering: {sorted(op_name(op) for op in LOWERINGS)}" if LOWERINGS else ""


def _notes(entry: WeightUses) -> str:
    return "; " + "; ".join(dict.fromkeys(entry.notes)) if entry.notes else ""


def _some(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "") if names else "none"


def _unmatched_targets(gm: fx.GraphModule, spec: LoraSpec, uses: dict[str, WeightUses]) -> list[str]:
    """Each list entry (or the regex) that names no module at all, and each `target_parameters` entry that names no
    parameter a kind can adapt (saying why for a parameter that exists), with the nearest names."""
    problems = []
    targets = spec.targets
    if targets is not None and targets != ALL_LINEAR and not callable(targets):
        fqns = list(uses)
        entries = [targets] if isinstance(targets, str) else list(targets)
        for entry in entries:
            if not any(name_matches(entry if isinstance(targets, str) else [entry], fqn) for fqn in fqns):
                problems.append(_no_match("target", entry, fqns))
    parameters = [s.key for e in uses.values() for s in e.sites if s is not e.weight_site]
    parameters += [e.weight_site.weight for e in uses.values() if e.weight_site is not None]
    every = {name: tuple(p.shape) for name, p in gm.named_parameters() if not is_lora_state_name(name)}
    for entry in spec.target_parameters or ():
        if any(name_matches([entry], key) for key in parameters):
            continue
        named = {name: shape for name, shape in every.items() if name_matches([entry], name)}
        if named:
            shown = ", ".join(f"{name!r} {shape}" for name, shape in list(named.items())[:3])
            problems.append(f"target parameter {entry!r} names {shown}{' ...' if len(named) > 3 else ''}, which no "
                            f"parameter site kind adapts: `target_parameters` adapts 3-D MoE expert weights "
                            f"(experts, out, in) read by grouped_mm or gathered for bmm, and modules' 2-D `.weight` "
                            f"where a site kind reads it; supported: {supported()}")
        else:
            problems.append(_no_match("target parameter", entry, parameters or list(every)))
    return problems


def _no_match(what: str, entry: str, names: list[str]) -> str:
    candidates = sorted({*names, *(name.rsplit(".", 1)[-1] for name in names)})
    nearest = difflib.get_close_matches(entry, candidates, n=5, cutoff=0.4)
    return f"{what} {entry!r} matched no {'parameter' if 'parameter' in what else 'module'}; nearest: " \
           f"{nearest or _some(names)}"
