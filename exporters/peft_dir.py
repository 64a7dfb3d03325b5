"""PEFT adapter directories: `adapter_config.json` + `adapter_model.safetensors`, both ways.

A directory written by `save_adapter` loads with `peft.PeftModel.from_pretrained(model, path)`, and one written by
PEFT's `save_pretrained` loads with `load_adapter`. Keys are PEFT's on-disk names,
``base_model.model.<fqn>.lora_A.weight`` / ``...lora_B.weight`` (the adapter name is not part of them), and for DoRA
``base_model.model.<fqn>.lora_magnitude_vector``. A graph with a quantized base saves a plain adapter (QLoRA's).

Saving replaces config and weights as one unit: the directory is staged beside the target (other files in it are
carried over as hard links) and swapped in with one rename, so a crash midway leaves the previous adapter whole;
nothing is ever written through a symbolic link. The saved targets are the exact module names (a regex when a name
is also a dotted suffix of another module's), so they reload as exactly those modules.

Loading is all-or-nothing: the config, every tensor's key, shape and finiteness are checked against the graph's
sites before anything is inserted, and all problems are reported in one error. Weights are read from safetensors
only; a pickle file (`adapter_model.bin`) is refused and never unpickled.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import fx

from lora_fx.adapters import adapter_weights
from lora_fx.apply import plan
from lora_fx.atomic_directory import write_directory
from lora_fx.commit import commit, write_tensors
from lora_fx.distributed import (agree, all_ranks_or_none, full, is_sharded, refuse_if_sharded,
                                 require_process_group, shard_like, writer)
from lora_fx.errors import AdapterError, LoraSpecError
from lora_fx.match import match, selected_as_parameter
from lora_fx.moe_all_linear import resolved
from lora_fx.quantize import dense
from lora_fx.sites import PEFT_PREFIX, kind_of, tensor_names, variant_of
from lora_fx.spec import LoraSpec, adapter_name_problem
from lora_fx.state import is_lora_state_name, require_adapters, state_of
from lora_fx.version import __version__

CONFIG_FILE, WEIGHTS_FILE, PICKLE_FILE = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
# PeftConfig fields lora_fx does not implement: any truthy value among them makes a config unsupported
UNSUPPORTED_FIELDS = ("lora_bias", "modules_to_save", "trainable_token_indices", "layer_replication",
                      "use_qalora", "alora_invocation_tokens", "use_bdlora", "megatron_config", "arrow_config",
                      "velora_config", "monteclora_config")


def save_adapter(gm: fx.GraphModule, path, adapter: str = "default") -> None:
    """Write `adapter` as a PEFT adapter directory at `path` (created if needed; replaced as one unit)."""
    state = state_of(gm)
    require_adapters(state, adapter)
    require_process_group(gm, "save_adapter")
    sharded = is_sharded(gm)
    writes = writer(sharded)
    spec, keys = state.specs[adapter], state.sites[adapter]
    sites = [state.site_info[key] for key in keys]
    as_parameter = {site.key for site in sites if kind_of(site).selected_by == "parameters"
                    or selected_as_parameter(spec, site.fqn)}          # saved as PEFT's `target_parameters`
    modules = [site.fqn for site in sites if site.key not in as_parameter]
    parameters = [site.weight for site in sites if site.key in as_parameter]
    tensors = {}
    for key, (lora_A, lora_B, _) in adapter_weights(gm, adapter).items():
        site = state.site_info[key]
        saved = dict(zip(kind_of(site).peft_keys(site), (lora_A, lora_B))) | variant_of(spec).saved(gm, site, adapter)
        tensors.update({saved_key: full(tensor).cpu().contiguous()                           # gathered if sharded
                        for saved_key, tensor in saved.items()})
    class_name, class_module = state.model_class
    config = {
        "peft_type": "LORA", "task_type": None, "inference_mode": True, "base_model_name_or_path": None,
        "auto_mapping": {"base_model_class": class_name, "parent_library": class_module},
        "target_modules": exact_targets(gm, modules) if modules else [],
        "target_parameters": sorted(parameters) or None, "r": spec.rank, "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout, "use_rslora": spec.use_rslora, "rank_pattern": dict(spec.rank_pattern or {}),
        "alpha_pattern": dict(spec.alpha_pattern or {}),
        "fan_in_fan_out": bool(sites) and all(site.fan_in_fan_out for site in sites),
        "init_lora_weights": True if spec.init == "default" else spec.init, "bias": "none",
        "use_dora": spec.use_dora,
    }
    metadata = {"format": "pt", "lora_fx_version": __version__, "adapter": adapter}
    files = {WEIGHTS_FILE: lambda p: save_file(tensors, p, metadata=metadata),
             CONFIG_FILE: lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n")}
    if sharded:
        agree(lambda: write_directory(Path(path), files) if writes else None)
    else:
        write_directory(Path(path), files)


def exact_targets(gm: fx.GraphModule, fqns) -> list[str] | str:
    """`fqns` as PEFT `target_modules` that select exactly them: the list of names, unless one is also a dotted suffix
    of another module's name (PEFT would select that one too); then a regex full-matching exactly `fqns`."""
    modules = [name for name, _ in gm.named_modules() if name and not is_lora_state_name(name)]
    if any(other != fqn and other.endswith("." + fqn) for fqn in fqns for other in modules):
        return "|".join(re.escape(fqn) for fqn in sorted(fqns))
    return sorted(fqns)


