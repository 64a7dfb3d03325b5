"""split_blocks: one graph per repeated block (a decoder layer), called from the root graph, so the result keeps the
model's module hierarchy — what FSDP2's per-block `fully_shard`, per-block checkpointing and per-block compile need.

A block's nodes are read from the module stack each node carries (`nn_module_stack`; lora_fx's own nodes inherit
it from the node they belong to) and from the `get_attr` targets under the block's path. They move, in their order,
into the block's own graph; the root graph calls the block with `call_module(path, inputs)` and reads its outputs
with `getitem`. Values the block reads from outside are its inputs, values read outside its outputs. Exact: the
same nodes compute the same values in the same order.

Nodes that need no input from outside the block (its weights' reads, LoRA factor masks) may sit anywhere before
it in the flat graph; every other block node must come after all of the block's inputs. A block whose nodes
interleave with the rest in any other way cannot be cut, and `split_blocks` says why (the graph then stays flat).
"""

from __future__ import annotations

import operator

from torch import fx


class Unsplittable(ValueError):
    """A block's nodes cannot be cut out of the graph as one call (the reason names the block and the node)."""


def block_of(node: fx.Node, paths: set[str]) -> str | None:
    """The block path `node` belongs to, if any."""
    if node.op in ("get_attr", "call_module"):
        return next((p for p in paths if node.target.startswith(p + ".")), None)
    if node.op not in ("call_function", "call_method"):
        return None
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        if path in paths:
            return path
    return None


def split_blocks(root: fx.Graph, paths: list[str]) -> dict[str, fx.Graph]:
    """Cut each block in `paths` out of the graph `root`, in place: {path: block graph} for the blocks it runs.
    Raises Unsplittable when a block cannot be cut (`root` is then half cut: give it a copy)."""
    members: dict[str, list[fx.Node]] = {p: [] for p in paths}
    for node in root.nodes:
        block = block_of(node, set(paths))
        if block is not None:
            members[block].append(node)
    blocks = {}
    for path in paths:
        if any(node.op != "get_attr" for node in members[path]):
            blocks[path] = _cut(root, path, members[path])
    root.lint()
    return blocks


def _cut(root: fx.Graph, path: str, nodes: list[fx.Node]) -> fx.Graph:
    inside = set(nodes)
    anchored = set()                       # members that depend on a value from outside the block
    for node in nodes:
        if any(a in anchored or (a not in inside and a.op != "get_attr") for a in node.all_input_nodes):
            anchored.add(node)
    order = {node: index for index, node in enumerate(root.nodes)}
    first = min((order[n] for n in anchored), default=None)
    inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
    late = [a for a in inputs if first is not None and order[a] > first]
    if late:
        raise Unsplittable(f"block {path!r} reads {late[0].name!r}, which the graph computes in the middle of the "
                           f"block")
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    anchor = next(n for n in root.nodes if n in anchored) if anchored else nodes[-1].next
    early = [u for n in outputs for u in n.users if u not in inside and order[u] < order[anchor]]
    if early:
        raise Unsplittable(f"{early[0].name!r} reads a value of block {path!r} before the block runs (a weight shared "
                           f"with the rest of the model?)")

    block = fx.Graph()
    values = {a: block.placeholder(a.name) for a in inputs}
    prefix = path + "."
    for node in nodes:
        copied = block.node_copy(node, values.__getitem__)
        if node.op in ("get_attr", "call_module"):
            copied.target = node.target[len(prefix):]
        values[node] = copied
    block.output(tuple(values[n] for n in outputs))
    block.lint()

    with root.inserting_before(anchor):
        call = root.call_module(path, tuple(inputs))
        results = [root.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
    for node, result in zip(outputs, results):
        node.replace_all_uses_with(result, delete_user_cb=lambda user: user not in inside)
    for node in reversed(nodes):
        root.erase_node(node)
    return block
