"""The graph cache of a `LoraGraphModule`: one entry per `GraphKey` — the mode a graph runs in, the program it
computes (`lora_fx.programs`) and its shape variant — each a plain capture and the graph built from it and the
state, `build(plain, state)`. Entries are captured lazily, on first use, and rebuilt together by `lora_fx.commit`
whenever the state changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from lora_fx.programs import FORWARD, Program

AS_CAPTURED = "as captured"         # the mode of a model captured with submodules in mixed modes


@dataclass(frozen=True)
class GraphKey:
    """Which graph of a model: the mode it runs in (True: training, False: eval, or AS_CAPTURED), the program it
    computes (see `lora_fx.programs`), and its shape variant (0: the example's shapes; n: the n-th shape region a
    call needed since)."""

    mode: bool | str
    program: Program = FORWARD
    variant: int = 0

    @property
    def shown_by_owner(self) -> bool:
        """Whether the graph runs as the module's own forward, cut into the model's blocks (the module's block
        submodules run it); any other graph runs flat in a `GraphView`."""
        return self.program.blocks and self.variant == 0

    def describe(self) -> str:
        mode = {True: "training", False: "eval"}.get(self.mode, AS_CAPTURED)
        program = "" if self.program == FORWARD else f" {self.program.name}"
        return mode + program + (f" (shape variant {self.variant})" if self.variant else "")


@dataclass
class CachedGraph:
    plain: fx.Graph                 # as captured, no LoRA
    graph: fx.Graph                 # built from `plain` and the state: the root graph
    blocks: dict = field(default_factory=dict)      # block path -> the block's graph (empty: the graph is flat)
    compiled: dict | None = None    # what `recompile()` set for `graph` where it was shown, restored when shown again
    compiled_blocks: dict = field(default_factory=dict)    # block path -> the same, for the block's graph

