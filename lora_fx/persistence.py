"""How a `LoraGraphModule` is copied, pickled and loaded into.

- `deep_copy`: an independent module — tensors, template and state copied, the cached graphs copied node for node
  (nothing is captured again);
- `pickled` / `unpickle`: the module tree and attributes without capture artifacts, the template, the state and the
  mode; unpickling captures the current mode again (graphs are not a stable file format; code is);
- `unshare_changed_base_weights`: `load_state_dict` never writes a base weight in place, since it shares the user's
  storage.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from lora_fx.build import copy_graph
from lora_fx.graph_cache import CachedGraph, GraphKey
from lora_fx.quantize import is_quantized
from lora_fx.state import META_KEY, is_lora_state_name

# what `LoraGraphModule._setup` adds to a module's __dict__: rebuilt, never copied or pickled as such
OWN = ("_lora_fx_template", "_lora_fx_graphs", "_lora_fx_views", "_lora_fx_key", "_lora_fx_flags",
       "_lora_fx_artifacts", "_lora_fx_lock")
_GENERATED = ("_graph", "_code", "_in_spec", "_out_spec", "_lineno_map", "_prologue_start")


def deep_copy(gm: fx.GraphModule, cls: type, memo: dict) -> fx.GraphModule:
    """A copy of `gm` (a `cls`) sharing nothing with it."""
    copied = cls(nn.Module(), fx.Graph(), class_name=type(gm).__name__)
    memo[id(gm)] = copied
    skip = {*_GENERATED, *OWN}
    for name, value in gm.__dict__.items():
        if name not in skip:
            copied.__dict__[name] = copy.deepcopy(value, memo)
    copied._setup(copy.deepcopy(gm._lora_fx_template, memo), copied.meta[META_KEY], dict(gm._lora_fx_flags),
                  gm._lora_fx_key, set(gm._lora_fx_artifacts))
    copied.__dict__["_lora_fx_graphs"] = {
        key: CachedGraph(copy_graph(entry.plain), copy_graph(entry.graph),
                         {path: copy_graph(graph) for path, graph in entry.blocks.items()})
        for key, entry in gm._lora_fx_graphs.items()}
    copied._activate(gm._lora_fx_key)
    return copied


def pickled(gm: fx.GraphModule, cls: type) -> tuple:
    """`gm.__reduce__()`: rebuilt by `unpickle` as a `cls`."""
    artifacts = gm._lora_fx_artifacts
    skip = {*_GENERATED, "_wrapped_call", *OWN, *artifacts}
    attributes = {name: value for name, value in gm.__dict__.items() if name not in skip}
    attributes["_modules"] = {name: m for name, m in gm._modules.items() if name not in artifacts}
    own = {"template": gm._lora_fx_template, "flags": gm._lora_fx_flags, "mode": gm._lora_fx_key.mode}
    return unpickle, (cls, type(gm).__name__, attributes, own)


def unpickle(cls: type, class_name: str, attributes: dict, own: dict) -> fx.GraphModule:
    gm = cls(nn.Module(), fx.Graph(), class_name=class_name)
    gm.__dict__.update(attributes)
    gm._setup(own["template"], attributes["meta"][META_KEY], own["flags"], GraphKey(own["mode"]), artifacts=set())
    gm._capture([gm._lora_fx_key])
    return gm


def unshare_changed_base_weights(gm: nn.Module, state_dict: dict) -> None:
    """Give each base weight that `state_dict` would change storage of its own, so that loading it never writes the
    user's model (which shares the weight)."""
    for name, value in state_dict.items():
        if is_lora_state_name(name) or not isinstance(value, torch.Tensor):
            continue
        try:
            param = gm.get_parameter(name)
        except AttributeError:
            continue
        if is_quantized(param):         # quantized weights are this module's own, never the user's
            continue
        if value.shape == param.shape and not torch.equal(value.to(param.device, param.dtype), param):
            param.data = param.data.clone()
