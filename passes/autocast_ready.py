"""autocast_ready: graphs that run under `torch.autocast` (transformers' Trainer with `bf16=True` or `fp16=True`).

torch.export records a `.to(dtype)` that was a no-op at capture as `aten._assert_tensor_metadata(x, dtype=...)`, a
check that x still has the dtype it had then. Under autocast a linear's output is bf16, so those checks fail where
the eager model runs. This pass removes the checks and nothing else: without autocast the graph computes exactly
what it did. Under autocast, the ops autocast covers run in its dtype (lora_fx's custom ops too, see
`lora_fx.ops.autocast`) and the others in the dtype their inputs promote to. One difference from the eager model
remains: a cast that was a no-op at capture (`x.to(torch.float32)` on a float32 x) is not in the graph, so a bf16 x
arriving there stays bf16 (transformers' Llama keeps its residual stream in fp32 anyway, and its bf16 gradients
stay as close to fp32 ones as PEFT's do: tests/passes/test_autocast_ready.py).
"""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

import lora_fx.ops.autocast  # noqa: F401  (lora_fx's custom ops cast under autocast)

DTYPE_CHECK = torch.ops.aten._assert_tensor_metadata.default


def autocast_ready(gm: fx.GraphModule) -> PassResult:
    checks = [node for node in gm.graph.nodes if node.op == "call_function" and node.target is DTYPE_CHECK]
    for node in checks:
        gm.graph.erase_node(node)
    gm.graph.lint()
    return PassResult(gm, modified=bool(checks))
