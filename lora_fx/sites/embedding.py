"""The embedding site kind: `aten.embedding(W, ids)` lookups of a (num_embeddings, dim) table, as PEFT adapts them.

PEFT's parametrisation (peft/tuners/lora/layer.py, `Embedding`): raw Parameters `lora_embedding_A` (r, num) and
`lora_embedding_B` (dim, r), A = 0 and B ~ N(0, 1) at init, no dropout (ids are not activations):

    y = W[ids] + s · A.T[ids] @ B.T,        ΔW = s·(B·A)ᵀ  (num, dim)

The low-rank lookup reads r numbers per token; the table's delta is never materialised.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from lora_fx.sites.base import Read, Site, SiteKind, value_users

aten = torch.ops.aten


class EmbeddingKind(SiteKind):
    name = "embedding"
    weight_dims = (2,)
    factor_containers = ("lora_embedding_A", "lora_embedding_B")
    factor_suffix = ""

    def reads(self, weight: fx.Node, param: torch.Tensor):
        reads, foreign = [], []
        for user in value_users(weight):
            looks_up = (user.op == "call_function" and user.target is aten.embedding.default and user.args[0] is weight
                        and sum(a is weight for a in user.args) == 1)
            (reads.append(Read(user)) if looks_up else foreign.append(user))
        return reads, foreign, []

    def describe(self, fqn, weight, param, reads, module_kind, layer) -> Site:
        num_embeddings, dim = param.shape
        return Site(fqn=fqn, in_features=num_embeddings, out_features=dim, layer=layer, op="embedding", weight=weight,
                    kind=self.name, reads=tuple(reads))

    def factor_shapes(self, site, rank):
        return (rank, site.in_features), (site.out_features, rank)

    def initialize(self, lora_A, lora_B, spec) -> None:
        nn.init.zeros_(lora_A)
        nn.init.normal_(lora_B)

    def delta(self, site, lora_A, lora_B):
        return (lora_B @ lora_A).T                                   # (num, dim)

    def insert(self, graph, read, site, factors, spec, training):
        masked_A, masked_B, scale, add = factors
        table = add("transpose", aten.permute.default, (masked_A, [1, 0]))                # (num, r)
        looked_up = add("down", aten.embedding.default, (table, *read.node.args[1:]), dict(read.node.kwargs))
        scaled = add("scale_mul", aten.mul.Tensor, (looked_up, scale))                    # (..., r)
        return add("up", aten.linear.default, (scaled, masked_B))                          # (..., dim)
