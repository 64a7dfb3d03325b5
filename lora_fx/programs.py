"""Programs: what a captured graph computes, and how it is traced from the model.

A model has one graph per *key* (see `lora_fx.graph_module.GraphKey`): a mode (training, eval), a program and a
shape variant. The program says which function of the model is traced and with which example inputs:

    FORWARD     the model's own forward, called as in the example inputs given to `capture`
    (decoding)  a prefill step and a one-token decode step with the model's cache as inputs and outputs
                (`lora_fx.generation.programs`)

Every program's graph is built from its plain capture and the adapter state by the same pipeline
(`lora_fx.build`), so every program of a model carries the same sites, adapters and parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lora_fx.trace import Traced, has_tensor, trace


@dataclass(frozen=True)
class Program:
    """Base of the programs: `name` shows in errors and warnings; `blocks` says whether its graph keeps the model's
    repeated blocks as modules of their own (see `lora_fx.blocks`)."""

    name: str
    blocks: bool = False

    def examples(self, gm, state) -> tuple[tuple, dict]:
        """The example inputs variant 0 of `gm` (whose graphs get `state`) is captured with."""
        raise NotImplementedError

    def trace(self, template: nn.Module, state, args: tuple, kwargs: dict) -> Traced:
        """The program's plain graph, traced from `template` (its tensors bound) on the example inputs."""
        raise NotImplementedError

    def constants(self, state) -> dict:
        """Non-tensor inputs that may be left out when calling (filled in with these values)."""
        return {}


@dataclass(frozen=True)
class Forward(Program):
    """The model's forward, as `capture` was given it."""

    name: str = "forward"
    blocks: bool = True

    def examples(self, gm, state) -> tuple[tuple, dict]:
        return state.example_args, dict(state.example_kwargs)

    def trace(self, template: nn.Module, state, args: tuple, kwargs: dict) -> Traced:
        return trace(template, state.tracer, args, kwargs, state.dynamic)

    def constants(self, state) -> dict:
        return {name: value for name, value in state.example_kwargs.items() if not has_tensor(value)}


FORWARD = Forward()
