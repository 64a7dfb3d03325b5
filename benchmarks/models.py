"""Benchmark models built from configs (no downloads)."""

import torch
import transformers

BATCH, SEQ = 4, 128


def llama(hidden: int = 512, layers: int = 4, vocab: int = 2000, seed: int = 0,
          kv_heads: int = 4) -> transformers.LlamaForCausalLM:
    """The Llama-like model of the performance issue: hidden 512, 4 layers, vocab 2000, 8 query heads sharing 4
    key/value heads (`kv_heads=8`: multi-head attention)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=kv_heads,
                                      max_position_embeddings=512)
    return transformers.LlamaForCausalLM(config)


def token_batch(vocab: int = 2000, batch: int = BATCH, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
