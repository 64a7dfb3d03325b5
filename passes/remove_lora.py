"""remove_lora: take one adapter's branches and state out of a graph (what `delete_adapter` runs).

Each branch ends in a tagged `add(previous, scaled_branch)`; its users are rewired to `previous`, then the
adapter's tagged nodes are erased (users before producers) and its factors and scale buffers unregistered. Other
adapters' branches stay exactly as they were.
"""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from lora_fx.state import LORA_CONTAINERS, submodule, tag_of


def remove_lora(gm: fx.GraphModule, adapter: str, fqns: tuple[str, ...]) -> PassResult:
    """Remove `adapter`'s branches from `gm.graph` and its state from the modules `fqns`."""
    tagged = [node for node in gm.graph.nodes if tag_of(node).get("adapter") == adapter]
    for node in tagged:
        if tag_of(node)["role"] == "add":
            node.replace_all_uses_with(node.args[0])
    for node in reversed(tagged):
        gm.graph.erase_node(node)
    for fqn in fqns:
        owner = submodule(gm, fqn)
        for kind in LORA_CONTAINERS:
            container = owner._modules[kind]
            if kind in ("lora_A", "lora_B"):
                del container[adapter]
            else:
                delattr(container, adapter)
            if not container._modules and not container._buffers:
                delattr(owner, kind)
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, modified=bool(tagged))
