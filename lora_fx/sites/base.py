"""What a site kind is: how one family of weight reads is recognised, adapted, merged and named.

A *site* is one weight the graph reads (a module's `.weight`, or for MoE experts a named parameter) together with
every *read* of it: the node that consumes the weight, and the chain of view ops (transposes, slices, casts) the
weight went through on the way. A *site kind* knows, for its family of consumers:

- `reads(weight_node, param)`: the reads it recognises among the users of a weight's `get_attr` node, the users it
  cannot account for (those make a targeted weight an error, never a silently partial adaptation), and notes on
  why (e.g. a conv with groups); called through `reads_of`, which asks only kinds whose `weight_dims` fit;
- `describe(...)`: the site (feature counts, layout, kind-specific details) those reads make;
- `selected(gm, sites, spec, state)`: the sites one spec selects, completed (PEFT's names for nested parameters);
- `factor_shapes(site, r)` / `initialize(A, B, spec)`: the LoRA factors, laid out and initialised as PEFT does
  (`spec.rank` is the site's rank);
- `insert(graph, read, site, factors, spec, training)`: the low-rank branch at one read, added to its output;
- `delta(site, A, B)`: the weight's delta ΔW for unit scale, in the weight's own layout (merge adds s·ΔW);
- `tensor_names(site, adapter)` / `peft_keys(site)`: the factor names in the module tree and on disk, exactly PEFT's;
- `dora_problems(site)`: why DoRA cannot adapt the site (kinds without a DoRA rule refuse every site).

Adding a kind is one file (see `lora_fx.sites.linear` for the pattern) registered with `register_site_kind`, which
also makes its factor containers names of LoRA state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from lora_fx.spec import LoraSpec

PEFT_PREFIX = "base_model.model."
# the module-tree containers of LoRA state: the scale and DoRA's magnitude here, each site kind's factor containers
# added by `lora_fx.sites.register_site_kind`
LORA_CONTAINERS = {"lora_scaling", "lora_magnitude_vector"}
# ops that look at a tensor's metadata (shape, dtype, device) but never at its values: not reads of a weight
METADATA_OPS = frozenset({torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten.sym_size.int,
                          torch.ops.aten.sym_numel.default, torch.ops.aten.sym_stride.int})


def value_users(node: fx.Node) -> list[fx.Node]:
    """The users of `node` that read its values (see METADATA_OPS)."""
    return [user for user in node.users if user.target not in METADATA_OPS]


@dataclass(frozen=True)
class Read:
    """One use of a site's weight: `node` consumes the weight after the view ops in `chain` (weight first)."""

    node: fx.Node
    chain: tuple[fx.Node, ...] = ()
    detail: Any = None              # kind-specific: how the consumer uses the weight


@dataclass(frozen=True)
class Site:
    """A weight and its reads: what a spec's callable target receives."""

    fqn: str                    # the owning module's name in the user's model, e.g. "model.layers.0.self_attn.q_proj"
    in_features: int
    out_features: int
    layer: int | None           # first numeric component of the FQN ("model.layers.3.mlp.up_proj" -> 3)
    op: str                     # the reading ops, e.g. "linear", "addmm", "linear+matmul", "embedding"
    weight: str                 # the weight's parameter name
    fan_in_fan_out: bool = False  # a linear weight stored (in, out), as HF Conv1D does
    kind: str = "linear"
    key: str = ""               # the site's unique name: `fqn` for a module's weight, the parameter's name otherwise
    details: Any = None         # the kind's own facts, a record of its own (a conv's kernel, the number of experts)
    reads: tuple[Read, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self):
        if not self.key:
            object.__setattr__(self, "key", self.fqn)

    @property
    def nodes(self) -> tuple[fx.Node, ...]:
        return tuple(read.node for read in self.reads)


