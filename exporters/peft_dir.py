"""PEFT adapter directories: `adapter_config.json` + `adapter_model.safetensors`, both ways.

A directory written by `save_adapter` loads with `peft.PeftModel.from_pretrained(model, path)`, and one written by
PEFT's `save_pretrained` loads with `load_adapter`. Keys are PEFT's on-disk names,
``base_model.model.<fqn>.lora_A.weight`` / ``...lora_B.weight`` (the adapter name is not part of them).

Loading is all-or-nothing: the config, every tensor's key and every shape are checked against the graph's sites
before anything is inserted, and all problems are reported in one error. Weights are read from safetensors only; a
pickle file (`adapter_model.bin`) is refused and never unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import fx

from lora_fx.apply import add_adapter, plan
from lora_fx.errors import AdapterError, LoraSpecError
from lora_fx.match import match, sites_by_fqn
from lora_fx.spec import LoraSpec
from lora_fx.state import LORA_A, LORA_B, factor_name, require_adapters, state_of
from lora_fx.version import __version__

CONFIG_FILE, WEIGHTS_FILE, PICKLE_FILE = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
# PeftConfig fields lora_fx does not implement: any truthy value among them makes a config unsupported
UNSUPPORTED_FIELDS = ("use_dora", "lora_bias", "modules_to_save", "target_parameters", "trainable_token_indices",
                      "layer_replication", "use_qalora", "alora_invocation_tokens", "use_bdlora", "megatron_config",
                      "arrow_config", "velora_config", "monteclora_config")


def peft_key(fqn: str, kind: str) -> str:
    """PEFT's on-disk key of a factor: `base_model.model.<fqn>.lora_A.weight`."""
    return f"{PEFT_PREFIX}{fqn}.{kind}.weight"


def save_adapter(gm: fx.GraphModule, path, adapter: str = "default") -> None:
    """Write `adapter` as a PEFT adapter directory at `path` (created if needed; files replaced atomically)."""
    state = state_of(gm)
    require_adapters(state, adapter)
    spec, fqns = state.specs[adapter], state.sites[adapter]
    sites = sites_by_fqn(gm)
    tensors = {peft_key(fqn, kind): gm.get_parameter(factor_name(fqn, kind, adapter)).detach().cpu().contiguous()
               for fqn in fqns for kind in (LORA_A, LORA_B)}
    class_name, class_module = state.model_class
    config = {
        "peft_type": "LORA", "task_type": None, "inference_mode": True, "base_model_name_or_path": None,
        "auto_mapping": {"base_model_class": class_name, "parent_library": class_module},
        "target_modules": sorted(fqns), "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
        "use_rslora": spec.use_rslora, "rank_pattern": dict(spec.rank_pattern or {}),
        "alpha_pattern": dict(spec.alpha_pattern or {}), "fan_in_fan_out": all(sites[f].fan_in_fan_out for f in fqns),
        "init_lora_weights": True if spec.init == "default" else spec.init, "bias": "none", "use_dora": False,
    }
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise AdapterError(f"cannot save adapter {adapter!r}: {str(directory)!r} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "lora_fx_version": __version__, "adapter": adapter}
    _write_atomically(directory / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata=metadata))
    _write_atomically(directory / CONFIG_FILE, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))


def _write_atomically(target: Path, write) -> None:
    temporary = str(target.with_name(f".{target.name}.{os.getpid()}.partial"))
    try:
        write(temporary)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def load_adapter(gm: fx.GraphModule, path, adapter: str | None = None) -> fx.GraphModule:
    """Add the PEFT adapter saved at `path` to `gm` as `adapter` (default "default"), active; returns `gm`."""
    state = state_of(gm)
    adapter = "default" if adapter is None else adapter
    if adapter in state.specs:
        raise AdapterError(f"adapter {adapter!r} already exists in this graph; pass another `adapter` name")
    spec, _, tensors = _read_checked(gm, path, adapter, lambda sites, spec: [])
    add_adapter(gm, spec, plan(gm, spec))           # plan lowers fused ops first where the adapter needs it
    with torch.no_grad():
        for fqn in state.sites[adapter]:
            for kind in (LORA_A, LORA_B):
                gm.get_parameter(factor_name(fqn, kind, adapter)).copy_(tensors[peft_key(fqn, kind)])
    return gm


