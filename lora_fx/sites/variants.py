"""Adapter variants: what an adapter adds to plain LoRA at each of its sites, in one object per variant.

    LORA    plain LoRA: the factors and the branch s·B·A, nothing more
    DORA    DoRA: a magnitude vector per output feature and the term it scales (see `lora_fx.sites.dora`)

A variant holds everything that differs: the extra tensors (their names in the module tree, their PEFT keys and
shapes, their initial values), the term its branch adds at a read, its merge delta, the sites it cannot adapt,
and the derived forms that cannot hold it. `variant_of(spec)` picks one; nothing else branches on `use_dora`.
"""

from __future__ import annotations

import torch
from torch import fx

from lora_fx.sites.base import Read, Site, SiteKind, kind_of
from lora_fx.sites.dora import (initial_magnitude, insert, magnitude_key, magnitude_name,
                                 merged_delta as dora_merged_delta)


class LoraVariant:
    name = "LoRA"
    unstackable: str | None = None      # why mixed batches, combinations and ONNX slots cannot hold it (None: they can)

    def site_problems(self, kind: SiteKind, site: Site) -> list[str]:
        """Why an adapter of this variant cannot adapt `site` (empty: it can)."""
        return []

    def tensor_names(self, site: Site, adapter: str) -> tuple[str, ...]:
        """The variant's own tensors of (site, adapter) in the module tree, besides the factors and the scale."""
        return ()

    def peft_shapes(self, site: Site) -> dict[str, tuple[int, ...]]:
        """{key in a PEFT adapter file: shape} of the variant's own tensors at `site`."""
        return {}

    def new_tensors(self, site: Site, adapter: str, base: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    scale: float, saved: tuple = ()) -> dict[str, torch.Tensor]:
        """{name: value} of the variant's own tensors for new factors at `site`: `saved` (in `peft_shapes` order)
        where an adapter file gives them, else initialised; `base` is the dense base weight."""
        return {}

    def saved(self, gm: fx.GraphModule, site: Site, adapter: str) -> dict[str, torch.Tensor]:
        """{PEFT key: tensor} of the variant's own tensors, as an adapter file holds them."""
        return {}

    def term(self, read: Read, site: Site, factors, adapter: str, branch: fx.Node, dropped: fx.Node | None) -> fx.Node:
        """What the adapter adds at `read`, given its LoRA branch (s·read of B·A) and the dropout of x where the graph
        has one."""
        return branch

    def merged_delta(self, gm: fx.GraphModule, adapter: str, site: Site, base: torch.Tensor, lora_A: torch.Tensor,
                     lora_B: torch.Tensor, scale: float) -> torch.Tensor:
        """W' − W for the base weight `base` (in its own layout), in the dtype of the arguments; the variant's own
        tensors are read from `gm`."""
        return scale * kind_of(site).delta(site, lora_A, lora_B)


class DoraVariant(LoraVariant):
    name = "DoRA"
    unstackable = "its magnitude term is per weight, not a low-rank product that stacks, pads or sums"

    def site_problems(self, kind, site):
        return kind.dora_problems(site)

    def tensor_names(self, site, adapter):
        return (magnitude_name(site, adapter),)

    def peft_shapes(self, site):
        return {magnitude_key(site): (site.out_features,)}

    def new_tensors(self, site, adapter, base, lora_A, lora_B, scale, saved=()):
        with torch.no_grad():
            magnitude = saved[0] if saved else initial_magnitude(site, base, lora_A, lora_B, scale)
        return {magnitude_name(site, adapter): magnitude}

    def saved(self, gm, site, adapter):
        return {magnitude_key(site): gm.get_parameter(magnitude_name(site, adapter)).detach()}

    def term(self, read, site, factors, adapter, branch, dropped):
        return insert(read, site, factors, adapter, branch, dropped)

    def merged_delta(self, gm, adapter, site, base, lora_A, lora_B, scale):
        magnitude = gm.get_parameter(magnitude_name(site, adapter)).detach().to(base.dtype)
        return dora_merged_delta(site, base, lora_A, lora_B, scale, magnitude)


LORA, DORA = LoraVariant(), DoraVariant()


def variant_of(spec) -> LoraVariant:
    return DORA if spec.use_dora else LORA
