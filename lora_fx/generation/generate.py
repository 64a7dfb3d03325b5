"""`generate`: greedy decoding and sampling on a lora_fx graph module, as transformers' `generate` does them.

    tokens = gm.generate(ids, attention_mask=mask, max_new_tokens=32)                      # greedy
    tokens = gm.generate(ids, max_new_tokens=32, do_sample=True, top_p=0.9, temperature=0.7)
    tokens = mixed.generate(ids, adapter_ids=torch.tensor([0, 1, -1]), max_new_tokens=32)  # an adapter per row

The arguments are transformers' (`GenerationConfig` fields, or a `generation_config`), and so are the results:
the token tensor, or `GenerateDecoderOnlyOutput` with `return_dict_in_generate=True` (`scores` and `logits` where
asked). Everything but the model calls is transformers' own code, run on the captured model's copy (the graph
module's template): the generation config merged with the model's, special tokens, the default attention mask,
the positions, the lengths, the logits processors and the stopping criteria. So from the same seed the tokens
are transformers' tokens. The model calls are the graph module's decoding programs (`lora_fx.generation.programs`):
one prefill over the prompt, then one decode step per new token on the KV cache, in eval mode whatever mode the
graph module is in (its mode is not changed), with its adapters as they are at the call (`set_active`, `disabled`,
hot swaps and new adapters all show; none captures again). `compile=True` runs the decode step through
`torch.compile(fullgraph=True, dynamic=True)`, compiled once per graph: new prompts, batch sizes, `adapter_ids`,
adapter switches and hot swaps never recompile it.

Greedy search and multinomial sampling are built; beam search, assisted and contrastive decoding, and outputs of
attentions or hidden states are refused, naming the argument.
"""

from __future__ import annotations

import torch

from lora_fx.distributed import refuse_if_sharded
from lora_fx.errors import CallError
from lora_fx.generation.hoist import split_weight_prologue
from lora_fx.generation.programs import DECODE, PREFILL, decoding_problem, positions, unflatten
from lora_fx.graph_cache import GraphKey
from lora_fx.derived.mixed_batch import ADAPTER_IDS, is_mixed
from lora_fx.state import state_of

_UNSUPPORTED_OUTPUTS = ("output_attentions", "output_hidden_states")


def generate(gm, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             adapter_ids: torch.Tensor | None = None, compile: bool = False, generation_config=None, streamer=None,
             **kwargs):
    """Decode from `input_ids` (batch, length); see the module docstring. `adapter_ids` (batch,) picks each row's
    adapter on a `lora_fx.mixed_batch` graph (-1: the base model)."""
    from transformers import LogitsProcessorList, StoppingCriteriaList
    from transformers.generation import GenerateDecoderOnlyOutput

    state = state_of(gm)
    model = gm._lora_fx_template
    problem = decoding_problem(model, state)
    if problem is not None:
        raise CallError(f"cannot generate: {problem}")
    refuse_if_sharded(gm, "generate", "generate before sharding, or on an unsharded copy")
    _check_ids(input_ids, attention_mask)
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    routing = _routing(gm, is_mixed(gm), adapter_ids, input_ids)

    config, attention_mask = _settings(model, generation_config, kwargs, input_ids, attention_mask)
    batch, length = input_ids.shape
    processors = model._get_logits_processor(config, input_ids_seq_length=length, encoder_input_ids=input_ids,
                                             logits_processor=LogitsProcessorList(), device=input_ids.device,
                                             model_kwargs={"attention_mask": attention_mask})
    criteria = model._get_stopping_criteria(config, StoppingCriteriaList())

    prefill = gm.graph_view(GraphKey(False, PREFILL))
    prologue, step = decode_steps(gm.graph_view(GraphKey(False, DECODE)), compile)
    routed = (routing,) if routing is not None else ()
    routing = {ADAPTER_IDS: routing} if routing is not None else {}
    scores = () if config.return_dict_in_generate and config.output_scores else None
    raw_logits = () if config.return_dict_in_generate and config.output_logits else None
    pad = config._pad_token_tensor
    has_eos = any(hasattr(criterion, "eos_token_id") for criterion in criteria)
    unfinished = torch.ones(batch, dtype=torch.long, device=input_ids.device)
    sequences, position_ids = input_ids, positions(attention_mask)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    with torch.no_grad():
        logits, cache = prefill(input_ids, attention_mask, position_ids, **routing)
        hoisted = prologue()
        while True:
            next_logits = logits[:, -1].to(copy=True, dtype=torch.float32)
            next_scores = processors(sequences, next_logits)
            if scores is not None:
                scores += (next_scores,)
            if raw_logits is not None:
                raw_logits += (next_logits,)
            if config.do_sample:
                tokens = torch.multinomial(torch.softmax(next_scores, dim=-1), num_samples=1).squeeze(1)
            else:
                tokens = torch.argmax(next_scores, dim=-1)
            if has_eos:
                tokens = tokens * unfinished + pad.to(tokens.device) * (1 - unfinished)
            sequences = torch.cat([sequences, tokens[:, None]], dim=-1)
            if streamer is not None:
                streamer.put(tokens.cpu())
            unfinished = unfinished & ~criteria(sequences, scores)
            if unfinished.max() == 0:
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=-1)
            position_ids = position_ids[:, -1:] + 1
            logits, *cache = step(tokens[:, None], attention_mask, position_ids, *cache, *routed, *hoisted)
    if streamer is not None:
        streamer.end()
    if config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=sequences, scores=scores, logits=raw_logits,
                                         cache=unflatten(tuple(cache), model.config))
    return sequences


