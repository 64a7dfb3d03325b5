"""Activation checkpointing per block, as a pass over the root graph.

After the graph is cut into blocks (see `lora_fx.passes.split_blocks`), the root graph calls each block with
`call_module(path, inputs)`. With a policy on, each such call becomes `run_block(block, policy, *inputs)`, which runs
the block under `torch.utils.checkpoint` (non-reentrant, RNG state preserved, so dropout masks are replayed):

    full        keep only the block's inputs; the backward recomputes the whole block
    selective   keep the outputs of the matmuls (mm, addmm, bmm, attention, convolution, LoRA's shrinks of a dropped
                input) and recompute the cheap ops between them (norms, activations, adds, casts, views) — most of
                the memory for a few % time

Outputs and gradients are exactly those of the graph without checkpointing. The block is called as a module, so its
hooks (FSDP2's, a per-block `torch.compile`) still run.
"""

from __future__ import annotations

import functools

import torch
from torch import fx
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from lora_fx.ops import COUNTER_DROPOUT_LINEAR, DROPOUT_LINEAR

aten = torch.ops.aten
POLICIES = ("none", "full", "selective")
SAVED_BY_SELECTIVE = frozenset({
    aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.convolution.default,
    aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default, aten._scaled_dot_product_cudnn_attention.default,
    COUNTER_DROPOUT_LINEAR, DROPOUT_LINEAR,
})


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_BY_SELECTIVE else CheckpointPolicy.PREFER_RECOMPUTE


@functools.cache
def _selective_contexts():
    return functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)


def run_block(block: torch.nn.Module, policy: str, *inputs, **keywords):
    """`block(*inputs, **keywords)` under activation checkpointing with `policy` ("full" or "selective")."""
    if policy == "full":
        return checkpoint(block, *inputs, use_reentrant=False, **keywords)
    return checkpoint(block, *inputs, use_reentrant=False, context_fn=_selective_contexts(), **keywords)


torch.fx.wrap("run_block")


def checkpoint_blocks(root: fx.Graph, block_paths, policy: str) -> None:
    """Rewrite, in place, each call of a block in `block_paths` in `root` to run under `policy`."""
    paths = set(block_paths)
    for node in list(root.nodes):
        if node.op == "call_module" and node.target in paths:
            with root.inserting_before(node):
                block = root.get_attr(node.target)
                wrapped = root.call_function(run_block, (block, policy, *node.args), dict(node.kwargs))
            wrapped.meta = node.meta
            node.replace_all_uses_with(wrapped)
            root.erase_node(node)
    root.lint()