class SiteKind:
    """Base of the site kinds; see the module docstring. Subclasses set `name` and implement the methods."""

    name = ""
    selected_by = "modules"                 # spec field that selects its sites: `targets` or `target_parameters`
    factor_containers = ("lora_A", "lora_B")
    factor_suffix = ".weight"               # PEFT's factors are Linear/Conv layers (".weight") or raw Parameters ("")
    rank_dims = (0, 1)                      # the rank dim of A and of B (where adapters stack and pad)
    weight_dims: tuple[int, ...] = ()       # how many dims the weights it adapts have (empty: any)

    def reads_of(self, weight: fx.Node, param: torch.Tensor) -> tuple[list[Read], list[fx.Node], list[str]]:
        """(the reads of `weight` this kind rewrites, the reads it cannot, notes on why): every read is foreign to a
        kind that adapts weights of other dims."""
        if self.weight_dims and param.dim() not in self.weight_dims:
            return [], value_users(weight), []
        return self.reads(weight, param)

    def reads(self, weight: fx.Node, param: torch.Tensor) -> tuple[list[Read], list[fx.Node], list[str]]:
        raise NotImplementedError

    def describe(self, fqn: str, weight: str, param: torch.Tensor, reads: list[Read], module_kind: str | None,
                 layer: int | None) -> Site:
        raise NotImplementedError

    def selected(self, gm, sites: list[Site], spec: LoraSpec, state) -> tuple[list[Site], list[str]]:
        """The sites of this kind `spec` selects in `gm`, completed with what depends on the whole selection (PEFT
        names a module's targeted parameters by how many are targeted), and the problems that forbid them, checked
        against the adapters already in `state`."""
        return sites, []

    def factor_shapes(self, site: Site, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def initialize(self, lora_A: torch.Tensor, lora_B: torch.Tensor, spec: LoraSpec) -> None:
        raise NotImplementedError

    def insert(self, graph: fx.Graph, read: Read, site: Site, factors, spec: LoraSpec, training: bool) -> None:
        raise NotImplementedError

    def delta(self, site: Site, lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dora_problems(self, site: Site) -> list[str]:
        """Why a DoRA adapter cannot adapt `site` (empty: it can). A kind with a DoRA rule overrides this."""
        return [f"module {site.fqn!r} is a {self.name} site, and lora_fx has no DoRA rule for {self.name} sites "
                f"(DoRA, use_dora=True, adapts linear sites)"]

    def padded(self, site: Site, lora_A: torch.Tensor, lora_B: torch.Tensor, rank: int):
        """New factors of rank `rank` >= their own holding A and B, zero elsewhere (exact: zero rank components add
        nothing); used where adapters of several ranks share one slot."""
        dim_A, dim_B = self.rank_dims
        shape_A, shape_B = self.factor_shapes(site, rank)
        padded_A, padded_B = lora_A.new_zeros(shape_A), lora_B.new_zeros(shape_B)
        padded_A.narrow(dim_A, 0, lora_A.shape[dim_A]).copy_(lora_A)
        padded_B.narrow(dim_B, 0, lora_B.shape[dim_B]).copy_(lora_B)
        return padded_A, padded_B

    def tensor_names(self, site: Site, adapter: str) -> tuple[str, str]:
        """The factors' names in the module tree, PEFT's: `<fqn>.lora_A.<adapter>.weight`, ..."""
        return tuple(f"{site.fqn}.{container}.{adapter}{self.factor_suffix}" for container in self.factor_containers)

    def scale_name(self, site: Site, adapter: str) -> str:
        return f"{site.fqn}.lora_scaling.{adapter}"

    def peft_keys(self, site: Site) -> tuple[str, str]:
        """The factors' keys in a PEFT adapter file (no adapter name): `base_model.model.<fqn>.lora_A.weight`, ..."""
        return tuple(f"{PEFT_PREFIX}{site.fqn}.{container}{self.factor_suffix}" for container in
                     self.factor_containers)


SITE_KINDS: dict[str, SiteKind] = {}


def register_site_kind(kind: SiteKind) -> None:
    """Make `kind` part of matching, and its factor containers names of LoRA state (see `state.is_lora_state_name`):
    adding a kind is its file and this call."""
    SITE_KINDS[kind.name] = kind
    LORA_CONTAINERS.update(kind.factor_containers)


def kind_of(site: Site) -> SiteKind:
    return SITE_KINDS[site.kind]


def peft_initialize(lora_A: torch.Tensor, lora_B: torch.Tensor, spec: LoraSpec, rank: int) -> None:
    """PEFT's `LoraLayer.reset_lora_parameters` (peft/tuners/lora/layer.py): "default" is
    A ~ kaiming_uniform(a=sqrt(5)), "gaussian" is A ~ N(0, 1/rank); B = 0 either way (a new adapter is the identity)."""
    if spec.init == "gaussian":
        nn.init.normal_(lora_A, std=1 / rank)
    else:
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    nn.init.zeros_(lora_B)
