"""What `targets="all-linear"` adapts on transformers-5 MoE models: what PEFT adapts.

transformers 5 fused the experts of some MoE families into 3-D parameters and made their routers modules of their own
(Mixtral's per-expert `w1`/`w3`/`w2` linears are `experts.gate_up_proj` and `experts.down_proj`; its router `gate`
is no longer an `nn.Linear`). PEFT 0.21 keeps what "all-linear" meant on transformers 4 (`_convert_peft_config_moe`
in peft/utils/transformers_weight_conversion.py). For a model whose type transformers converts like Mixtral's or
Qwen2-MoE's (`transformers.conversion_mapping`), PEFT

- resolves "all-linear" to the leaf names of the linear modules (the output layer left out), adds the
  transformers-4 names of the experts and the router, and turns those into `target_parameters`: `gate_up_proj`,
  `down_proj` and `gate.weight`;
- so drops those names from the module targets, also where they name other modules (a dense MLP's `gate_proj` in
  DeepSeek-V3's first layers, Qwen3-Next's `shared_expert.down_proj`), which PEFT then leaves out;
- gives the fused `gate_up_proj` rank 2r and alpha 2α (`rank_pattern` and `alpha_pattern` `.*\\.gate_up_proj`), so
  w1 and w3 each keep the scale α/r.

`resolved(gm, spec)` returns `spec` with that done where it applies ("all-linear" on such a model), else `spec`.
`apply` and `load_adapter` record the resolved spec, so saved adapters carry its targets and patterns and load in
PEFT as trained. PEFT refuses `lora_dropout` for parameters (its `ParamWrapper`), so a resolved spec with dropout is
refused too. The tables are the installed PEFT's, or PEFT 0.21's where PEFT is not installed.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

from lora_fx.errors import LoraSpecError
from lora_fx.match import LINEAR_MODULES
from lora_fx.spec import ALL_LINEAR, LoraSpec
from lora_fx.state import state_of

# PEFT 0.21's tables: transformers-4 leaf name -> transformers-5 parameter target; fused parameter -> its parts
PEFT_TARGETS = {"mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
                "qwen2_moe": {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                              "down_proj": "down_proj"}}
PEFT_FUSED = {"mixtral": {"gate_up_proj": ["w1", "w3"]}, "qwen2_moe": {"gate_up_proj": ["gate_proj", "up_proj"]}}


def resolved(gm, spec: LoraSpec) -> LoraSpec:
    """`spec` with "all-linear" resolved as PEFT resolves it on `gm`'s model (see the module docstring)."""
    tables = conversion(getattr(gm, "config", None)) if spec.targets == ALL_LINEAR else None
    if tables is None:
        return spec
    names, fused = tables
    state = state_of(gm)
    leaves = {fqn.rpartition(".")[2] for fqn, kind in state.module_kinds.items()
              if kind in LINEAR_MODULES and fqn not in state.output_layers}
    targets = sorted(leaves - set(names))
    parameters = list(dict.fromkeys([*(spec.target_parameters or ()), *names.values()]))
    ranks, alphas = dict(spec.rank_pattern or {}), dict(spec.alpha_pattern or {})
    for parameter, parts in fused.items():
        if len(parts) > 1:
            ranks[rf".*\.{re.escape(parameter)}"] = spec.rank * len(parts)
            alphas[rf".*\.{re.escape(parameter)}"] = spec.alpha * len(parts)
    if spec.dropout:
        raise LoraSpecError(
            f"on {state.model_class[0]}, 'all-linear' adapts the experts and the router as parameters "
            f"({', '.join(dict.fromkeys(names.values()))}), as PEFT resolves it for transformers-5 MoE models, and "
            f"PEFT refuses `lora_dropout` for parameters: pass dropout=0, or list the modules to adapt with dropout "
            f"(e.g. targets={targets[:4]})")
    return dataclasses.replace(spec, targets=targets or None, target_parameters=parameters, rank_pattern=ranks,
                               alpha_pattern=alphas)


def conversion(config) -> tuple[Mapping[str, str], Mapping[str, list[str]]] | None:
    """PEFT's (transformers-4 name -> parameter target, fused parameter -> parts) for the model type of `config`, or
    None where PEFT converts nothing (not a converted MoE type, or transformers 4)."""
    model_type = getattr(config, "model_type", None)
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN, get_checkpoint_conversion_mapping
    except ImportError:
        return None
    if model_type is None or get_checkpoint_conversion_mapping(model_type) is None:
        return None
    patterns, targets, fused = _peft_tables(_MODEL_TO_CONVERSION_PATTERN)
    base = patterns.get(model_type)
    if not targets.get(base) or not fused.get(base):
        return None
    return targets[base], fused[base]


def _peft_tables(transformers_patterns: Mapping[str, str]):
    """(model type -> conversion pattern, PEFT_TARGETS, PEFT_FUSED) as the installed PEFT has them."""
    try:
        from peft.utils import transformers_weight_conversion as peft_conversion
        return (peft_conversion._MODEL_TO_CONVERSION_PATTERN, peft_conversion._MOE_TARGET_MODULE_MAPPING,
                peft_conversion._MOE_FUSED_TARGETS)
    except (ImportError, AttributeError):
        return {**transformers_patterns, "mixtral": "mixtral"}, PEFT_TARGETS, PEFT_FUSED
