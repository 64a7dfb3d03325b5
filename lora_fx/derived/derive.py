"""derive: the one way a derived graph module is made from another.

A derived module (`merge`, `quantize_base`, `mixed_batch`, the exporters' unmerged slot view) is a copy of its source
with its own graphs and buffers, base parameters that are new frozen objects sharing the source's storage (so flags
never couple and the user's model is never written), and the source's state, which the caller then changes and
commits (`lora_fx.commit`) — rebuilding every graph from the plain captures.
"""

from __future__ import annotations

import copy as copying

import torch
from torch import fx, nn

from lora_fx.quantize import frozen
from lora_fx.state import is_lora_state_name


def derive(gm: fx.GraphModule, replace: dict[str, torch.Tensor] | None = None, *, copy: bool = False,
           share_lora: bool = False) -> fx.GraphModule:
    """A deep copy of `gm` (its own graphs and buffers) whose base parameters are new frozen objects sharing `gm`'s
    storage (copied with `copy`), with the tensors in `replace` ({name: tensor}) swapped in; its LoRA parameters
    are copies, or `gm`'s own objects with `share_lora`. The state is `gm`'s: the caller commits what changes."""
    memo = {}
    for name, param in gm.named_parameters(remove_duplicate=False):
        if id(param) not in memo and (share_lora or not is_lora_state_name(name)):
            memo[id(param)] = param if is_lora_state_name(name) else frozen(param, copy=copy)
    result = copying.deepcopy(gm, memo)
    for name, weight in (replace or {}).items():
        owner, _, attr = name.rpartition(".")
        result.get_submodule(owner)._parameters[attr] = (
            weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False))
    return result