def load_adapter(gm: fx.GraphModule, path, adapter: str | None = None) -> fx.GraphModule:
    """Add the PEFT adapter saved at `path` to `gm` as `adapter` (default "default"), active; returns `gm`."""
    state = state_of(gm)
    adapter = "default" if adapter is None else adapter
    refuse_if_sharded(gm, "load_adapter", "load adapters before sharding; a sharded model takes new weights with "
                                          "hotswap_adapter into an existing slot")
    if problem := adapter_name_problem(adapter):
        raise LoraSpecError(problem)
    if adapter in state.specs:
        raise AdapterError(f"adapter {adapter!r} already exists in this graph; pass another `adapter` name")
    spec, sites, tensors = _read_checked(gm, path, adapter, lambda sites, spec: [])
    initial = {site.key: tuple(tensors[key] for key in _saved_keys(site, spec)) for site in sites}
    commit(gm, plan(gm, spec, initial))           # plan lowers fused ops where the adapter needs it
    return gm


def hotswap_adapter(gm: fx.GraphModule, path, adapter: str = "default") -> fx.GraphModule:
    """Load the PEFT adapter at `path` into the existing slot `adapter`, in place: no new nodes, parameters or
    shapes, so a `torch.compile`d graph does not recompile. The new adapter must adapt the slot's sites or a
    subset, each with rank <= the slot's; smaller ranks are zero-padded (exact), and its scale s' is folded into
    B as s'/s (the slot keeps its scale s); sites it does not adapt get zeros. A DoRA slot takes DoRA adapters
    only (and a LoRA slot LoRA ones): their magnitude vectors are written too (m = ‖W‖ where the adapter has no
    site, so it adds nothing there). Checked fully before writing, and written whole or not at all; on a sharded
    model every rank checks its file first, and none writes unless all can."""
    require_process_group(gm, "hotswap_adapter")
    checked = all_ranks_or_none(lambda: _checked(gm, path, adapter, _fits_the_slot), is_sharded(gm))
    write_tensors(_slot_writes(gm, adapter, *checked))
    return gm


def restore_adapters(gm: fx.GraphModule, directory) -> fx.GraphModule:
    """Load a checkpoint of `gm`'s adapters back into them, in place: the layout `gm.save_pretrained(directory)`
    writes ("default" in `directory`, any other adapter in `directory/<name>`). Each saved adapter must have exactly
    its adapter's layout (the same sites, ranks, scales and DoRA), so that training resumes where the checkpoint
    was taken. Every adapter is checked before any is written, and all are written or none."""
    state = state_of(gm)
    require_process_group(gm, "restore_adapters")
    checked = all_ranks_or_none(lambda: {name: _checked(gm, Path(directory) if name == "default" else
                                                        Path(directory) / name, name, _same_layout)
                                         for name in state.specs}, is_sharded(gm))
    write_tensors([write for name, found in checked.items() for write in _slot_writes(gm, name, *found)])
    return gm


