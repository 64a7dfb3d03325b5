"""Custom ops lora_fx puts in graphs (`torch.library`, namespace `lora_fx::`).

- `mamba2`: Mamba2's fused `mamba_split_conv1d_scan_combined` as one opaque node.
- `decompositions`: the registry of pure-torch forms custom ops are exported as (ONNX).
"""

from lora_fx.ops.decompositions import EXPORT_DECOMPOSITIONS, register_export_decomposition
from lora_fx.ops.mamba2 import (FUSED_CALL_SITES, FUSED_OP, INF, mamba_split_conv1d_scan_combined,
                                opaque_fused_calls, reference)

__all__ = ["EXPORT_DECOMPOSITIONS", "FUSED_CALL_SITES", "FUSED_OP", "INF", "mamba_split_conv1d_scan_combined",
           "opaque_fused_calls", "reference", "register_export_decomposition"]
