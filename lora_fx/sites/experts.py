"""The experts site kind: 3-D MoE expert weights, selected by `target_parameters`, as PEFT adapts them.

transformers 5 keeps a MoE layer's experts in one module with 3-D parameters — `gate_up_proj` (E, 2I, H) and
`down_proj` (E, H, I), or (E, in, out) where the module says `is_transposed` — and reads them with the experts
implementation its config names (`config._experts_implementation`, transformers/integrations/moe.py):

    grouped_mm   tokens sorted by expert: y = grouped_mm(x, Wᵀ, offs) with per-expert group offsets (transformers'
                 `grouped_mm_fallback` op where torch's kernel cannot be compiled, e.g. fp32; `aten._grouped_mm`)
    batched_mm   each (token, expert) pair gathers its expert's matrix: y = bmm(W[ids], x)
    eager        a Python loop over the experts the routing hits: data-dependent, torch.export cannot capture it
                 (capture refuses it, and transformers' CUDA kernels, naming the module and these two)

PEFT's parametrisation (peft/tuners/lora/layer.py, `ParamWrapper`): `lora_A` (r·E, in) and `lora_B` (out, r·E),
expert e's factors A_e = A.view(E, r, in)[e] and B_e = B.view(out, r, E)[:, :, e]; A kaiming-uniform, B = 0:

    W'_e = W_e + s·B_e·A_e              ((B_e·A_e)ᵀ for weights stored (E, in, out))

PEFT materialises W + s·B·A for every expert on every forward. Here the delta stays a batched factor pair
ΔW = L·R, (E, out, r)·(E, r, in), through the views the weight passes on its way to a read (the transpose of its
last two dims, the gather W[ids], slices, casts), and each read computes it at rank r on the routed tokens only:

    grouped_mm(x, ΔV, offs) = grouped_mm(grouped_mm(x, L, offs), R, offs)            (the same group offsets)
    bmm(ΔV, u) = bmm(L, bmm(R, u))          bmm(u, ΔV) = bmm(bmm(u, L), R)           (ΔV = ΔW[ids]: L[ids], R[ids])

with s applied to the rank-r activation. The low-rank grouped products are `lora_fx::grouped_mm` (see
`lora_fx.ops.grouped_mm`: any layout, any rank, every dtype, compiled too), whichever op the model's read uses. Every
read sees exactly the merged weight's delta, so merge equals the unmerged graph. No dropout: PEFT refuses
`lora_dropout` for parameters too.

While a graph has an adapter, every expert read by transformers' `grouped_mm_fallback` (its path for dtypes other
than bf16 under torch.export) is `lora_fx::grouped_mm` too, the same product (`lower_fallback_reads`, called by
`lora_fx.build`): the fallback's backward computes and allocates the (E, k, n) gradient of the weight even when it
is frozen, a matmul per expert and E·in·out memory on every read of every step, with the experts adapted or not
(LoRA on attention only still runs backward through them); lora_fx's computes only the gradients autograd asks
for. The plain capture, and so a merged graph, keeps the fallback.

Names follow PEFT's nesting: each targeted parameter of a module gets its own `ParamWrapper`, wrapped in the
module's parameter order, so of the n parameters of one module an adapter targets, the k-th (0-based) keeps its
factors n-1-k `base_layer.` levels down: targeting `gate_up_proj` and `down_proj` gives
`experts.base_layer.lora_A.<adapter>.weight` (gate_up_proj) and `experts.lora_A.<adapter>.weight` (down_proj), on
disk without the adapter name. The nesting depends on the set an adapter targets, so every adapter must give a
parameter the same depth (PEFT asks that adapters target the same parameters).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from lora_fx.ops import register_export_decomposition
from lora_fx.ops.grouped_mm import grouped_mm_reference
from lora_fx.sites.base import PEFT_PREFIX, Read, Site, SiteKind, peft_initialize
from lora_fx.sites.views import Factor, replay, transposes, value, walk
from lora_fx.spec import LoraSpec

aten = torch.ops.aten
CAPTURABLE = ("grouped_mm", "batched_mm")
UNCAPTURABLE = ("eager", "sonicmoe", "deepgemm")          # transformers' others: a data-dependent loop, CUDA kernels
FALLBACK_GROUPED_MM = "transformers::grouped_mm_fallback"
GROUPED_MM = torch.ops.lora_fx.grouped_mm.default


def _is_fallback(node: fx.Node) -> bool:
    """Whether `node` calls transformers' `grouped_mm_fallback` op (registered once transformers' MoE code ran)."""
    if getattr(getattr(node.target, "_schema", None), "name", None) != FALLBACK_GROUPED_MM:
        return False
    register_export_decomposition(node.target, grouped_mm_reference)
    return True


def lower_fallback_reads(gm: fx.GraphModule) -> PassResult:
    """Every call of transformers' `grouped_mm_fallback` in `gm`'s graph becomes `lora_fx::grouped_mm`, the same
    product (see the module docstring)."""
    fallbacks = [node for node in gm.graph.nodes if node.op == "call_function" and _is_fallback(node)]
    for node in fallbacks:
        node.target = GROUPED_MM
    return PassResult(gm, modified=bool(fallbacks))


def _is_grouped_mm(node: fx.Node) -> bool:
    return node.target in (aten._grouped_mm.default, GROUPED_MM) or _is_fallback(node)


def _offsets(node: fx.Node):
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")


def _consumer(node: fx.Node, value: fx.Node) -> str | None:
    """How `node` reads `value`, a 3-D view of an expert weight: "grouped" (grouped_mm(x, V, offs)), "left"
    (bmm(V, u)) or "right" (bmm(u, V)); None when it does not read it as a batched linear map."""
    if node.op != "call_function" or sum(a is value for a in node.args) != 1 or value in node.kwargs.values():
        return None
    if _is_grouped_mm(node):
        plain = all(node.kwargs.get(k) is None for k in ("out_dtype",)) and len(node.args) <= 4
        return "grouped" if node.args[1] is value and _offsets(node) is not None and plain else None
    if node.target is aten.bmm.default:
        return "left" if node.args[0] is value else "right"
    return None


def _stored_transposed(read: Read) -> bool:
    """Whether this read implies the weight is stored (E, in, out): grouped_mm and bmm(u, V) read V as (in, out),
    bmm(V, u) as (out, in); each transpose on the way swaps that."""
    reads_in_out = read.detail in ("grouped", "right")
    return reads_in_out == (transposes(read.chain) % 2 == 0)


@dataclass(frozen=True)
class ExpertsDetails:
    num_experts: int
    transposed: bool        # stored (E, in, out) — the layout grouped_mm reads — rather than (E, out, in)
    depth: int = 0          # how many `.base_layer` PEFT nests the keys under (see the module docstring)


class ExpertsKind(SiteKind):
    name = "experts"
    selected_by = "parameters"
    weight_dims = (3,)

    def reads(self, weight: fx.Node, param: torch.Tensor):
        reads, foreign = walk(weight, _consumer, ndim=3)
        notes = [f"{weight.target!r} is read by ops the experts kind cannot rewrite; it adapts expert weights read by "
                 f"grouped_mm or gathered for bmm (experts implementations {list(CAPTURABLE)})"] if foreign else []
        return reads, foreign, notes

    def describe(self, fqn, weight, param, reads, module_kind, layer) -> Site:
        num_experts = param.shape[0]
        transposed = bool(reads) and all(_stored_transposed(read) for read in reads)
        in_features, out_features = (param.shape[1], param.shape[2]) if transposed else (param.shape[2], param.shape[1])
        op = "+".join(dict.fromkeys("grouped_mm" if read.detail == "grouped" else "bmm" for read in reads))
        return Site(fqn=fqn, in_features=in_features, out_features=out_features, layer=layer, op=op, weight=weight,
                    kind=self.name, key=weight, details=ExpertsDetails(num_experts, transposed),
                    reads=tuple(reads))

    def selected(self, gm, sites, spec: LoraSpec, state):
        """PEFT's nesting depth of each site (see the module docstring), checked against the adapters already on the
        graph; dropout is refused, as PEFT refuses it for parameters."""
        problems = []
        if spec.dropout > 0:
            problems.append(f"`dropout` must be 0 for expert parameters {[s.key for s in sites]} (PEFT's ParamWrapper "
                            f"refuses lora_dropout too: a parameter's LoRA is a change of the weight), got "
                            f"{spec.dropout}")
        by_module: dict[str, list[Site]] = {}
        for site in sites:
            by_module.setdefault(site.fqn, []).append(site)
        nested = {}
        for fqn, own in by_module.items():
            order = list(gm.get_submodule(fqn)._parameters)
            own = sorted(own, key=lambda s: order.index(s.weight.rpartition(".")[2]))
            for k, site in enumerate(own):
                nested[site.key] = dataclasses.replace(
                    site, details=dataclasses.replace(site.details, depth=len(own) - 1 - k))
        for key, site in nested.items():
            existing = state.site_info.get(key)
            if existing is not None and existing.details != site.details:
                others = [a for a, keys in state.sites.items() if key in keys]
                problems.append(f"parameter {key!r} is adapted by {others} with PEFT's nesting depth "
                                f"{existing.details.depth}, but this adapter's targets on module {site.fqn!r} give it "
                                f"depth {site.details.depth}: PEFT names a module's targeted parameters by how many of "
                                f"them are targeted, so every adapter must target the same parameters of a module")
        return [nested[site.key] for site in sites], problems

    def factor_shapes(self, site, rank):
        num_experts = site.details.num_experts
        return (rank * num_experts, site.in_features), (site.out_features, rank * num_experts)

    def initialize(self, lora_A, lora_B, spec: LoraSpec) -> None:
        """PEFT's initialisation (`peft_initialize`) of the (r·E, in) and (out, r·E) layers, with the adapter's r."""
        peft_initialize(lora_A, lora_B, spec, rank=spec.rank)

    def delta(self, site, lora_A, lora_B):
        left, right = _stacked_pair(site, lora_A, lora_B, lambda op, args: getattr(torch.Tensor, op)(*args))
        return left @ right                                                # (E, out, in) or (E, in, out)

    def insert(self, graph, read, site, factors, spec, training) -> fx.Node:
        masked_A, masked_B, scale, add = factors
        left, right = (Factor(factor, lead=1) for factor in _stacked_pair(
            site, masked_A, masked_B, lambda op, args: add("factor", _ATEN[op], args)))
        for view in read.chain:
            left, right = replay(view, left, right, add, ndim=3)
        left, right = value(left, add), value(right, add)
        node = read.node
        if read.detail == "grouped":                                    # x·(L·R) = (x·L)·R, grouped by expert
            x, offs = node.args[0], _offsets(node)
            down = add("down", GROUPED_MM, (x, left, offs))                           # (S, r)
            scaled = add("scale_mul", aten.mul.Tensor, (down, scale))
            return add("up", GROUPED_MM, (scaled, right, offs))                       # (S, out)
        if read.detail == "left":                                        # (L·R)·u = L·(R·u)
            down = add("down", aten.bmm.default, (right, node.args[1]))               # (S, r, n)
            scaled = add("scale_mul", aten.mul.Tensor, (down, scale))
            return add("up", aten.bmm.default, (left, scaled))
        down = add("down", aten.bmm.default, (node.args[0], left))                    # u·(L·R) = (u·L)·R: (S, m, r)
        scaled = add("scale_mul", aten.mul.Tensor, (down, scale))
        return add("up", aten.bmm.default, (scaled, right))

    def padded(self, site, lora_A, lora_B, rank):
        num_experts = site.details.num_experts
        stacked_A = lora_A.reshape(num_experts, -1, lora_A.shape[-1])                           # (E, r, in)
        stacked_B = lora_B.reshape(lora_B.shape[0], -1, num_experts)                            # (out, r, E)
        padded_A = stacked_A.new_zeros(num_experts, rank, stacked_A.shape[-1])
        padded_B = stacked_B.new_zeros(stacked_B.shape[0], rank, num_experts)
        padded_A[:, :stacked_A.shape[1]] = stacked_A
        padded_B[:, :stacked_B.shape[1]] = stacked_B
        return padded_A.reshape(-1, padded_A.shape[-1]), padded_B.reshape(padded_B.shape[0], -1)

    def tensor_names(self, site, adapter):
        return tuple(f"{_nested(site)}.{container}.{adapter}.weight" for container in self.factor_containers)

    def scale_name(self, site, adapter):
        return f"{_nested(site)}.lora_scaling.{adapter}"

    def peft_keys(self, site):
        return tuple(f"{PEFT_PREFIX}{_nested(site)}.{container}.weight" for container in self.factor_containers)


def _nested(site: Site) -> str:
    return site.fqn + ".base_layer" * site.details.depth


_ATEN = {"view": aten.view.default, "permute": aten.permute.default}


def _stacked_pair(site: Site, lora_A, lora_B, view):
    """PEFT's factors as the batched pair ΔW = L·R in the weight's layout: (B_e, A_e) per expert, (E, out, r) and
    (E, r, in), for an (E, out, in) weight; (A_eᵀ, B_eᵀ) for an (E, in, out) one. `view(op, args)` makes
    each view (`op` names a torch.Tensor method; on tensors, or as graph nodes)."""
    num_experts, transposed = site.details.num_experts, site.details.transposed
    stacked_A = view("view", (lora_A, [num_experts, -1, site.in_features]))           # (E, r, in)
    stacked_B = view("view", (lora_B, [site.out_features, -1, num_experts]))          # (out, r, E)
    if transposed:
        return (view("permute", (stacked_A, [0, 2, 1])),                              # (E, in, r)
                view("permute", (stacked_B, [2, 1, 0])))                              # (E, r, out)
    return view("permute", (stacked_B, [2, 0, 1])), stacked_A                        # (E, out, r), (E, r, in)


# ---- experts implementations torch.export cannot capture ------------------------------------------------------------

def uncapturable_experts(model: nn.Module) -> dict[str, str]:
    """{FQN: implementation} of the transformers experts modules (`@use_experts_implementation`) in `model` whose
    experts implementation torch.export cannot capture (`UNCAPTURABLE`; unset means eager). An implementation a
    user registered is left to export to try."""
    found = {}
    for name, module in model.named_modules():
        if all(hasattr(module, attr) for attr in ("has_gate", "is_transposed", "_is_expert_parallel", "config")):
            implementation = getattr(module.config, "_experts_implementation", None) or "eager"
            if implementation in UNCAPTURABLE:
                found[name] = implementation
    return found


def uncapturable_message(model: nn.Module) -> str | None:
    """Why `model` cannot be captured as it is, when its experts run an implementation torch.export cannot capture
    (checked before exporting: the failure export would give names neither the module nor the fix); else None."""
    found = uncapturable_experts(model)
    if not found:
        return None
    first, implementation = next(iter(found.items()))
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    reason = ("a Python loop over the experts the routing hits, whose shapes depend on the data" if implementation ==
              "eager" else "a fused kernel lora_fx can neither capture nor adapt")
    return (f"the experts module {first!r}{more} runs the {implementation!r} experts implementation, {reason}; "
            f"lora_fx captures the {' and '.join(repr(c) for c in CAPTURABLE)} implementations: call "
            f"model.set_experts_implementation('grouped_mm') (or set config._experts_implementation) before "
            f"capturing.")