def _fits_the_slot(adapter: str, slot: LoraSpec, slot_sites) -> Callable:
    """The check `hotswap_adapter` makes: the slot's sites or a subset, ranks that fit, LoRA into LoRA, DoRA into
    DoRA."""
    def check(sites, spec) -> list[str]:
        if spec.use_dora != slot.use_dora:
            what = lambda is_dora: "a DoRA adapter (use_dora=True)" if is_dora else "a LoRA adapter (use_dora=False)"
            return [f"the file holds {what(spec.use_dora)} but slot {adapter!r} is {what(slot.use_dora)}, at "
                    f"modules {sorted(s.fqn for s in sites)}; load it as a new adapter with load_adapter instead"]
        return ([f"site {s.fqn!r} is not adapted by slot {adapter!r}; a hot swap adapts the slot's sites or a "
                 f"subset of them" for s in sites if s.key not in slot_sites]
                + [f"site {s.key!r} has rank {spec.rank_for(s.key)} > the slot's rank {slot.rank_for(s.key)}; "
                   f"apply the slot with a larger rank" for s in sites
                   if s.key in slot_sites and spec.rank_for(s.key) > slot.rank_for(s.key)])
    return check


def _same_layout(adapter: str, slot: LoraSpec, slot_sites) -> Callable:
    """The check `restore_adapters` makes: exactly the adapter's sites, ranks, scales and DoRA."""
    def check(sites, spec) -> list[str]:
        keys = [site.key for site in sites]
        missing, extra = [k for k in slot_sites if k not in keys], [k for k in keys if k not in slot_sites]
        problems = []
        if extra:
            problems.append(f"it adapts {_some(extra)}, which adapter {adapter!r} does not adapt")
        if missing:
            problems.append(f"it does not adapt {_some(missing)}, which adapter {adapter!r} adapts")
        common = [k for k in keys if k in slot_sites]
        problems += [f"site {k!r} has rank {spec.rank_for(k)} there and {slot.rank_for(k)} here"
                     for k in common if spec.rank_for(k) != slot.rank_for(k)]
        problems += [f"site {k!r} has scale {spec.scale_for(k):g} there and {slot.scale_for(k):g} here (alpha or "
                     f"use_rslora differ)" for k in common if spec.scale_for(k) != slot.scale_for(k)]
        if spec.use_dora != slot.use_dora:
            problems.append(f"use_dora is {spec.use_dora} there and {slot.use_dora} here")
        return problems
    return check


def _some(names: list[str], limit: int = 3) -> str:
    return ", ".join(map(repr, names[:limit])) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _checked(gm: fx.GraphModule, path, adapter: str, checks):
    """(spec, sites, tensors) of the PEFT adapter at `path`, for the existing adapter `adapter`, after
    `checks(adapter, slot spec, slot sites)(sites, spec)` found no problem (no collective: safe to run where another
    rank may fail)."""
    state = state_of(gm)
    require_adapters(state, adapter)
    slot, slot_sites = state.specs[adapter], state.sites[adapter]
    return _read_checked(gm, path, adapter, checks(adapter, slot, slot_sites))


