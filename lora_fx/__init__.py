"""lora_fx: LoRA as a graph-rewriting compiler pass.

    gm = lora_fx.apply(model, LoraSpec(targets="all-linear", rank=8), example_args=(ids,))

The data flow: `capture` traces the model (`trace`, `programs`) into a `LoraGraphModule` (`graph_module`) whose
graph cache (`graph_cache`) holds one plain capture per mode, program and shape variant; `apply` matches the spec's
sites once (`match`, `sites/`) and commits a new immutable `GraphState` (`state`, `commit`), from which `build`
derives every cached graph through the pass pipeline (`passes/`). Controls (`adapters`, `combine`, `distributed`)
change the state the same way; `derived/` makes new graph modules from one (merge, quantize_base, mixed_batch);
`exporters/` writes PEFT directories and ONNX; `generation/` decodes with a KV cache; `ops/` holds the custom ops;
`integrations/` fits transformers' Trainer and TRL.
"""

from lora_fx import distributed, ops
from lora_fx.adapters import (active_adapters, adapter_weights, adapters, blocks, delete_adapter, disabled,
                              magnitude_vectors, set_active)
from lora_fx.apply import apply, checkpoint, dropout_masks, fuse_siblings
from lora_fx.capture import capture
from lora_fx.combine import add_weighted_adapter
from lora_fx.derived.merge import merge
from lora_fx.derived.mixed_batch import mixed_batch
from lora_fx.derived.quantize_base import quantize_base
from lora_fx.distributed import shard
from lora_fx.errors import (AdapterError, CallError, CaptureError, CaptureWarning, ExportError, LoraSpecError,
                            QuantizeError, TargetError)
from lora_fx.exporters.onnx import export_onnx, export_onnx_adapter
from lora_fx.exporters.peft_dir import hotswap_adapter, load_adapter, save_adapter
from lora_fx.graph_module import LoraGraphModule
from lora_fx.match import Lowering, register_lowering
from lora_fx.passes import lower_mamba2  # noqa: F401  (registers the Mamba2 fused-op lowering)
from lora_fx.sites import LinearForm, Site, SiteKind, register_linear_op, register_site_kind
from lora_fx.spec import LoraSpec
from lora_fx.version import __version__

__all__ = [
    "AdapterError", "CallError", "CaptureError", "CaptureWarning", "ExportError", "LinearForm", "LoraGraphModule",
    "LoraSpec",
    "LoraSpecError", "Lowering", "QuantizeError", "Site", "SiteKind", "TargetError", "__version__",
    "active_adapters", "adapter_weights", "blocks",
    "adapters", "add_weighted_adapter", "apply", "capture", "checkpoint",
    "delete_adapter", "disabled", "distributed", "dropout_masks", "export_onnx", "export_onnx_adapter", "fuse_siblings",
    "hotswap_adapter", "load_adapter", "magnitude_vectors", "merge", "mixed_batch", "ops", "quantize_base",
    "register_linear_op", "register_lowering", "register_site_kind", "save_adapter", "set_active", "shard",
]
