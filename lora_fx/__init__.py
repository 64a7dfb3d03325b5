"""lora_fx: LoRA as a graph-rewriting compiler pass.

    gm = lora_fx.apply(model, LoraSpec(targets="all-linear", rank=8), example_args=(ids,))
"""

from lora_fx.adapters import active_adapters, adapters, delete_adapter, disabled, set_active
from lora_fx.apply import apply
from lora_fx.capture import capture
from lora_fx.errors import AdapterError, CaptureError, LoraSpecError, TargetError
from lora_fx.match import LinearForm, Site, register_linear_op
from lora_fx.spec import LoraSpec

__version__ = "0.1.0"

__all__ = [
    "AdapterError", "CaptureError", "LinearForm", "LoraSpec", "LoraSpecError", "Site", "TargetError",
    "active_adapters", "adapters", "apply", "capture", "delete_adapter", "disabled", "register_linear_op",
    "set_active",
]
