"""The demo model and task: a small Llama built from a config (no downloads) learning to count.

Sequences are runs of consecutive tokens modulo the vocabulary (7, 8, 9, ...); the frozen, randomly initialised
base model cannot predict them, and an `all-linear` LoRA adapter learns to within a few dozen steps.
"""

from __future__ import annotations

import torch


def demo_model(layers: int = 2, hidden: int = 64, vocab: int = 64, seed: int = 0):
    """A small `LlamaForCausalLM` from a config, and example inputs to capture it with."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(config)
    return model, (counting_batch(torch.Generator().manual_seed(seed), vocab),), {"use_cache": False}


def counting_batch(generator: torch.Generator, vocab: int, batch: int = 16, seq: int = 32) -> torch.Tensor:
    """(batch, seq) token ids, each row `start, start+1, ...` modulo `vocab`."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    return (start + torch.arange(seq)) % vocab


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting ids[:, t+1] from logits[:, t]."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