def _settings(model, generation_config, kwargs: dict, input_ids: torch.Tensor, attention_mask):
    """(the call's GenerationConfig, its attention mask) as transformers' `generate` prepares them, checked against
    what lora_fx decodes and the model's context."""
    from transformers.generation.configuration_utils import GenerationMode

    def unset(name: str) -> bool:            # by the call, its generation_config and the model's
        return all(getattr(source, name, None) is None for source in (generation_config, model.generation_config)) \
            and kwargs.get(name) is None

    has_default_max_length, has_default_min_length = unset("max_length"), unset("min_length")
    config, unused = model._prepare_generation_config(generation_config, **kwargs)
    mode = config.get_generation_mode()
    if unused:
        raise CallError(f"generate got argument(s) {sorted(unused)} that are not generation settings "
                        f"(transformers.GenerationConfig fields); the model inputs are input_ids and attention_mask")
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        raise CallError(f"lora_fx generates by greedy search and sampling; these settings ask for {mode.value} "
                        f"(num_beams={config.num_beams}, penalty_alpha={config.penalty_alpha}, "
                        f"dola_layers={config.dola_layers}): use num_beams=1")
    asked = [name for name in _UNSUPPORTED_OUTPUTS if getattr(config, name)]
    if asked or (config.num_return_sequences or 1) != 1:
        raise CallError(f"lora_fx's generate returns sequences, scores and logits; it does not support "
                        f"{asked or ['num_return_sequences > 1']}")
    batch, length = input_ids.shape
    model._prepare_special_tokens(config, attention_mask is not None, device=input_ids.device, batch_size=batch)
    if attention_mask is None:
        attention_mask = model._prepare_attention_mask_for_generation(input_ids, config, {})
    config = model._prepare_generated_length(config, has_default_max_length, has_default_min_length, "input_ids",
                                             length, input_ids)
    model._validate_generated_length(config, length, has_default_max_length)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and config.max_length > context:
        raise CallError(f"a prompt of {length} tokens plus up to {config.max_length - length} new ones is "
                        f"{config.max_length} positions, past the model's context length "
                        f"(max_position_embeddings={context}): ask for fewer new tokens or a shorter prompt")
    return config, attention_mask


def decode_steps(view, compile: bool):
    """(prologue, step) of the decode view's current graph (see `lora_fx.generation.hoist`), made once per graph:
    `prologue()` gives the weight-only values, `step(*flat_inputs, *hoisted)` one token. With `compile`, the step
    runs through `torch.compile(fullgraph=True, dynamic=True)`, compiled once per graph."""
    cached = view.__dict__.get("_lora_fx_steps")
    if cached is None or cached["graph"] is not view.graph:
        prologue, step, _ = split_weight_prologue(view)
        cached = view.__dict__["_lora_fx_steps"] = {"graph": view.graph, "prologue": prologue, "step": step}
    if compile and "compiled" not in cached:
        cached["compiled"] = torch.compile(cached["step"], fullgraph=True, dynamic=True)
    return cached["prologue"], cached["compiled" if compile else "step"]


def _check_ids(input_ids, attention_mask) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point() \
            or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise CallError(f"input_ids must be a 2-D integer tensor (batch, length), got "
                        f"{_describe(input_ids)}")
    if input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise CallError(f"input_ids must hold at least one token per row and one row, got shape "
                        f"{tuple(input_ids.shape)}")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.shape != input_ids.shape):
        raise CallError(f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}, got "
                        f"{_describe(attention_mask)}")


def _routing(gm, mixed: bool, adapter_ids, input_ids: torch.Tensor):
    """The checked `adapter_ids` of a mixed-batch graph (None for any other graph)."""
    from lora_fx.ops import check_adapter_ids

    if not mixed:
        if adapter_ids is not None:
            raise CallError("adapter_ids picks an adapter per row on a graph made by lora_fx.mixed_batch; this graph "
                            "runs its active adapters on every row (use set_active, or derive a mixed_batch graph)")
        return None
    if adapter_ids is None:
        raise CallError(f"this mixed-batch graph needs adapter_ids: one adapter index per row (batch "
                        f"{input_ids.shape[0]}), -1 for the base model; its adapters are {list(state_of(gm).specs)}")
    return check_adapter_ids(adapter_ids, input_ids, len(state_of(gm).specs))


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dim()}-D {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
