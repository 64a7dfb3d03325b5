"""dequantize_reads: every read of a base weight stored quantized (QLoRA) goes through an explicit dequantize step.

The graph state records the quantized weights (`GraphState.quantized`: set by `lora_fx.quantize_base`, or at
capture for a model loaded quantized by transformers, see `lora_fx.capture`) and `lora_fx.build` runs this pass
last on every graph it builds, so the quantized base survives mode switches, adapter changes, deepcopy and
`torch.save`/`torch.load`. It rewrites each quantized weight's `get_attr`:

    W = get_attr(name)                              Wq = get_attr(name)
    y = linear(x, view(W), b)            ->         W = dequantize(Wq, fmt, name)       # just before its first read
                                                    y = quantized_read(Wq, linear, ...)(x, view(W), b)

The forward computes exactly what the dense graph computes with the dequantized weight (the same op on the same
values). `quantized_read` is an autograd function that keeps only the quantized weight for backward and
dequantizes it again there (grad_x = grad_y·W for y = x·Wᵀ), as QLoRA's `MatMul4Bit` and torchtune's
`LinearNF4` do: the dense weight lives from just before its first read to its last, never until backward, so a
training step holds one layer's dense weight at a time, not the whole model's. Any other read of the weight (a
DoRA norm, an op no linear form covers) reads the dense `W` as it would read a dense weight. A format whose library
has a linear of its own (bitsandbytes' `matmul_4bit`) runs it for a plain `linear(x, W, b)` read instead
(`library_linear`): the kernel and the numbers of the model's own quantized layer, and of PEFT on it.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from lora_fx.quantize import FORMATS, as_seen, check_quantized, dequantize, format_name
from lora_fx.sites.linear import LinearForm, LinearKind
from lora_fx.state import META_KEY, building_of, inherit_meta

def dequantize_reads(gm: fx.GraphModule) -> PassResult:
    """Give every read of a quantized weight (the state's `quantized`) its dequantized value (see the module
    docstring)."""
    quantized = building_of(gm).state.quantized
    graph = gm.graph
    kind = LinearKind()
    nodes = [n for n in graph.nodes if n.op == "get_attr" and n.target in quantized]
    compute_dtypes = {p.dtype for name, p in gm.named_parameters() if name not in quantized and p.is_floating_point()}
    for node in nodes:
        check_quantized(gm.get_parameter(node.target), quantized[node.target], node.target, compute_dtypes)
        users = list(node.users)
        if not users:
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        first = min(users, key=order.__getitem__)
        with graph.inserting_before(first):
            dense = graph.call_function(dequantize, (node, quantized[node.target], node.target))
        inherit_meta(dense, first)
        dense.meta[META_KEY] = {"role": "dequantize", "site": node.target.rpartition(".")[0]}
        node.replace_all_uses_with(dense, delete_user_cb=lambda user: user is not dense)
        reads, _, _ = kind.reads_of(dense, as_seen(gm.get_parameter(node.target)))
        for read in reads:
            _rewrite_read(graph, read, node, FORMATS[quantized[node.target]])
        if not dense.users:                                   # every read runs the library's own linear
            graph.erase_node(dense)
    graph.lint()
    return PassResult(gm, modified=bool(nodes))


def _rewrite_read(graph: fx.Graph, read, quantized: fx.Node, fmt) -> None:
    """`consumer(x, view(W), ...)` as `quantized_read(Wq, consumer, form, views)(x, view(W), ...)`; a plain
    `linear(x, W, b)` of a format with a linear of its own as `library_linear(x, Wq, b, fmt)`."""
    consumer = read.node
    form: LinearForm = read.detail
    views = tuple((view.target, tuple(view.args[1:]), dict(view.kwargs)) for view in read.chain)
    plain_linear = consumer.target is torch.ops.aten.linear.default and not views and not consumer.kwargs
    with graph.inserting_before(consumer):
        if fmt.linear is not None and plain_linear:
            x, _, *bias = consumer.args
            new = graph.call_function(library_linear, (x, quantized, bias[0] if bias else None, fmt.name))
        else:
            new = graph.call_function(quantized_read, (quantized, consumer.target, _mode(form), form.input_index,
                                                       views, *consumer.args), dict(consumer.kwargs))
    new.meta = dict(consumer.meta)
    consumer.replace_all_uses_with(new)
    graph.erase_node(consumer)


def _mode(form: LinearForm) -> str:
    if form.weight_first:
        return "w@x"                                    # y = V·x
    return "x@w" if form.weight_transposed else "x@wT"  # y = x·V, or y = x·Vᵀ (nn.Linear)


def library_linear(x: torch.Tensor, quantized: torch.Tensor, bias: torch.Tensor | None, fmt: str) -> torch.Tensor:
    """x·Wᵀ + b by the quantization library itself (bitsandbytes' `matmul_4bit`, which keeps only the quantized
    weight for backward), as the model's own quantized layer computes it."""
    return FORMATS[fmt].linear(x, quantized, bias)


def quantized_read(quantized: torch.Tensor, op, mode: str, input_index: int, views: tuple, *args, **kwargs):
    """`op(*args, **kwargs)` (a linear-form read of the dequantized weight), keeping only `quantized` for
    backward. Under torch.compile the plain op is traced instead, and the compiler decides what to keep."""
    if torch.compiler.is_compiling():
        return op(*args, **kwargs)
    return _QuantizedRead.apply(quantized, op, mode, input_index, views, kwargs, *args)


class _QuantizedRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, quantized, op, mode, input_index, views, kwargs, *args):
        ctx.quantized, ctx.mode, ctx.input_index, ctx.views = quantized, mode, input_index, views
        ctx.shapes = [arg.shape if isinstance(arg, torch.Tensor) else None for arg in args]
        return op(*args, **kwargs)

    @staticmethod
    def backward(ctx, grad):
        grads = [None] * len(ctx.shapes)
        needs = ctx.needs_input_grad[6:]
        if needs[ctx.input_index]:
            weight = _replay(ctx.quantized, ctx.views)
            grads[ctx.input_index] = {"x@wT": lambda: grad @ weight, "x@w": lambda: grad @ weight.T,
                                      "w@x": lambda: weight.T @ grad}[ctx.mode]()
        for index, shape in enumerate(ctx.shapes):     # a bias that requires grad: y = ... + b
            if needs[index] and grads[index] is None and shape is not None:
                grads[index] = grad.sum_to_size(shape)
        return (None,) * 6 + tuple(grads)


def _replay(quantized: torch.Tensor, views: tuple) -> torch.Tensor:
    """The dense weight as the read saw it: dequantized, then through the same view ops."""
    weight = FORMATS[format_name(quantized)].dequantize(quantized)
    for target, args, kwargs in views:
        weight = target(weight, *args, **kwargs)
    return weight


