"""What the integration tests share: a tiny Llama with a non-identity adapter, its PEFT twin holding the same
weights, a word-level tokenizer (no downloads), and token data."""

import copy

import peft
import tokenizers
import torch
import transformers

import lora_fx
from lora_fx import LoraSpec
from tests.conftest import VOCAB, randomize_lora, tiny_llama

SPEC = LoraSpec(rank=4, alpha=8.0)
LENGTH = 12


def token_rows(count: int = 16, seed: int = 0) -> list[dict]:
    """Causal-LM rows of LENGTH tokens: input_ids, attention_mask and labels (the ids)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        tokens = torch.randint(2, VOCAB, (LENGTH,), generator=generator)
        rows.append({"input_ids": tokens, "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": tokens})
    return rows


def model_and_graph(spec: LoraSpec = SPEC, inputs=("input_ids", "attention_mask", "labels")):
    """(the user's model, a graph of it with `spec`'s adapter made non-identity), captured with `inputs` of a batch
    of token_rows and use_cache=False."""
    torch.manual_seed(0)
    model = tiny_llama()
    batch = {name: torch.stack([row[name] for row in token_rows(2, seed=99)]) for name in inputs}
    gm = lora_fx.apply(model, spec, example_kwargs={**batch, "use_cache": False})
    randomize_lora(gm)
    return model, gm


def peft_config(spec: LoraSpec = SPEC) -> peft.LoraConfig:
    return peft.LoraConfig(target_modules="all-linear", r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout)


def peft_twin(model, gm, spec: LoraSpec = SPEC) -> peft.PeftModel:
    """PEFT on a copy of `model` with `spec`'s targets and `gm`'s LoRA weights."""
    return copy_lora(gm, peft.get_peft_model(copy.deepcopy(model), peft_config(spec)))


def copy_lora(gm, reference: peft.PeftModel) -> peft.PeftModel:
    """`reference` with `gm`'s LoRA weights copied in."""
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if param.requires_grad:
                params["base_model.model." + name].copy_(param)
    return reference


def lora_state(module) -> dict:
    """LoRA weights by lora_fx's names (PEFT's without the `base_model.model.` prefix)."""
    return {name.removeprefix("base_model.model."): param.detach().clone()
            for name, param in module.named_parameters() if ".lora_" in name}


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Tokens "t0".."t96" split on spaces; t0 pads, t1 ends."""
    model = tokenizers.models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0")
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", eos_token="t1",
                                                unk_token="t0")
