"""Generation: decoding with a KV cache on a lora_fx graph module's own graphs.

- `programs`: the prefill and one-token decode steps of a decoder-only language model, traced with the cache as
  inputs and outputs (graph-cache entries of the graph module, built with its adapters like every other graph).
- `generate`: transformers' `generate` (greedy search, sampling) over those steps, an adapter per row on
  mixed-batch graphs, the decode step compiled on request.
"""

from lora_fx.generation.generate import generate

__all__ = ["generate"]
