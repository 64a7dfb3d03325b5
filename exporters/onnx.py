"""ONNX export: merged weights with zero extra nodes, or unmerged with adapters that swap at run time in ORT.

Both go through the dynamo exporter (`torch.onnx.export(..., dynamo=True)`) on the example inputs recorded at
capture; every dim that was dynamic at capture stays symbolic, and inputs and outputs keep the model's names
(`input_ids`, `logits`). Custom ops lora_fx puts in graphs (the Mamba2 fused op) are exported through registered
decompositions into plain torch ops, hence standard ONNX ops. After writing, the file is run once in onnxruntime
(CPU) and compared with torch, so a silently wrong file is never left behind.

Unmerged graphs carry one LoRA *slot* per site: the union of all adapters' sites, each of rank R = the largest rank
among the graph's adapters. Slot weights are graph inputs with initializer defaults (the active adapter), named by
PEFT's key (`base_model.model.<fqn>.lora_A.weight`), so constant folding neither folds nor renames them; the scale
is folded into B. An adapter of smaller rank is zero-padded to R (zero rows of A and columns of B are exact), and a
site it does not adapt gets zeros, so any of the graph's adapters fits the same session.

A quantized base (`lora_fx.quantize_base`) is exported dequantized, merged or not (not yet under mixed_batch).
DoRA adapters export merged only.
A mixed-batch graph (`lora_fx.mixed_batch`) exports as it runs, whatever `merged` says: `adapter_ids` is an input
beside the model's own, its dim 0 the batch's, and every row goes through its adapter in one onnxruntime run (the
routing ops export as Gather, MatMul and Where). Values are not range-checked in the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult
from torch.utils import _pytree as pytree

from lora_fx.adapters import adapter_weights
from lora_fx.apply import adapter_tensors
from lora_fx.commit import Change, commit
from lora_fx.derived.merge import merge, without_adapters
from lora_fx.derived.mixed_batch import example_adapter_ids, is_mixed, routed_copy
from lora_fx.errors import ExportError
from lora_fx.ops import EXPORT_DECOMPOSITIONS
from lora_fx.quantize import dense
from lora_fx.spec import LoraSpec
from lora_fx.sites import Site, kind_of, tensor_names, variant_of
from lora_fx.state import require_adapters, state_of, tag_of
from lora_fx.trace import dynamic_shapes_for

SLOT = "onnx_slot"


def decompose_custom_ops(gm: fx.GraphModule) -> PassResult:
    """Swap each registered custom op node for its decomposition into plain torch ops."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in EXPORT_DECOMPOSITIONS]
    for node in nodes:
        node.target = EXPORT_DECOMPOSITIONS[node.target]
    gm.graph.lint()
    return PassResult(gm, modified=bool(nodes))


def slot_branches(gm: fx.GraphModule) -> PassResult:
    """Branches read their factors directly and are not scaled: a slot's B carries the scale, and a slot is always
    on (the adapter file decides what it holds)."""
    graph = gm.graph
    roles = {"scale_mul": 0, "mask_A": 1, "mask_B": 1}     # node role -> the argument that replaces it
    for node in [n for n in graph.nodes if tag_of(n).get("role") in roles]:
        node.replace_all_uses_with(node.args[roles[tag_of(node)["role"]]])
        graph.erase_node(node)
    for node in [n for n in reversed(graph.nodes) if tag_of(n).get("role") in ("active", "scale_value", "scale")]:
        graph.erase_node(node)
    graph.lint()
    return PassResult(gm, modified=True)


def with_export_passes(module: fx.GraphModule, *passes) -> fx.GraphModule:
    """`module` (an export's own copy) with `passes` run on every graph it builds (`GraphState.export_passes`)."""
    state = state_of(module)
    commit(module, Change(state.evolve(export_passes=state.export_passes + passes)))
    return module


