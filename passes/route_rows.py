"""route_rows: every adapted read's parallel branches replaced by one branch routed per row by `adapter_ids`.

The graph takes one more input, `adapter_ids` (int32/int64, shape [batch]). At every read of every adapted site
the adapters' parallel branches (see `insert_lora`) are replaced by one routed branch over the site's factors,
stacked in adapter order:

    y' = y + s[id]·B[id]·(A[id]·x)  per row  =  lora_expand(y, lora_shrink(x, A, id), B, s, id)   (lora_fx.ops)
    A = stack(pad(A_k, R)): (K, R, in),   B = stack(pad(B_k, R)): (K, out, R),   s = stack(s_k): (K,)

R is the site's largest rank; a smaller rank is zero-padded (zero rows of A and columns of B are exact), and an
adapter without the site is zeros with s = 0. A row whose adapter has s = 0 at the site (no such site, inactive,
disabled) is routed as -1, so it never reads that adapter's factors and equals the base exactly, whatever they hold.
Linear sites only (nn.Linear, HF Conv1D, raw weights read by linear/matmul): each read sees ΔW in its own layout
through its chain of transposes, slices and casts, as the linear kind reads it (`lora_fx.sites.linear`), with the
batch rows in dim 0 of its input. The routing nodes of a site sit just before its first read, so a model's blocks
stay blocks (`lora_fx.blocks(mixed)`), each taking the checked ids as one more input.

The stacks are built from the adapters' own parameters in every forward (measured: 0.3% of a 16 x 128-token
forward at K = 16; see benchmarks/results/mixed_batch.md): gradients reach each adapter's A and B, optimizer
steps and hot swaps show at once, and torch.compile sees plain tensors (adapter_ids values and batch size never
recompile). In training mode, each adapter keeps its own LoRA dropout: adapters with different rates project their
own dropped-out inputs. The pass runs on graphs whose state is `routed` (see `lora_fx.derived.mixed_batch`).
"""

from __future__ import annotations

import math
from collections import defaultdict

import sympy
import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult
from torch.utils import _pytree as pytree

from lora_fx.errors import AdapterError
from lora_fx.match import bind
from lora_fx.ops.mixed_lora import CHECK_IDS_OP, EXPAND_OP, SHRINK_OP
from lora_fx.sites import Read, Site, tensor_names, variant_of
from lora_fx.sites.linear import LinearForm, delta_factors, read_factors
from lora_fx.sites.views import replay, value
from lora_fx.state import META_KEY, GraphState, inherit_meta, tag_of

aten = torch.ops.aten
ADAPTER_IDS = "adapter_ids"
ROUTED = "*"                # the "adapter" tag of routed nodes (no adapter name can be "*")
# roles of the nodes insert_lora adds; what routing leaves of them unused is erased
_FACTOR_ROLES = {"lora_A", "lora_B", "scale", "scale_value", "active", "mask_A", "mask_B"}
_BRANCH_ROLES = _FACTOR_ROLES | {"dropout", "transpose", "slice", "cast", "down", "scale_mul", "up", "add"}


def check_stackable(gm: fx.GraphModule, state: GraphState, names: list[str]) -> None:
    """No adapter is DoRA, every site is a linear one, and its factors agree in features, dtype and device
    across the adapters; reports every problem."""
    problems = []
    by_site = defaultdict(dict)
    for name in names:
        variant = variant_of(state.specs[name])
        if variant.unstackable:
            problems.append(f"adapter {name!r} is a {variant.name} adapter: mixed_batch routes plain LoRA adapters "
                            f"only ({variant.unstackable})")
            continue
        for key in state.sites[name]:
            site = state.site_info[key]
            if site.kind != "linear":
                problems.append(f"adapter {name!r} adapts {key!r}, a site of kind {site.kind!r}: mixed_batch routes "
                                f"linear sites only (nn.Linear, HF Conv1D, weights read by linear/matmul)")
                continue
            name_A, name_B, _ = tensor_names(site, name)
            by_site[key][name] = (gm.get_parameter(name_A), gm.get_parameter(name_B))
    describe = lambda t: f"{tuple(t.shape)} {t.dtype} on {t.device}"
    for fqn, factors in by_site.items():
        kinds = {(A.shape[1], B.shape[0], A.dtype, B.dtype, A.device, B.device) for A, B in factors.values()}
        if len(kinds) > 1:
            shown = "; ".join(f"{name}: A {describe(A)}, B {describe(B)}" for name, (A, B) in factors.items())
            problems.append(f"site {fqn!r}: the adapters' factors cannot be stacked ({shown}); they need equal "
                            f"in/out features, dtype and device")
    if problems:
        raise AdapterError("cannot mix these adapters in one batch:\n  - " + "\n  - ".join(problems))


class _Nodes:
    """Creates tagged nodes with the module stack of `source` (None: the root's)."""

    def __init__(self, graph: fx.Graph, source: fx.Node | None, site: str):
        self.graph, self.source, self.site = graph, source, site

    def __call__(self, role: str, target, *args, **kwargs) -> fx.Node:
        node = self.graph.call_function(target, args, kwargs)
        if self.source is not None:
            inherit_meta(node, self.source)
        node.meta[META_KEY] = {"adapter": ROUTED, "site": self.site, "role": role}
        return node


