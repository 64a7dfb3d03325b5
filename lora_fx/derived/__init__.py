"""Derived graph modules: new graph modules computed from a captured one, never changing it.

    derive          the one way to copy: own graphs and buffers, base weights frozen objects sharing storage
    merge           adapters folded into the base weights, no LoRA left (`lora_fx.merge`)
    quantize_base   the base weights stored quantized, LoRA on top (`lora_fx.quantize_base`)
    mixed_batch     every row through its own adapter (`lora_fx.mixed_batch`)

(The unmerged ONNX slot view is derived the same way, in `lora_fx.exporters.onnx`.) Each commits a new state on its
copy, and its graphs are built from the plain captures by `lora_fx.build`, like any other change.
"""