def export_onnx(gm: fx.GraphModule, path, merged: bool = True, *, generation: bool = False, verify: bool = True,
                atol: float = 1e-4, rtol: float = 1e-3) -> Path:
    """Write `gm` (its active adapters) to `path` as ONNX; see the module docstring. Returns the path. With
    `generation=True`, `path` is a directory for onnxruntime-genai: a decoder with a KV cache and its
    `genai_config.json` (see `lora_fx.exporters.onnx_genai`)."""
    state = state_of(gm)
    if state.tracer != "export":
        raise ExportError("ONNX export needs the example inputs of a torch.export capture: capture the model with "
                          "example_args/example_kwargs")
    if not isinstance(generation, bool):
        raise TypeError(f"generation must be True or False, got {generation!r}")
    if generation:
        from lora_fx.exporters.onnx_genai import export_generation
        return export_generation(gm, path, merged, verify, atol, rtol)
    target = _writable(path)
    mixed = is_mixed(gm)            # exported as it runs: rows routed by an `adapter_ids` input (see mixed_batch)
    if mixed and state.quantized:
        raise ExportError("a mixed-batch graph over a quantized base cannot be exported yet: export the mixed-batch "
                          "graph of the full-precision model (the routing exports; the torchao weights do not)")
    module = routed_copy(gm) if mixed else merge(gm) if merged else unmerged_view(gm)
    module.eval()
    with_export_passes(module, decompose_custom_ops)
    args, kwargs = state.example_args, {**state.example_kwargs, **(example_adapter_ids(gm) if mixed else {})}
    with torch.no_grad():
        expected = module(*args, **kwargs)
    program = onnx_program(gm, module, slots=not (merged or mixed), args=args, kwargs=kwargs,
                           dynamic_shapes=dynamic_shapes_for(module.forward, args, kwargs) if state.dynamic else None,
                           output_names=_output_names(expected))
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".lora_fx-export-") as scratch:
        staged = Path(scratch) / target.name
        program.save(str(staged))
        if verify:
            _verify(staged, args, kwargs, expected, atol, rtol)
        for produced in Path(scratch).iterdir():
            os.replace(produced, target.parent / produced.name)
    return target


def export_onnx_adapter(gm: fx.GraphModule, path, adapter: str) -> Path:
    """Write `adapter` as an onnxruntime adapter file (`.onnx_adapter`) that fits `export_onnx(gm, merged=False)`."""
    import onnxruntime as ort

    require_adapters(state_of(gm), adapter)
    target = _writable(path)
    parameters = {name: ort.OrtValue.ortvalue_from_numpy(_numpy(tensor))
                  for name, tensor in slot_weights(gm, adapter).items()}
    adapter_format = ort.AdapterFormat()
    adapter_format.set_adapter_version(1)
    adapter_format.set_model_version(1)
    adapter_format.set_parameters(parameters)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".lora_fx-export-") as scratch:
        staged = Path(scratch) / target.name
        adapter_format.export_adapter(str(staged))
        os.replace(staged, target)
    return target


def slot_layout(gm: fx.GraphModule) -> tuple[list[Site], int]:
    """(the sites of the unmerged export: every site any adapter adapts; the slot rank R, the largest rank)."""
    state = state_of(gm)
    if not state.specs:
        raise ExportError("this graph has no adapter, so there is nothing to keep unmerged: use merged=True")
    unstackable = [name for name, spec in state.specs.items() if variant_of(spec).unstackable]
    if unstackable:
        raise ExportError(f"{variant_of(state.specs[unstackable[0]]).name} adapters {unstackable} have no unmerged "
                          f"ONNX form (a slot holds LoRA factors only): export merged (merged=True), or delete them "
                          f"first")
    rank = max(spec.rank_for(key) for adapter, spec in state.specs.items() for key in state.sites[adapter])
    return state.adapted_sites(), rank


def slot_weights(gm: fx.GraphModule, adapter: str | None) -> dict[str, torch.Tensor]:
    """{PEFT key: tensor} filling every slot with `adapter` (A zero-padded to rank R, s·B likewise); zeros for sites
    it does not adapt, or everywhere when `adapter` is None."""
    sites, rank = slot_layout(gm)
    own = {} if adapter is None else adapter_weights(gm, adapter)
    weights = {}
    for site in sites:
        kind = kind_of(site)
        dtype = gm.get_parameter(site.weight).dtype
        if site.key in own:
            own_A, own_B, scale = own[site.key]
            lora_A, lora_B = (f.to(dtype) for f in kind.padded(site, own_A.cpu(), own_B.cpu() * scale, rank))
        else:
            lora_A, lora_B = (torch.zeros(shape, dtype=dtype) for shape in kind.factor_shapes(site, rank))
        weights.update(zip(kind.peft_keys(site), (lora_A, lora_B)))
    return weights