def _slot_writes(gm: fx.GraphModule, adapter: str, spec: LoraSpec, sites, tensors: dict) -> list:
    """(tensor, value) writes that put a checked adapter (see `_checked`) into the existing adapter `adapter`: every
    slot site gets the saved factors (zero-padded to the slot's rank, B scaled by s'/s) or zeros where the file has
    none (collective on a sharded model: DoRA magnitudes read whole weights)."""
    state = state_of(gm)
    slot, slot_sites = state.specs[adapter], state.sites[adapter]
    new_sites = {site.key: site for site in sites}
    writes = []
    for key in slot_sites:
        site = state.site_info[key]
        name_A, name_B, _ = tensor_names(site, adapter)
        lora_A, lora_B = gm.get_parameter(name_A), gm.get_parameter(name_B)
        padded_A, padded_B = (torch.zeros(p.shape, dtype=p.dtype) for p in (lora_A, lora_B))
        if key in new_sites:
            key_A, key_B = kind_of(site).peft_keys(site)
            padded_A, padded_B = (padded.to(p.dtype) for padded, p in zip(kind_of(site).padded(
                site, tensors[key_A], tensors[key_B] * (spec.scale_for(key) / slot.scale_for(key)),
                slot.rank_for(key)), (lora_A, lora_B)))
        writes += [(lora_A, shard_like(lora_A, padded_A)), (lora_B, shard_like(lora_B, padded_B))]    # per rank
        variant = variant_of(slot)
        if variant.tensor_names(site, adapter):    # s·B·A is unchanged by the folding above: DoRA's m carries over
            saved = tuple(tensors[saved_key] for saved_key in variant.peft_shapes(site)) if key in new_sites else ()
            own = variant.new_tensors(site, adapter, dense(full(gm.get_parameter(site.weight))).cpu(), padded_A,
                                      padded_B, slot.scale_for(key), saved)
            writes += [(gm.get_parameter(name), shard_like(gm.get_parameter(name), value))
                       for name, value in own.items()]
    return writes


def _read_checked(gm: fx.GraphModule, path, adapter: str, extra_checks):
    """(spec, sites, tensors) of the PEFT directory at `path`, every problem found before anything changes: the
    config, the files, the targets against `gm`, each tensor's key, shape and values, and
    `extra_checks(sites, spec)`."""
    directory = Path(path)
    if not directory.is_dir():
        raise AdapterError(f"adapter directory {str(directory)!r} does not exist or is not a directory")
    problems: list[str] = []
    spec = _spec_from_config(directory, adapter, problems)
    tensors = _read_tensors(directory, problems)
    sites = []
    if spec is not None:
        spec = resolved(gm, spec)                 # "all-linear" in a config: resolved as PEFT resolves it
        found = match(gm, spec, state_of(gm))
        problems += found.problems
        sites = found.sites + found.pending
        problems += extra_checks(sites, spec)
    if tensors is not None and sites:
        problems += _check_tensors(gm, tensors, sites, spec)
    if problems:
        raise AdapterError(f"cannot load the adapter at {str(directory)!r} as {adapter!r}; nothing was changed:\n"
                           f"  - " + "\n  - ".join(problems))
    return spec, sites, tensors


def _spec_from_config(directory: Path, adapter: str, problems: list[str]) -> LoraSpec | None:
    config_path = directory / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        problems.append(f"{CONFIG_FILE} is missing")
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        problems.append(f"{CONFIG_FILE} is not valid JSON ({err})")
        return None
    if not isinstance(config, dict):
        problems.append(f"{CONFIG_FILE} must hold a JSON object (a PEFT LoraConfig), got a JSON "
                        f"{type(config).__name__}")
        return None
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}; lora_fx loads only 'LORA' adapters")
    problems += [f"config field `{name}` = {config[name]!r} is not supported by lora_fx"
                 for name in UNSUPPORTED_FIELDS if config.get(name)]
    if config.get("bias", "none") != "none":
        problems.append(f"config field `bias` = {config['bias']!r} is not supported (only 'none')")
    targets, parameters = config.get("target_modules"), config.get("target_parameters") or None
    if targets is None and parameters is None:
        problems.append("`target_modules` is null (PEFT's per-architecture defaults); lora_fx needs explicit targets")
        return None
    if targets == [] or targets is None:
        targets = None                          # PEFT: only `target_parameters`
    layers = config.get("layers_to_transform")
    try:
        return LoraSpec(targets=targets, target_parameters=parameters, rank=config.get("r", 8),
                        alpha=config.get("lora_alpha", 8),
                        dropout=config.get("lora_dropout", 0.0), adapter=adapter,
                        exclude=config.get("exclude_modules"),
                        layers=layers if isinstance(targets, list) else None,   # PEFT ignores it for regex targets
                        rank_pattern=config.get("rank_pattern") or None,
                        alpha_pattern=config.get("alpha_pattern") or None,
                        use_rslora=config.get("use_rslora", False), use_dora=config.get("use_dora") or False)
    except LoraSpecError as err:
        problems.append(f"{CONFIG_FILE} does not describe a valid LoraSpec: {err}")
        return None