def route_rows(gm: fx.GraphModule) -> PassResult:
    """Replace every adapted read's branches by one branch routed per row by the new `adapter_ids` input."""
    state: GraphState = gm.meta[META_KEY]
    adapters = list(state.specs)
    if not adapters:
        return PassResult(gm, modified=False)            # nothing to route (every adapter deleted, or merged)
    check_stackable(gm, state, adapters)                # adapters added to a mixed graph later too
    graph = gm.graph
    adapter_ids, batch_input = _add_input(graph)
    prologue = [n for n in graph.nodes if n.op == "placeholder" or tag_of(n).get("role") in _FACTOR_ROLES]
    with graph.inserting_before(prologue[-1].next):      # after the inputs and the factors, in the root
        ids = _Nodes(graph, None, "")("adapter_ids", CHECK_IDS_OP, adapter_ids, batch_input, len(adapters))
    factors = {(tag_of(n)["site"], tag_of(n)["adapter"], tag_of(n)["role"]): n for n in graph.nodes
               if tag_of(n).get("role") in ("lora_A", "lora_B", "scale") and n.op == "get_attr"}
    dropped = {(tag_of(n)["site"], tag_of(n)["adapter"]) for n in graph.nodes if tag_of(n).get("role") == "dropout"}
    order = {node: index for index, node in enumerate(graph.nodes)}
    for key, site in bind(gm, graph, state.adapted_sites()).items():     # the sites this mode reads
        dropouts = {a: state.specs[a].dropout if (key, a) in dropped else 0.0 for a in adapters
                    if (key, a, "lora_A") in factors}
        first = min((read.node for read in site.reads), key=order.__getitem__)
        with graph.inserting_before(first):              # inside the site's block, after the block's inputs
            stacks = _stacks(gm, _Nodes(graph, first, key), site, adapters, factors, ids, dropouts)
        for read in site.reads:
            _route(graph, read, site, stacks, batch_input)
    for node in reversed(graph.nodes):
        if tag_of(node).get("role") in _BRANCH_ROLES and tag_of(node).get("adapter") != ROUTED and not node.users:
            graph.erase_node(node)
    graph.lint()
    return PassResult(gm, modified=True)


