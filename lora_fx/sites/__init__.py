"""Site kinds: every family of weight reads lora_fx adapts, one file each, in a registry.

    linear      a 2-D weight read by linear/matmul/mm/addmm, through transposes, slices and casts (nn.Linear, HF
                Conv1D, raw parameters read by F.linear or `@`)
    embedding   an embedding table read by `aten.embedding`
    conv        conv1d/2d/3d weights (groups=1, dilation=1)
    experts     3-D MoE expert weights read by grouped_mm or gathered for bmm (`target_parameters`)

Matching asks each kind which reads of a weight it recognises; the kind that accounts for most of a weight's reads
owns the site (the first registered among equals). A new kind subclasses `SiteKind` and calls `register_site_kind`;
a miss lists the kinds and ops supported. Beside the kinds: `views` (the view algebra every kind reads weights
through), `dora` (DoRA's math for linear sites) and `variants` (what an adapter variant, LoRA or DoRA, adds at a
site: its tensors, term, merge delta, PEFT keys and refusals).
"""

from __future__ import annotations

from lora_fx.sites import dora
from lora_fx.sites.base import PEFT_PREFIX, SITE_KINDS, Read, Site, SiteKind, kind_of, register_site_kind
from lora_fx.sites.conv import ConvKind
from lora_fx.sites.embedding import EmbeddingKind
from lora_fx.sites.experts import ExpertsKind
from lora_fx.sites.linear import LinearForm, LinearKind, register_linear_op, supported_ops
from lora_fx.sites.variants import DORA, LORA, variant_of

for _kind in (LinearKind(), EmbeddingKind(), ConvKind(), ExpertsKind()):
    register_site_kind(_kind)


def tensor_names(site: Site, adapter: str) -> tuple[str, str, str]:
    """The names of one site's factors A and B and of its scale buffer, for `adapter`."""
    kind = kind_of(site)
    return (*kind.tensor_names(site, adapter), kind.scale_name(site, adapter))


def adapter_tensor_names(site: Site, spec) -> tuple[str, ...]:
    """Every tensor `spec`'s adapter registers at `site`: its factors, its scale buffer and its variant's own
    tensors (DoRA's magnitude vector)."""
    return tensor_names(site, spec.adapter) + variant_of(spec).tensor_names(site, spec.adapter)


def supported() -> str:
    return f"site kinds {list(SITE_KINDS)} (linear ops: {supported_ops()})"


__all__ = ["DORA", "LORA", "PEFT_PREFIX", "SITE_KINDS", "LinearForm", "Read", "Site", "SiteKind", "adapter_tensor_names",
           "dora", "kind_of", "register_linear_op", "register_site_kind", "supported", "supported_ops", "tensor_names",
           "variant_of"]
