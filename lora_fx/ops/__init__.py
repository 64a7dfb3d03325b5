"""Custom ops lora_fx puts in graphs (`torch.library`, namespace `lora_fx::`).

- `mamba2`: Mamba2's fused `mamba_split_conv1d_scan_combined` as one opaque node.
- `mamba2_reference`: that op's computation in plain torch: the CPU forward, the intermediates it keeps, and its
  backward written by hand.
- `mixed_lora`: `lora_shrink` / `lora_expand`, every batch row through its own adapter (Triton kernels in
  `mixed_lora_triton`, imported only when used), and `check_adapter_ids`.
- `counter_masks`: LoRA dropout from a counter-based stream (`step_seeds`, `counter_dropout`,
  `counter_dropout_linear`): masks drawn where x is read and again in the backward, never stored. The default.
- `dropout_linear`: LoRA's dropout and shrink in one op that draws `nn.Dropout`'s masks (PEFT's, the opt-in) and saves
  no dropped copy for the backward.
- `grouped_mm`: the grouped matmul of MoE expert weights and their LoRA factors (`aten._grouped_mm` where it takes
  the operands, else a loop), with the backward it needs and a plain-torch export form.
- `decompositions`: the registry of pure-torch forms custom ops are exported as (ONNX).
- `cache_key`: torch.compile's on-disk caches keyed on these ops' source, so a changed op is never served code
  compiled for the old one.
"""

from lora_fx.ops.cache_key import tag_compile_caches
from lora_fx.ops.counter_masks import (COUNTER_DROPOUT, COUNTER_DROPOUT_LINEAR, STEP_SEEDS, counter_dropout,
                                        counter_dropout_linear, step_seeds)
from lora_fx.ops.decompositions import EXPORT_DECOMPOSITIONS, register_export_decomposition
from lora_fx.ops.dropout_linear import DROPOUT_LINEAR, dropout_linear
from lora_fx.ops.grouped_mm import grouped_mm, grouped_mm_reference
from lora_fx.ops.mamba2 import (FUSED_CALL_SITES, FUSED_OP, INF, mamba_split_conv1d_scan_combined,
                                opaque_fused_calls, reference)
from lora_fx.ops.mixed_lora import check_adapter_ids, lora_expand, lora_shrink

__all__ = ["COUNTER_DROPOUT", "COUNTER_DROPOUT_LINEAR", "DROPOUT_LINEAR", "EXPORT_DECOMPOSITIONS", "FUSED_CALL_SITES",
           "FUSED_OP", "INF", "STEP_SEEDS", "check_adapter_ids", "counter_dropout", "counter_dropout_linear",
           "dropout_linear", "grouped_mm", "grouped_mm_reference", "lora_expand", "lora_shrink", "mamba_split_conv1d_scan_combined", "opaque_fused_calls",
           "reference", "register_export_decomposition", "step_seeds"]

tag_compile_caches()
