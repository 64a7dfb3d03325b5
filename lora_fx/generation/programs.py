"""Decoding programs: a prefill step and a one-token decode step, with the model's KV cache as inputs and outputs.

For a transformers decoder-only language model (its `forward` takes `cache`, `use_cache` and `logits_to_keep`):

    prefill(input_ids, attention_mask, position_ids)          -> (logits, cache)     logits (batch, 1, vocab)
    decode(input_ids, attention_mask, position_ids, cache)    -> (logits, cache')    input_ids (batch, 1)

`cache` is a flat tuple (k_0, v_0, k_1, v_1, ...) of (batch, kv_heads, length, head_dim) tensors; `attention_mask` is
the 2-D mask over past and new tokens (batch, length + new) and `position_ids` (batch, new) the positions of the new
tokens, as transformers' `generate` computes them. Only the last position's logits are computed (`logits_to_keep=1`).
Inside the step the tuple becomes a `DynamicCache` of full-attention layers and the model runs as its own code:
each step appends to the cache with `cat` (a static preallocated cache would fix the batch size in the graph).
A sliding-window layer keeps every token and masks the old ones (its mask is the model's): the same attention.

Both steps are traced in eval mode with named dynamic dims — batch, new tokens and past length (from 0 up to the
context length) — so one graph of each serves every prompt length, batch size and position. Their graphs are built
from these plain captures by the same pipeline as the forward's (`lora_fx.build`): the same sites, adapters and
parameters.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from torch.export import Dim

from lora_fx.errors import CaptureError
from lora_fx.graph_cache import GraphKey
from lora_fx.programs import Program
from lora_fx.trace import Traced, trace_step

BATCH = Dim("batch", min=1)


def decoding_problem(model: nn.Module, state) -> str | None:
    """Why `model` (a graph module's template) cannot decode with these programs; None when it can."""
    name = type(model).__name__
    if state.tracer != "export":
        return f"{name} was traced with torch.fx; decoding needs a torch.export capture (pass example inputs)"
    can_generate = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    if not callable(can_generate) or config is None:
        return f"{name} is not a transformers language model (no `config`, no `can_generate`)"
    if not can_generate():
        return (f"{name} has no language-model head to decode with (transformers' can_generate() is False): "
                f"capture its *ForCausalLM class")
    if getattr(config, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder model; lora_fx decodes decoder-only language models"
    parameters = inspect.signature(type(model).forward).parameters
    accepted = set(parameters)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        accepted.add("use_cache")         # passed on to the language model through **kwargs (LLaVA's forward)
    missing = [name for name in ("cache", "use_cache", "logits_to_keep", "attention_mask") if name not in accepted]
    if missing:
        return f"{name}.forward takes no {missing}, which the decoding step passes"
    return None


def new_cache(config):
    """An empty DynamicCache laid out for the model (`config`'s layer types), each sliding-window or chunked
    attention layer made a full one (the model's mask hides what it would have dropped: the same attention)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    cache = DynamicCache(config=config)
    cache.layers = [DynamicLayer() if type(layer) is DynamicSlidingWindowLayer else layer for layer in cache.layers]
    return cache


def cache_roles(config) -> tuple[str, ...]:
    """What each tensor of the flat cache is, in order: "key"/"value" (batch, heads, length, head_dim) of an
    attention layer, "conv"/"recurrent" (batch, ...) states of a linear-attention (state-space) layer."""
    return tuple(role for layer in new_cache(config).layers for role in _layer_roles(layer))


def _layer_roles(layer) -> tuple[str, ...]:
    from transformers.cache_utils import DummyLayer, DynamicLayer, LinearAttentionCacheLayerMixin

    roles = ("key", "value") if isinstance(layer, DynamicLayer) else ()
    if isinstance(layer, LinearAttentionCacheLayerMixin):
        if layer.number_of_states != 1:
            raise CaptureError(f"the model's cache layer {type(layer).__name__} keeps {layer.number_of_states} "
                               f"state sets; lora_fx decodes layers with one")
        roles += ("conv", "recurrent")
    if not roles and not isinstance(layer, DummyLayer):
        raise CaptureError(f"the model's cache has {type(layer).__name__} layers, which lora_fx cannot pass between "
                           f"decoding steps (supported: attention key/value layers and linear-attention states)")
    return roles


def flatten(cache) -> tuple[torch.Tensor, ...]:
    """The cache's tensors in `cache_roles` order."""
    tensors = []
    for layer in cache.layers:
        for role in _layer_roles(layer):
            tensors.append({"key": lambda: layer.keys, "value": lambda: layer.values,
                            "conv": lambda: layer.conv_states[0], "recurrent": lambda: layer.recurrent_states[0]}
                           [role]())
    return tuple(tensors)


def unflatten(tensors: tuple[torch.Tensor, ...], config):
    """`flatten`'s inverse: a DynamicCache holding `tensors` as the state after the tokens they cover."""
    cache = new_cache(config)
    rest = iter(tensors)
    for layer in cache.layers:
        roles = _layer_roles(layer)
        if "key" in roles:
            keys, values = next(rest), next(rest)
            layer.keys, layer.values, layer.is_initialized, layer.device = keys, values, True, keys.device
        if "conv" in roles:
            conv, recurrent = next(rest), next(rest)
            layer.lazy_initialization(conv_states=conv, recurrent_states=recurrent, conv_kernel_size=conv.shape[-1])
            layer.conv_states[0], layer.recurrent_states[0] = conv.clone(), recurrent.clone()   # updated in place
            layer.has_previous_state[0] = True
    return cache


def _model_inputs(model, input_ids, attention_mask, position_ids, cache, first: bool) -> dict:
    """What transformers' `generate` passes to the model for these tokens: the model's own
    `prepare_inputs_for_generation` (it may drop the mask while decoding, as Mamba2's does), positions only where
    the forward takes them."""
    positions = {"position_ids": position_ids} if "position_ids" in inspect.signature(
        type(model).forward).parameters else {}
    return model.prepare_inputs_for_generation(input_ids, next_sequence_length=None if first else 1, cache=cache,
                                               attention_mask=attention_mask, use_cache=True, logits_to_keep=1,
                                               is_first_iteration=first, **positions)


def prefill_step(model, forward, input_ids, attention_mask, position_ids):
    cache = new_cache(model.config)
    out = forward(**_model_inputs(model, input_ids, attention_mask, position_ids, cache, first=True))
    return out.logits, flatten(out.cache)


def decode_step(model, forward, input_ids, attention_mask, position_ids, cache):
    cache = unflatten(cache, model.config)
    out = forward(**_model_inputs(model, input_ids, attention_mask, position_ids, cache, first=False))
    return out.logits, flatten(out.cache)


def decoder_step(model, forward, input_ids, attention_mask, position_ids, cache):
    out = forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  cache=unflatten(cache, model.config), use_cache=True)
    return out.logits, flatten(out.cache)


@dataclass(frozen=True)
class Prefill(Program):
    """The prompt through the model, from an empty cache."""

    name: str = "prefill"

    def examples(self, gm, state) -> tuple[tuple, dict]:
        ids = example_ids(gm, state)
        mask = torch.ones_like(ids)
        return (ids, mask, positions(mask)), {}

    def trace(self, template: nn.Module, state, args: tuple, kwargs: dict) -> Traced:
        shapes = ({0: Dim.AUTO, 1: Dim.AUTO},) * 3         # a length the model's code bounds: a shape variant
        return trace_step(template, prefill_step, args, shapes)


@dataclass(frozen=True)
class Decode(Program):
    """One new token per row after a cache of any length within the context (0 included)."""

    name: str = "decode"

    def examples(self, gm, state) -> tuple[tuple, dict]:
        prompt, _ = PREFILL.examples(gm, state)
        with torch.no_grad():
            _, cache = gm.graph_view(GraphKey(False, PREFILL)).lora_fx_run(*prompt, **routing_example(gm, prompt[0]))
        ids, mask, _ = prompt
        batch, length = ids.shape
        return (ids[:, -1:].contiguous(), torch.ones(batch, length + 1, dtype=mask.dtype, device=mask.device),
                torch.full((batch, 1), length, dtype=torch.long, device=ids.device), cache), {}

    def trace(self, template: nn.Module, state, args: tuple, kwargs: dict) -> Traced:
        past = past_dim(template.config)
        cache = tuple({0: BATCH, 2: past} if role in ("key", "value") else {0: BATCH}
                      for role in cache_roles(template.config))
        shapes = ({0: BATCH}, {0: BATCH, 1: past + 1}, {0: BATCH}, cache)
        return trace_step(template, decode_step, args, shapes, deferred=True)


def past_dim(config) -> Dim:
    """The decode step's past length: from 0 up to the context length less the new token, where the model has one
    (`generate` never goes past it). A model may slice a buffer of that length by it, as GPT-Neo's causal mask
    (`self.bias[:, :, past:past + 1, :past + 1]`): export then needs the bound."""
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    return Dim("past", min=0, max=context - 1) if isinstance(context, int) else Dim("past", min=0)


@dataclass(frozen=True)
class Decoder(Program):
    """Any number of new tokens after a cache of any length (0 included), with every position's logits: the one
    model onnxruntime-genai runs for the prompt and for each token (`lora_fx.exporters.onnx_genai`)."""

    name: str = "decoder"

    def examples(self, gm, state) -> tuple[tuple, dict]:
        (ids, mask, _, cache), _ = DECODE.examples(gm, state)
        ids = torch.cat([ids, ids], dim=1)                     # two new tokens: the length stays dynamic
        mask = torch.cat([mask, mask[:, :1]], dim=1)
        return (ids, mask, positions(mask)[:, -2:].contiguous(), cache), {}   # contiguous: no stride guards

    def trace(self, template: nn.Module, state, args: tuple, kwargs: dict) -> Traced:
        return trace_step(template, decoder_step, args, decoder_shapes(template.config), deferred=True)


def decoder_shapes(config) -> tuple:
    """The decoder's dynamic dims: batch, new tokens, total length (past + new) and past length, unconstrained."""
    every = Dim.DYNAMIC
    cache = tuple({0: every, 2: every} if role in ("key", "value") else {0: every} for role in cache_roles(config))
    return {0: every, 1: every}, {0: every, 1: every}, {0: every, 1: every}, cache


PREFILL, DECODE, DECODER = Prefill(), Decode(), Decoder()


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's position among the row's unmasked tokens, 0 at padding: what transformers' `generate` passes."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def example_ids(gm, state) -> torch.Tensor:
    """Token ids to capture the steps with: the captured example's (at least 2 x 2, the sizes torch.export keeps
    dynamic), or random ones in the vocabulary."""
    ids = state.example_kwargs.get("input_ids", state.example_args[0] if state.example_args else None)
    if (isinstance(ids, torch.Tensor) and ids.dim() == 2 and min(ids.shape) >= 2
            and not ids.is_floating_point()):
        return ids
    vocab = gm._lora_fx_template.config.vocab_size
    device = next(iter(gm.parameters())).device
    return torch.randint(0, vocab, (2, 4), generator=torch.Generator().manual_seed(0)).to(device)


def routing_example(gm, ids: torch.Tensor) -> dict:
    """{"adapter_ids": ...} for a mixed-batch graph (see `lora_fx.mixed_batch`), else {}."""
    from lora_fx.derived.mixed_batch import ADAPTER_IDS, is_mixed

    if not is_mixed(gm):
        return {}
    count = len(gm.meta["lora_fx"].specs)
    return {ADAPTER_IDS: torch.arange(ids.shape[0], device=ids.device) % (count + 1) - 1}
