"""Graph passes (installed as `lora_fx.passes`): rewrites of one fx graph, one pass per file.

Every pass that builds a mode's graph takes a GraphModule and returns a `PassResult`, and runs from
`lora_fx.build.PIPELINE` in this order (the state's options and the mode decide which run):

    autocast_ready        autocast regions as explicit casts, so branches see the dtypes the base reads see
    lower_adapted_reads   fused ops that read an adapted weight lowered to plain reads; unknown reads refused
    insert_lora           each adapter's low-rank branch at every read of its sites (`insert_adapters`)
    fuse_siblings         branches of sibling sites share one projection (opt-in: `lora_fx.fuse_siblings`)
    route_rows            one branch per read routed by `adapter_ids` (`lora_fx.mixed_batch` graphs)
    lean_dropout          training: dropout masks drawn in the shrink and again in the backward, never kept
    expand_layout         training: the expand GEMM in the layout its backward reads fastest
    sdpa_gqa              grouped key/value heads read in place by SDPA instead of repeated
    dequantize_reads      every read of a quantized base weight through an explicit dequantize (QLoRA)

Passes on the graph's structure: `split_blocks` (the graph cut into the model's repeated blocks) and
`checkpoint_blocks` (activation checkpointing per block); at capture: `inline_grad_regions`; the Mamba2 fused
kernel's lowering is registered by `lower_mamba2`. New graph modules made from a graph (merge, quantize_base,
mixed_batch) are not passes: see `lora_fx.derived`.
"""
