"""Exporters (installed as `lora_fx.exporters`): one format per file.

    peft_dir      PEFT adapter directories (adapter_config.json + adapter_model.safetensors), both ways:
                  `save_adapter`, `load_adapter`, `hotswap_adapter`
    onnx          ONNX: the merged model, or the unmerged graph with overridable LoRA slots and
                  `.onnx_adapter` files for ONNX Runtime (`export_onnx`, `export_onnx_adapter`)
    onnx_genai    a decoder with a KV cache for onnxruntime-genai (`export_onnx(..., generation=True)`)

Export-only graph rewrites (custom ops decomposed for ONNX, scale-free slot branches) live here, with the
exporter that needs them, and run on an export's own copy through `GraphState.export_passes`.
"""
