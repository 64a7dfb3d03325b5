"""The convolution site kind: `conv1d`/`conv2d`/`conv3d` weights (out, in, *kernel), as PEFT adapts them.

PEFT's parametrisation (peft/tuners/lora/layer.py, `_ConvNd`): `lora_A` is a conv with the base kernel, stride and
padding into r channels, `lora_B` a 1×1 conv back to the output channels; A kaiming-uniform, B = 0 at init:

    y = conv(x, W) + s · conv1×1(conv(dropout(x), A), B),      ΔW = s · B[:, :, 0..] ⊛ A   (out, in, *kernel)

Each read keeps its own stride and padding, so every read equals a conv by W + ΔW. Grouped and dilated convs are
refused (PEFT's branch would not be a delta of the weight there).
"""

from __future__ import annotations


from dataclasses import dataclass

import torch
from torch import fx

from lora_fx.sites.base import Read, Site, SiteKind, peft_initialize, value_users

aten = torch.ops.aten
CONVS = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3,
         aten.conv1d.padding: 1, aten.conv2d.padding: 2, aten.conv3d.padding: 3}


def _arguments(node: fx.Node) -> dict:
    """The node's arguments by schema name, defaults filled in."""
    schema = node.target._schema.arguments
    values = {a.name: a.default_value for a in schema if a.has_default_value()}
    values.update(zip([a.name for a in schema], node.args))
    values.update(node.kwargs)
    return values


@dataclass(frozen=True)
class ConvDetails:
    kernel: tuple[int, ...]           # the kernel's size per spatial dim


class ConvKind(SiteKind):
    name = "conv"
    weight_dims = (3, 4, 5)

    def reads(self, weight: fx.Node, param: torch.Tensor):
        reads, foreign, notes = [], [], []
        for user in value_users(weight):
            if user.op != "call_function" or user.target not in CONVS or user.args[1] is not weight or sum(
                    a is weight for a in user.args) != 1 or param.dim() != CONVS[user.target] + 2:
                foreign.append(user)
                continue
            arguments = _arguments(user)
            dilation = arguments["dilation"]
            dilations = dilation if isinstance(dilation, list) else [dilation]
            if arguments["groups"] != 1 or any(d != 1 for d in dilations):
                notes.append(f"{weight.target!r} is read by a conv with groups={arguments['groups']} and dilation="
                             f"{dilation}; the conv kind supports groups=1 and dilation=1 only")
                foreign.append(user)
                continue
            reads.append(Read(user, detail=arguments))
        return reads, foreign, notes

    def describe(self, fqn, weight, param, reads, module_kind, layer) -> Site:
        out_channels, in_channels, *kernel = param.shape
        op = "+".join(dict.fromkeys(read.node.target._schema.name.split("::")[-1] for read in reads))
        return Site(fqn=fqn, in_features=in_channels, out_features=out_channels, layer=layer, op=op, weight=weight,
                    kind=self.name, details=ConvDetails(tuple(kernel)), reads=tuple(reads))

    def factor_shapes(self, site, rank):
        kernel = site.details.kernel
        return (rank, site.in_features, *kernel), (site.out_features, rank, *(1,) * len(kernel))

    def initialize(self, lora_A, lora_B, spec) -> None:
        peft_initialize(lora_A, lora_B, spec, rank=lora_A.shape[0])

    def delta(self, site, lora_A, lora_B):
        product = lora_B.flatten(1) @ lora_A.flatten(1)              # (out, in·prod(kernel))
        return product.view(site.out_features, site.in_features, *site.details.kernel)

    def insert(self, graph, read, site, factors, spec, training):
        masked_A, masked_B, scale, add = factors
        arguments = read.detail
        x = read.node.args[0]
        if spec.dropout > 0 and training:
            x = add("dropout", aten.dropout.default, (x, spec.dropout, True))
        dims = len(site.details.kernel)
        down = add("down", read.node.target, (x, masked_A, None, arguments["stride"], arguments["padding"]))
        scaled = add("scale_mul", aten.mul.Tensor, (down, scale))
        return add("up", CONVS_BY_DIMS[dims], (scaled, masked_B, None, [1] * dims, [0] * dims))


CONVS_BY_DIMS = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}
