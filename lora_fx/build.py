"""build: a mode's graph as a function of its plain capture and the graph state.

    graph = PIPELINE(plain, state, mode)      lower, insert every adapter's branches, optional and mode passes

Deriving every graph from the plain capture (instead of editing the last one) is what makes changes composable:
applying the same spec twice gives the same graph, adapters never nest, deleting every adapter gives back the plain
capture's ops, a fused op is lowered exactly while some adapter needs it (transformers' grouped_mm fallback while any
adapter exists, see `lora_fx.sites.experts`), and a mode captured later (see `LoraGraphModule.train`) gets the same
adapters as the others. Building never touches the graph module it reads: it works on a copy of the plain graph, in
a scratch GraphModule that shares the module's tensors.

Every graph pass has one signature, GraphModule in and `PassResult` out, and reads what it needs besides the graph
from `lora_fx.state.building_of(gm)` (the state, training or not, the mode's name). `PIPELINE` lists them in the
order they run, each with the condition under which it runs; optional passes are turned on by typed options of the
state (`siblings`, `routed`, `quantized`; an exporter's own rewrites in `export_passes`). A pass that fails names
itself and the mode in a note on the error.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, NamedTuple

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from lora_fx.errors import CaptureWarning
from lora_fx.passes.autocast_ready import autocast_ready
from lora_fx.passes.checkpoint_blocks import checkpoint_blocks
from lora_fx.passes.dequantize_reads import dequantize_reads
from lora_fx.passes.expand_layout import expand_layout
from lora_fx.passes.fuse_siblings import fuse_sibling_branches, fuse_sibling_branches_sharing_dropout
from lora_fx.passes.insert_lora import insert_adapters
from lora_fx.passes.lean_dropout import lean_dropout
from lora_fx.passes.lower_adapted_reads import lower_adapted_reads
from lora_fx.passes.route_rows import route_rows
from lora_fx.passes.sdpa_gqa import sdpa_gqa
from lora_fx.passes.split_blocks import Unsplittable, split_blocks
from lora_fx.sites.experts import lower_fallback_reads
from lora_fx.state import BUILDING_KEY, META_KEY, Building, GraphState


class GraphPass(NamedTuple):
    """A pass of the pipeline: `run` rewrites the graph being built when `runs_when(building)` holds."""

    name: str
    run: Callable[[fx.GraphModule], PassResult]
    runs_when: Callable[[Building], bool] = lambda building: True


def _export_passes(gm: fx.GraphModule) -> PassResult:
    """The rewrites an exporter asked for (`GraphState.export_passes`), in order."""
    modified = False
    for graph_pass in gm.meta[BUILDING_KEY].state.export_passes:
        modified |= _run(GraphPass(graph_pass.__name__, graph_pass), gm).modified
    return PassResult(gm, modified=modified)


PIPELINE: list[GraphPass] = [
    GraphPass("autocast_ready", autocast_ready),
    GraphPass("lower_adapted_reads", lower_adapted_reads),
    # no gradient for frozen experts (see lora_fx.sites.experts)
    GraphPass("lower_fallback_reads", lower_fallback_reads, lambda building: bool(building.state.specs)),
    GraphPass("insert_lora", insert_adapters),
    GraphPass("fuse_siblings", fuse_sibling_branches, lambda building: building.state.siblings != "separate"),
    GraphPass("fuse_siblings_sharing_dropout", fuse_sibling_branches_sharing_dropout,
              lambda building: building.state.siblings == "fused_sharing_dropout"),
    GraphPass("route_rows", route_rows, lambda building: building.state.routed),          # lora_fx.mixed_batch
    GraphPass("export_passes", _export_passes, lambda building: bool(building.state.export_passes)),
    # training graphs: the same function with less to save for the backward, or faster GEMM layouts
    GraphPass("lean_dropout", lean_dropout, lambda building: building.training),
    GraphPass("expand_layout", expand_layout, lambda building: building.training),
    # grouped key/value heads read in place by SDPA, not repeated (in decoding: the whole cache every step)
    GraphPass("sdpa_gqa", sdpa_gqa),
    # last: every read of a quantized weight, LoRA's too
    GraphPass("dequantize_reads", dequantize_reads, lambda building: bool(building.state.quantized)),
]


def build(root: fx.GraphModule, plain: fx.Graph, state: GraphState, training: bool, mode: str) -> fx.Graph:
    """The graph of `state` for one mode. `root` holds every tensor the result reads (LoRA factors included);
    `training` picks the LoRA dropout and the training passes; `mode` names the mode in errors."""
    scratch = _scratch(root, copy_graph(plain))
    building = Building(state, training, mode)
    scratch.meta.update({META_KEY: state, BUILDING_KEY: building})
    for graph_pass in PIPELINE:
        if graph_pass.runs_when(building):
            _run(graph_pass, scratch)
    graph = scratch.graph
    graph.owning_module = None
    return graph


def _run(graph_pass: GraphPass, gm: fx.GraphModule) -> PassResult:
    try:
        return graph_pass.run(gm)
    except Exception as err:
        err.add_note(f"(in lora_fx graph pass {graph_pass.name!r}, building the {gm.meta[BUILDING_KEY].mode} graph)")
        raise


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