def _read_tensors(directory: Path, problems: list[str]) -> dict[str, torch.Tensor] | None:
    weights = directory / WEIGHTS_FILE
    if not weights.exists():
        if (directory / PICKLE_FILE).exists():
            problems.append(f"only {PICKLE_FILE} (a pickle) is present, and lora_fx never unpickles files: convert "
                            f"it once with `lora-fx convert {directory}` (torch.load with weights_only=True) if "
                            f"you trust it")
        else:
            problems.append(f"{WEIGHTS_FILE} is missing")
        return None
    try:
        with safe_open(str(weights), framework="pt") as reader:
            return {key: reader.get_tensor(key) for key in reader.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        problems.append(f"{WEIGHTS_FILE} cannot be read ({err}); is it truncated?")
        return None


def _saved_keys(site, spec: LoraSpec) -> tuple[str, ...]:
    """The keys of one site's tensors in a PEFT file: its factors, and its variant's own (DoRA's magnitude)."""
    return kind_of(site).peft_keys(site) + tuple(variant_of(spec).peft_shapes(site))


def _check_tensors(gm: fx.GraphModule, tensors: dict[str, torch.Tensor], sites, spec: LoraSpec) -> list[str]:
    expected = {}
    for site in sites:
        kind = kind_of(site)
        expected.update(zip(kind.peft_keys(site), kind.factor_shapes(site, spec.rank_for(site.key))))
        expected.update(variant_of(spec).peft_shapes(site))
    problems = _check_saved_embeddings(gm, tensors, sites)
    problems += [f"missing tensor {key!r}" for key in expected if key not in tensors]
    problems += [f"unexpected tensor {key!r} (no matching site)" for key in tensors if key not in expected]
    problems += [f"tensor {key!r} has shape {tuple(tensors[key].shape)}, expected {shape}"
                 for key, shape in expected.items() if key in tensors and tuple(tensors[key].shape) != shape]
    floating = {key: tensor for key, tensor in tensors.items() if key in expected and tensor.is_floating_point()}
    problems += [f"tensor {key!r} is {tensor.dtype}, not a floating-point tensor"
                 for key, tensor in tensors.items() if key in expected and key not in floating]
    problems += [f"tensor {key!r} holds NaN or Inf" for key, tensor in floating.items()
                 if not torch.isfinite(tensor).all()]
    return problems


def _check_saved_embeddings(gm: fx.GraphModule, tensors: dict[str, torch.Tensor], sites) -> list[str]:
    """PEFT saves a targeted embedding's base table too (`save_embedding_layers`, for resized vocabularies) as
    `<fqn>.base_layer.weight`. Unchanged, it is dropped from `tensors`; changed, it is a problem: lora_fx never
    replaces a base weight."""
    problems = []
    for site in sites:
        if site.kind != "embedding":
            continue
        key = f"{PEFT_PREFIX}{site.fqn}.base_layer.weight"
        saved = tensors.pop(key, None)
        base = gm.get_parameter(site.weight)
        if saved is not None and not (saved.shape == base.shape and torch.equal(saved.to(base), base.detach())):
            problems.append(f"tensor {key!r} is a changed copy of the embedding table {site.weight!r} (PEFT's "
                            f"save_embedding_layers); lora_fx never replaces base weights: load it into the model "
                            f"before capturing")
    return problems