def hotswap_adapter(gm: fx.GraphModule, path, adapter: str = "default") -> fx.GraphModule:
    """Load the PEFT adapter at `path` into the existing slot `adapter`, in place: no new nodes, parameters or
    shapes, so a `torch.compile`d graph does not recompile. The new adapter must adapt the slot's sites or a
    subset, each with rank <= the slot's; smaller ranks are zero-padded (exact), and its scale s' is folded into
    B as s'/s (the slot keeps its scale s); sites it does not adapt get zeros. Checked fully before writing."""
    state = state_of(gm)
    require_adapters(state, adapter)
    slot, slot_sites = state.specs[adapter], state.sites[adapter]

    def fits_the_slot(sites, spec) -> list[str]:
        return ([f"site {s.fqn!r} is not adapted by slot {adapter!r}; a hot swap adapts the slot's sites or a "
                 f"subset of them" for s in sites if s.fqn not in slot_sites]
                + [f"site {s.fqn!r} has rank {spec.rank_for(s.fqn)} > the slot's rank {slot.rank_for(s.fqn)}; "
                   f"apply the slot with a larger rank" for s in sites
                   if s.fqn in slot_sites and spec.rank_for(s.fqn) > slot.rank_for(s.fqn)])

    spec, sites, tensors = _read_checked(gm, path, adapter, fits_the_slot)
    new_sites = {site.fqn for site in sites}
    with torch.no_grad():
        for fqn in slot_sites:
            lora_A = gm.get_parameter(factor_name(fqn, LORA_A, adapter))
            lora_B = gm.get_parameter(factor_name(fqn, LORA_B, adapter))
            lora_A.zero_(), lora_B.zero_()
            if fqn in new_sites:
                rank = spec.rank_for(fqn)
                lora_A[:rank] = tensors[peft_key(fqn, LORA_A)]
                lora_B[:, :rank] = tensors[peft_key(fqn, LORA_B)] * (spec.scale_for(fqn) / slot.scale_for(fqn))
    return gm


def _read_checked(gm: fx.GraphModule, path, adapter: str, extra_checks):
    """(spec, sites, tensors) of the PEFT directory at `path`, every problem found before anything changes: the
    config, the files, the targets against `gm`, each tensor's key and shape, and `extra_checks(sites, spec)`."""
    directory = Path(path)
    if not directory.is_dir():
        raise AdapterError(f"adapter directory {str(directory)!r} does not exist or is not a directory")
    problems: list[str] = []
    spec = _spec_from_config(directory, adapter, problems)
    tensors = _read_tensors(directory, problems)
    sites = []
    if spec is not None:
        found = match(gm, spec, state_of(gm))
        problems += found.problems
        sites = found.sites + found.pending
        problems += extra_checks(sites, spec)
    if tensors is not None and sites:
        problems += _check_tensors(tensors, sites, spec)
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
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}; lora_fx loads only 'LORA' adapters")
    problems += [f"config field `{name}` = {config[name]!r} is not supported by lora_fx"
                 for name in UNSUPPORTED_FIELDS if config.get(name)]
    if config.get("bias", "none") != "none":
        problems.append(f"config field `bias` = {config['bias']!r} is not supported (only 'none')")
    targets = config.get("target_modules")
    if targets is None:
        problems.append("`target_modules` is null (PEFT's per-architecture defaults); lora_fx needs explicit targets")
        return None
    layers = config.get("layers_to_transform")
    try:
        return LoraSpec(targets=targets, rank=config.get("r", 8), alpha=config.get("lora_alpha", 8),
                        dropout=config.get("lora_dropout", 0.0), adapter=adapter,
                        exclude=config.get("exclude_modules"),
                        layers=layers if isinstance(targets, list) else None,   # PEFT ignores it for regex targets
                        rank_pattern=config.get("rank_pattern") or None,
                        alpha_pattern=config.get("alpha_pattern") or None,
                        use_rslora=config.get("use_rslora", False))
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


def _check_tensors(tensors: dict[str, torch.Tensor], sites, spec: LoraSpec) -> list[str]:
    expected = {}
    for site in sites:
        rank = spec.rank_for(site.fqn)
        expected[peft_key(site.fqn, LORA_A)] = (rank, site.in_features)
        expected[peft_key(site.fqn, LORA_B)] = (site.out_features, rank)
    problems = [f"missing tensor {key!r}" for key in expected if key not in tensors]
    problems += [f"unexpected tensor {key!r} (no matching site)" for key in tensors if key not in expected]
    problems += [f"tensor {key!r} has shape {tuple(tensors[key].shape)}, expected {shape}"
                 for key, shape in expected.items() if key in tensors and tuple(tensors[key].shape) != shape]
    problems += [f"tensor {key!r} is {tensor.dtype}, not a floating-point tensor"
                 for key, tensor in tensors.items() if key in expected and not tensor.is_floating_point()]
    return problems
