"""lower_adapted_reads: ops that read an adapted weight themselves are lowered to ordinary reads, and any read no
site kind accounts for is refused.

An adapted weight may be read in a mode by ops its site kind cannot rewrite: a fused kernel that takes the weight
as an argument (Mamba2's `mamba_split_conv1d_scan_combined` reads `out_proj.weight`) has a registered lowering
(`lora_fx.match.register_lowering`) into that op plus a linear read, which is then a site read; any other read
makes building the graph an error that names the op — never a silently partial adaptation.
"""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from lora_fx.errors import TargetError
from lora_fx.match import LOWERINGS, get_attrs, lowerable, op_names
from lora_fx.quantize import as_seen
from lora_fx.sites import kind_of
from lora_fx.state import building_of


def lower_adapted_reads(gm: fx.GraphModule) -> PassResult:
    """Lower every read of an adapted weight that has a lowering; refuse reads that neither a lowering nor the
    weight's site kind accounts for."""
    building = building_of(gm)
    problems, lowered, nodes = [], [], get_attrs(gm.graph)
    for site in building.state.adapted_sites():
        kind = kind_of(site)
        param = as_seen(gm.get_parameter(site.weight))
        for node in nodes.get(site.weight, ()):
            _, foreign, _ = kind.reads_of(node, param)
            if kind.selected_by == "parameters" and foreign:
                problems.append(f"parameter {site.key!r} is adapted, but in {building.mode} mode it is also read by "
                                f"{op_names(foreign)}, which its site kind cannot rewrite")
            elif unknown := [user for user in foreign if not lowerable(user, site.weight)]:
                problems.append(f"module {site.fqn!r} is adapted, but in {building.mode} mode its weight is also "
                                f"read by {op_names(unknown)}, which its {site.kind} site kind cannot rewrite")
            else:
                lowered += foreign
    if problems:
        raise TargetError("cannot build the graph:\n  - " + "\n  - ".join(problems))
    for node in lowered:
        LOWERINGS[node.target].lower(gm, node)
    return PassResult(gm, modified=bool(lowered))
