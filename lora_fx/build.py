"""build: a mode's graph as a function of its plain capture and the graph state.

    graph = dequantize(mode_passes(graph_passes(insert(adapter_n, ... insert(adapter_1, lower(plain))))))

Deriving every graph from the plain capture (instead of editing the last one) is what makes changes composable:
applying the same spec twice gives the same graph, adapters never nest, deleting every adapter gives back the plain
capture's ops, a fused op is lowered exactly while some adapter needs it (transformers' grouped_mm fallback while any
adapter exists, see `lora_fx.sites.experts`), and a mode captured later (see `LoraGraphModule.train`) gets the same
adapters as the others. Building never touches the graph module it reads: it works on a copy of the plain graph, in
a scratch GraphModule that shares the module's tensors.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Callable

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from lora_fx.errors import CaptureWarning, TargetError
from lora_fx.match import LOWERINGS, analyse, lowerable, op_names
from lora_fx.passes.autocast_ready import autocast_ready
from lora_fx.passes.checkpoint_blocks import checkpoint_blocks
from lora_fx.passes.expand_layout import expand_layout
from lora_fx.passes.fuse_siblings import NAME as FUSE_SIBLINGS
from lora_fx.passes.fuse_siblings import SHARED_DROPOUT, fuse_sibling_branches, fuse_sibling_branches_sharing_dropout
from lora_fx.passes.insert_lora import insert_lora
from lora_fx.passes.lean_dropout import lean_dropout
from lora_fx.passes.quantize_base import dequantize_reads
from lora_fx.passes.sdpa_gqa import sdpa_gqa
from lora_fx.passes.split_blocks import Unsplittable, split_blocks
from lora_fx.sites import Site, kind_of
from lora_fx.sites.experts import lower_fallback_reads
from lora_fx.state import META_KEY, GraphState

# name -> pass run (in the order of `GraphState.graph_passes`) after every adapter's branches are inserted
GRAPH_PASSES: dict[str, Callable[[fx.GraphModule], PassResult]] = {
    FUSE_SIBLINGS: fuse_sibling_branches, SHARED_DROPOUT: fuse_sibling_branches_sharing_dropout}


# passes every training-mode graph gets, after the optional ones: the same function, with less to save for the
# backward (lean_dropout, sdpa_gqa) or faster GEMM layouts (expand_layout)
TRAINING_PASSES: list[Callable[[fx.GraphModule], PassResult]] = [lean_dropout, expand_layout, sdpa_gqa]
# passes every eval-mode graph gets (decoding included): grouped key/value heads read in place by SDPA instead of
# repeated copies of the whole cache every step
EVAL_PASSES: list[Callable[[fx.GraphModule], PassResult]] = [sdpa_gqa]


def register_graph_pass(name: str, graph_pass: Callable[[fx.GraphModule], PassResult]) -> None:
    """Make `graph_pass` available to `GraphState.graph_passes` under `name`."""
    GRAPH_PASSES[name] = graph_pass


def build(root: fx.GraphModule, plain: fx.Graph, state: GraphState, training: bool, mode: str) -> fx.Graph:
    """The graph of `state` for one mode. `root` holds every tensor the result reads (LoRA factors included);
    `training` picks the LoRA dropout; `mode` names the mode in errors."""
    scratch = _scratch(root, copy_graph(plain))
    scratch.meta[META_KEY] = state                    # graph passes may read the state being built
    autocast_ready(scratch)
    _lower(scratch, state.adapted_sites(), mode)
    if state.specs:
        lower_fallback_reads(scratch.graph)                   # no gradient for frozen experts (lora_fx.sites.experts)
    found = {site.key: site for entry in analyse(scratch, scratch.graph).values() for site in entry.sites}
    for adapter, spec in state.specs.items():                 # a site not read in this mode has no branch here
        sites = [dataclasses.replace(state.site_info[key], reads=found[key].reads)      # as applied, with these reads
                 for key in state.sites[adapter] if key in found]
        insert_lora(scratch, sites, spec, training)
    for name in state.graph_passes:
        GRAPH_PASSES[name](scratch)
    for graph_pass in TRAINING_PASSES if training else EVAL_PASSES:
        graph_pass(scratch)
    if state.quantized:                                       # last: every read of a quantized weight, LoRA's too
        dequantize_reads(scratch, state.quantized)
    graph = scratch.graph
    graph.owning_module = None
    return graph


def structure(graph: fx.Graph, state: GraphState, mode: str) -> tuple[fx.Graph, dict[str, fx.Graph]]:
    """(root graph, {block path: graph}): `graph` cut into the model's repeated blocks (see
    `lora_fx.passes.split_blocks`), or left flat — with a warning saying why — when a block cannot be cut."""
    if not state.block_paths:
        return graph, {}
    root = copy_graph(graph)
    try:
        blocks = split_blocks(root, list(state.block_paths))
    except Unsplittable as err:
        warnings.warn(CaptureWarning(f"the graph stays flat in {mode} mode, without per-block modules "
                                     f"(lora_fx.blocks(gm) is empty there): {err}"))
        return graph, {}
    if state.checkpoint != "none":
        checkpoint_blocks(root, blocks, state.checkpoint)
    return root, blocks


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of `graph`'s nodes (meta copied shallowly, as `Graph.__deepcopy__` does) sharing its code generator,
    which holds the input/output pytree specs and is never changed."""
    copied = fx.Graph(tracer_cls=graph._tracer_cls)
    output, old_output = copied.graph_copy(graph, {}, return_output_node=True)
    copied._codegen = graph._codegen
    copied.output(output, type_expr=getattr(old_output, "type", None)).meta = copy.copy(old_output.meta)
    return copied


def _scratch(root: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule owning `graph` that sees every tensor and submodule of `root` (shared, not copied)."""
    scratch = fx.GraphModule(nn.Module(), fx.Graph())
    scratch._modules.update(root._modules)
    scratch._parameters.update(root._parameters)
    scratch._buffers.update(root._buffers)
    scratch.__dict__.update({name: value for name, value in root.__dict__.items() if isinstance(value, torch.Tensor)})
    scratch._graph = graph
    graph.owning_module = scratch
    return scratch


def _lower(scratch: fx.GraphModule, adapted: list[Site], mode: str) -> None:
    """Lower the ops that read an adapted weight themselves; refuse any other read no site kind accounts for, and a
    weight read as another kind than it was adapted as."""
    uses = analyse(scratch, scratch.graph)
    problems = []
    for site in adapted:
        entry = uses.get(site.fqn)
        if entry is None:
            continue                                  # not read at all in this mode
        if kind_of(site).selected_by == "parameters":
            if foreign := entry.parameter_foreign.get(site.weight):
                problems.append(f"parameter {site.key!r} is adapted, but in {mode} mode it is also read by "
                                f"{op_names(foreign)}, which its site kind cannot rewrite")
            continue
        found = entry.weight_site
        if found is not None and found.kind != site.kind:
            problems.append(f"module {site.fqn!r} is adapted as a {site.kind} site, but in {mode} mode its weight is "
                            f"read as a {found.kind} site")
        unknown = [node for node in entry.foreign if not lowerable(node, site.weight)]
        if unknown:
            problems.append(f"module {site.fqn!r} is adapted, but in {mode} mode its weight is also read by "
                            f"{op_names(unknown)}, which lora_fx cannot rewrite")
        elif entry.foreign:
            for node in entry.foreign:
                LOWERINGS[node.target].lower(scratch, node)
    if problems:
        raise TargetError("cannot build the graph:\n  - " + "\n  - ".join(problems))