def unmerged_view(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` whose LoRA is one scale-free slot per site, filled with the active adapter (or zeros)."""
    state = state_of(gm)
    sites, rank = slot_layout(gm)
    if len(state.active) > 1:
        raise ExportError(f"an unmerged export holds one adapter at a time, but {list(state.active)} are active: "
                          f"set_active one, or combine them with add_weighted_adapter first")
    weights = slot_weights(gm, state.active[0] if state.active else None)
    view = without_adapters(gm, {name: dense(gm.get_parameter(name)) for name in state.quantized})
    spec = LoraSpec(targets="|".join(re.escape(site.fqn) for site in sites), rank=rank, alpha=float(rank),
                    adapter=SLOT)                    # scale alpha/r = 1: the slot's B carries the scale
    tensors = {}
    for site in sites:
        initial = tuple(weights[key] for key in kind_of(site).peft_keys(site))
        tensors.update(adapter_tensors(view, site, spec, initial))
    commit(view, Change(state_of(view).with_adapter(spec, sites, activate=True), add=tensors))
    return with_export_passes(view, slot_branches)


def onnx_program(gm: fx.GraphModule, exportable, slots: bool, **options):
    """torch.onnx's optimized program of `exportable` (a module or an ExportedProgram); with `slots`, the adapter
    factors of `gm` are overridable graph inputs (see `_expose_slot_weights`)."""
    with _known_exporter_noise():
        program = torch.onnx.export(exportable, dynamo=True, optimize=False, verbose=False, **options)
        if slots:
            _expose_slot_weights(gm, program.model.graph)
        program.optimize()
    return program


def _expose_slot_weights(gm: fx.GraphModule, graph) -> None:
    """Rename the slot initializers to PEFT keys and make them graph inputs (overridable, never folded)."""
    keys = {}
    for site in slot_layout(gm)[0]:
        keys.update(zip(tensor_names(site, SLOT)[:2], kind_of(site).peft_keys(site)))
    for name, value in list(graph.initializers.items()):
        if name in keys:
            graph.initializers.pop(name)
            value.name = keys[name]
            graph.initializers[value.name] = value
            graph.inputs.append(value)


@contextlib.contextmanager
def _known_exporter_noise():
    """Silence what the exporter prints on every export that is harmless and not the user's to act on: torchvision
    notices while torch builds its op registry, a deprecation inside `run_decompositions`, and onnx_ir's warning
    per overridable LoRA input (intended: they are inputs so that adapters can be swapped)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx._internal.exporter._registration",
                                                    "onnx_ir.passes.common.initializer_deduplication")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _writable(path) -> Path:
    target = Path(path)
    if target.is_dir():
        raise ExportError(f"cannot write {str(target)!r}: it is a directory")
    if not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
        raise ExportError(f"cannot write {str(target)!r}: {str(target.parent)!r} is not a writable directory")
    return target


def _output_names(output) -> list[str]:
    """Names of the flattened outputs: `logits` for a ModelOutput field, `output_0` for a tuple element."""
    leaves, _ = pytree.tree_flatten_with_path(output)
    names = []
    for index, (path, _) in enumerate(leaves):
        name = "_".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", "")))) for key in path)
        names.append(name if name and not name[0].isdigit() else f"output_{name or index}")
    return names


def _numpy(tensor: torch.Tensor):
    if tensor.dtype not in (torch.float32, torch.float16, torch.float64):
        raise ExportError(f"onnxruntime adapters need float32/float16 weights, got {tensor.dtype}")
    return tensor.detach().cpu().contiguous().numpy()


def _verify(model_path: Path, args: tuple, kwargs: dict, expected, atol: float, rtol: float) -> None:
    """Run the file in onnxruntime on the example inputs; raise if any output differs from torch."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3          # overridable initializers are intended: no warning per LoRA input
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    inputs = [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
    feed = {spec.name: x.detach().cpu().numpy() for spec, x in zip(session.get_inputs(), inputs)}
    outputs = session.run(None, feed)
    for index, (got, want) in enumerate(zip(outputs, pytree.tree_leaves(expected))):
        want = want.detach().cpu().numpy()
        difference = np.abs(got - want).max()
        if not np.allclose(got, want, atol=atol, rtol=rtol):
            raise ExportError(f"onnxruntime output {index} differs from torch by up to {difference:.3g} (atol={atol}, "
                              f"rtol={rtol}); the file was not written. Pass verify=False to skip this check")