def _add_input(graph: fx.Graph) -> tuple[fx.Node, fx.Node]:
    """A new last placeholder `adapter_ids` (a keyword input of the forward), and the first tensor input."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if any(n.target == ADAPTER_IDS for n in placeholders):
        raise AdapterError(f"the model already takes an input named {ADAPTER_IDS!r}, the input mixed_batch adds")
    tensors = [n for n in placeholders if isinstance(n.meta.get("val"), torch.Tensor)]
    if not (tensors or placeholders):
        raise AdapterError("mixed_batch needs a model with a tensor input whose dim 0 is the batch")
    with graph.inserting_after(placeholders[-1]) if placeholders else graph.inserting_before(None):
        node = graph.placeholder(ADAPTER_IDS)
    codegen = graph._codegen
    if isinstance(codegen, fx.graph._PyTreeCodeGen):        # torch.export graph: its input spec gains the keyword
        info = codegen.pytree_info
        args, kwargs = pytree.tree_unflatten(list(range(info.in_spec.num_leaves)), info.in_spec)
        in_spec = pytree.tree_structure((args, {**kwargs, ADAPTER_IDS: info.in_spec.num_leaves}))
        graph._codegen = fx.graph._PyTreeCodeGen(fx.graph._PyTreeInfo(
            [*info.orig_args, ADAPTER_IDS], in_spec, info.out_spec))
    return node, (tensors or placeholders)[0]


class _Stacks:
    def __init__(self, A, B, scales, ids, groups):
        self.A, self.B, self.scales, self.ids, self.groups = A, B, scales, ids, groups


def _stacks(gm: fx.GraphModule, make: _Nodes, site: Site, adapters: list[str], factors: dict, ids: fx.Node,
            dropouts: dict) -> _Stacks:
    """A (K, R, in), B (K, out, R), s (K,) stacked in adapter order; the row ids routed at this site; and the
    dropout groups [(p, ids of its rows)]. `dropouts` holds the rate of each adapter that has the site."""
    fqn = site.key
    present = list(dropouts)
    ranks = {a: gm.get_parameter(factors[(fqn, a, "lora_A")].target).shape[0] for a in present}
    rank = max(ranks.values())
    first = present[0]
    A_list, B_list, s_list = [], [], []
    for adapter in adapters:
        if adapter not in ranks:
            A_list.append(make("zeros_A", aten.new_zeros.default, factors[(fqn, first, "lora_A")],
                               [rank, site.in_features]))
            B_list.append(make("zeros_B", aten.new_zeros.default, factors[(fqn, first, "lora_B")],
                               [site.out_features, rank]))
            s_list.append(make("zeros_s", aten.new_zeros.default, factors[(fqn, first, "scale")], []))
            continue
        A, B = factors[(fqn, adapter, "lora_A")], factors[(fqn, adapter, "lora_B")]
        pad = rank - ranks[adapter]
        A_list.append(make("pad_A", aten.constant_pad_nd.default, A, [0, 0, 0, pad]) if pad else A)  # (R, in)
        B_list.append(make("pad_B", aten.constant_pad_nd.default, B, [0, pad]) if pad else B)        # (out, R)
        s_list.append(factors[(fqn, adapter, "scale")])
    A_stack = make("stack_A", aten.stack.default, A_list)                    # (K, R, in)
    B_stack = make("stack_B", aten.stack.default, B_list)                    # (K, out, R)
    scales = make("stack_s", aten.stack.default, s_list)                     # (K,)
    index = make("index", aten.clamp.default, ids, 0)
    on = make("on", aten.ne.Scalar, make("row_scale", aten.index.Tensor, scales, [index]), 0)
    site_ids = make("site_ids", aten.where.ScalarOther, on, ids, -1)       # -1 where s[id] = 0
    rates = sorted(set(dropouts.values()))
    groups = []
    for rate in rates:
        if len(rates) == 1:
            groups.append((rate, site_ids))
            continue
        members = [adapters.index(a) for a in present if dropouts[a] == rate]
        member = make("member", aten.eq.Scalar, ids, members[0])
        for k in members[1:]:
            member = make("member", aten.logical_or.default, member, make("member", aten.eq.Scalar, ids, k))
        groups.append((rate, make("group_ids", aten.where.ScalarOther, member, site_ids, -1)))
    return _Stacks(A_stack, B_stack, scales, site_ids, groups)


_FLATTENS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def _rows_are_batch(x, batch: fx.Node) -> bool:
    """Whether dim 0 of `x` indexes the batch's rows: its size is the batch input's dim 0, or `x` flattens leading
    dims of a tensor whose dim 0 does (x.view(-1, f) of (B, T, f)). Sizes compare as symbols (dynamic captures).
    torch.fx graphs carry no shapes: there dim 0 is taken to be the batch, as for the input itself."""
    if x is batch or "val" not in batch.meta:
        return True
    value, rows = x.meta.get("val") if isinstance(x, fx.Node) else None, batch.meta["val"].shape[0]
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return False
    if _size_expr(value.shape[0]) == _size_expr(rows):
        return True
    if x.op != "call_function" or x.target not in _FLATTENS or not isinstance(x.args[0], fx.Node):
        return False
    source = x.args[0].meta.get("val")
    leading = [math.prod(_size_expr(d) for d in source.shape[:k]) for k in range(2, source.dim() + 1)] \
        if isinstance(source, torch.Tensor) else []
    return any(sympy.simplify(size - _size_expr(value.shape[0])) == 0 for size in leading) and \
        _rows_are_batch(x.args[0], batch)


def _size_expr(size) -> sympy.Expr:
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(size)


def _route(graph: fx.Graph, read: Read, site: Site, stacks: _Stacks, batch: fx.Node) -> None:
    """Replace the chain of adapter `add`s on `read` by one routed branch: ΔW = L·R per adapter, as the stacks
    (K, ·, ·) of L and R replayed through the read's views (see `lora_fx.sites.linear`), then
    x·ΔWᵀ = expand(shrink(x, R), L) or x·ΔW = expand(shrink(x, Lᵀ), Rᵀ)."""
    chain = []
    node = read.node
    while adds := [u for u in node.users if tag_of(u).get("role") == "add" and u.args[0] is node]:
        node = adds[0]
        chain.append(node)
    if not chain:
        return
    form: LinearForm = read.detail
    if form.weight_first:
        raise AdapterError(f"site {site.key!r} is read as W @ x ({read.node.name}): its batch is not dim 0 of the "
                           f"input, so mixed_batch cannot route its rows")
    if not _rows_are_batch(read.node.args[form.input_index], batch):
        raise AdapterError(f"site {site.key!r} is read ({read.node.name}) with an input whose dim 0 is not the batch "
                           f"(its rows were transposed or reshaped away from the batch), so mixed_batch cannot route "
                           f"its rows")
    make = _Nodes(graph, read.node, site.key)
    add = lambda role, target, args, kwargs=None: make(role, target, *args, **(kwargs or {}))   # as the kinds add
    with graph.inserting_before(chain[0]):
        left, right = delta_factors(site, stacks.A, stacks.B, lead=1)      # A (K, R, in), B (K, out, R) stacked
        for view in read.chain:
            left, right = replay(view, left, right, add)
        down, up = (value(factor, add) for factor in read_factors(form, left, right))  # (K, R, in), (K, out, R)
        x = read.node.args[form.input_index]
        h = None
        for rate, ids in stacks.groups:
            dropped = make("dropout", aten.dropout.default, x, rate, True) if rate > 0 else x
            part = make("shrink", SHRINK_OP, dropped, down, ids)                         # (..., R)
            h = part if h is None else make("sum", aten.add.Tensor, h, part)
        out = make("expand", EXPAND_OP, read.node, h, up, stacks.scales, stacks.ids)    # (..., out)
    chain[-1].replace_all_uses_with(out)

