"""hoist: a decode graph split into what depends on the weights alone, computed once per `generate` call, and the
per-token step that reads it.

A graph built with adapters reads its LoRA factors through nodes that depend on parameters and buffers only: the
masks that make an inactive adapter add exactly nothing (`where(s != 0, A, 0)`), the scale's clone, and on a
mixed-batch graph every site's stack of the adapters' factors (K, R, in) and (K, out, R). In a forward they run once;
decoding runs the graph once per token, and these nodes would be recomputed every token, unchanged (the weights do
not change while generating). `split_weight_prologue` moves every node whose inputs are all weights into a
*prologue* graph and gives the *step* graph its results as inputs:

    step(inputs...) = graph(inputs...)   with   step(inputs..., *prologue())

Exact: the same nodes compute the same values. Adapter switches and hot swaps between `generate` calls show, since
the prologue reads the weights at each call; none recompiles the step, whose inputs keep their shapes.
"""

from __future__ import annotations

from torch import fx

_IMPURE = ("_assert", "copy_", "dropout", "bernoulli", "rand")    # never hoisted: checks, writes, random draws


def split_weight_prologue(module: fx.GraphModule) -> tuple[fx.GraphModule, fx.GraphModule, int]:
    """(prologue, step, hoisted count) for `module`'s graph: `prologue()` returns the hoisted values, and
    `step(*flat_inputs, *hoisted)` returns the graph's flat outputs."""
    graph = module.graph
    weights_only = set()
    for node in graph.nodes:
        pure = node.op == "call_function" and not any(word in str(node.target) for word in _IMPURE)
        if node.op == "get_attr" or (pure and node.all_input_nodes
                                     and all(n in weights_only for n in node.all_input_nodes)):
            weights_only.add(node)
    hoisted = [node for node in graph.nodes if node in weights_only and node.op == "call_function"
               and any(user not in weights_only for user in node.users)]

    prologue = fx.Graph()
    copies: dict = {}
    for node in graph.nodes:
        if node in weights_only:
            copies[node] = prologue.node_copy(node, copies.__getitem__)
    prologue.output(tuple(copies[node] for node in hoisted))

    step = fx.Graph()
    copies = {node: step.placeholder(node.name) for node in graph.nodes if node.op == "placeholder"}
    copies.update((node, step.placeholder(f"hoisted_{index}")) for index, node in enumerate(hoisted))
    for node in graph.nodes:
        if node.op == "output":
            step.output(fx.node.map_arg(node.args[0], copies.__getitem__))
        elif node not in copies:
            copies[node] = step.node_copy(node, copies.__getitem__)
    modules = fx.GraphModule(module, prologue), fx.GraphModule(module, step)
    for split in modules:
        split.graph.eliminate_dead_code()
        split.recompile()
    return *modules, len(hoisted)
