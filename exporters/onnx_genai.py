"""ONNX for onnxruntime-genai: a decoder with a KV cache, and the `genai_config.json` that describes it.

    lora_fx.export_onnx(gm, "out/genai", generation=True)                  # merged: the active adapters folded in
    lora_fx.export_onnx(gm, "out/genai", generation=True, merged=False)    # LoRA weights as overridable inputs
    lora_fx.export_onnx_adapter(gm, "out/genai/code.onnx_adapter", adapter="code")

The directory holds `model.onnx` and `genai_config.json`. The model is the graph module's `decoder` program
(`lora_fx.generation.programs`): any number of new tokens after a cache of any length, onnxruntime-genai's names —

    inputs   input_ids [batch, new], attention_mask [batch, past + new], position_ids [batch, new],
             past_key_values.{i}.key / .value [batch, kv_heads, past, head_size]
    outputs  logits [batch, new, vocab], present.{i}.key / .value [batch, kv_heads, past + new, head_size]

with batch, sequence and past lengths dynamic, ONNX IR version 10 (what onnxruntime-genai's runtime reads).
Unmerged, every adapted site holds one LoRA slot whose factors are graph inputs named by PEFT's keys, with the
active adapter as their defaults (see `lora_fx.exporters.onnx`): `export_onnx_adapter` files of any of the graph's
adapters load through `onnxruntime_genai.Adapters` and switch per generator. A mixed-batch graph exports its
decoder with `adapter_ids` [batch] as one more input, for plain onnxruntime decoding loops (onnxruntime-genai
does not pass it, so no `genai_config.json` is written). After writing, the file runs once in onnxruntime and is
compared with torch, so a silently wrong file is never left behind.

onnxruntime-genai's wheel depends on the CPU `onnxruntime` package, which shares its module with `onnxruntime-gpu`:
run it in an environment of its own (`pip install "lora_fx[genai]"`, see the README).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import fx

from lora_fx.errors import ExportError
from lora_fx.graph_cache import GraphKey
from lora_fx.generation.programs import DECODER, cache_roles, decoder_shapes, decoding_problem
from lora_fx.state import state_of

IR_VERSION = 10
GENAI_TYPES = ("chatglm", "gemma", "gpt2", "granite", "llama", "mistral", "nemotron", "olmo", "qwen2", "qwen3",
               "smollm3")        # model types onnxruntime-genai 0.18 names; any other decoder-only model: "decoder"


def export_generation(gm: fx.GraphModule, path, merged: bool, verify: bool, atol: float, rtol: float) -> Path:
    """Write the onnxruntime-genai directory at `path` (created if missing); see the module docstring."""
    from lora_fx.exporters.onnx import (_known_exporter_noise, _verify, decompose_custom_ops, onnx_program,
                                        unmerged_view, with_export_passes)
    from lora_fx.derived.merge import merge
    from lora_fx.derived.mixed_batch import ADAPTER_IDS, is_mixed, routed_copy

    state = state_of(gm)
    problem = decoding_problem(gm._lora_fx_template, state)
    if problem is not None:
        raise ExportError(f"cannot export a decoder for generation: {problem}")
    roles = cache_roles(gm._lora_fx_template.config)
    if set(roles) != {"key", "value"}:
        raise ExportError("onnxruntime-genai decoders pass attention keys and values between steps; this model's "
                          "cache also holds linear-attention (state-space) states")
    directory = _directory(path)
    mixed = is_mixed(gm)
    module = routed_copy(gm) if mixed else merge(gm) if merged else unmerged_view(gm)
    with_export_passes(module, decompose_custom_ops)
    view = module.graph_view(GraphKey(False, DECODER))
    args, _ = DECODER.examples(module, state_of(module))
    kwargs = {ADAPTER_IDS: torch.arange(args[0].shape[0]) % (len(state.specs) + 1) - 1} if mixed else {}
    names = _input_names(roles) + ([ADAPTER_IDS] if mixed else [])
    shapes = dict(zip(("input_ids", "attention_mask", "position_ids", "cache"),
                      decoder_shapes(gm._lora_fx_template.config)))
    if mixed:
        shapes[ADAPTER_IDS] = {0: torch.export.Dim.DYNAMIC}
    with torch.no_grad():
        expected = view(*args, **kwargs)
        with _known_exporter_noise():
            exported = torch.export.export(view, args, kwargs, dynamic_shapes=shapes, strict=False,
                                           prefer_deferred_runtime_asserts_over_guards=True)
        program = onnx_program(gm, exported, slots=not (merged or mixed), input_names=names,
                               output_names=_output_names(roles))
    program.model.ir_version = min(program.model.ir_version, IR_VERSION)
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=".lora_fx-export-") as scratch:
        staged = Path(scratch)
        program.save(str(staged / "model.onnx"))
        if verify:
            _verify(staged / "model.onnx", args, kwargs, expected, atol, rtol)
        if not mixed:
            (staged / "genai_config.json").write_text(json.dumps(genai_config(gm, roles), indent=2) + "\n")
        directory.mkdir(exist_ok=True)
        for produced in staged.iterdir():
            os.replace(produced, directory / produced.name)
    return directory


def genai_config(gm: fx.GraphModule, roles: tuple[str, ...]) -> dict:
    """onnxruntime-genai's description of the decoder: its geometry, the names of its inputs and outputs, the
    model's special tokens and context length, and greedy search by default."""
    config = gm._lora_fx_template.config
    generation = gm._lora_fx_template.generation_config
    heads = config.num_attention_heads
    eos = generation.eos_token_id if generation.eos_token_id is not None else config.eos_token_id
    pad = generation.pad_token_id if generation.pad_token_id is not None else config.pad_token_id
    context = getattr(config, "max_position_embeddings", None) or 4096
    return {
        "model": {
            "type": config.model_type if config.model_type in GENAI_TYPES else "decoder",
            "bos_token_id": config.bos_token_id if config.bos_token_id is not None else 0,
            "eos_token_id": eos if eos is not None else 0,
            "pad_token_id": pad if pad is not None else (eos if eos is not None else 0),
            "context_length": context,
            "vocab_size": config.vocab_size,
            "decoder": {
                "filename": "model.onnx",
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": getattr(config, "head_dim", None) or config.hidden_size // heads,
                "hidden_size": config.hidden_size,
                "num_attention_heads": heads,
                "num_hidden_layers": len(roles) // 2,
                "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def _input_names(roles: tuple[str, ...]) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids",
            *(f"past_key_values.{i // 2}.{role}" for i, role in enumerate(roles))]


def _output_names(roles: tuple[str, ...]) -> list[str]:
    return ["logits", *(f"present.{i // 2}.{role}" for i, role in enumerate(roles))]


def _directory(path) -> Path:
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"cannot write an onnxruntime-genai model to {str(directory)!r}: it is a file (generation "
                          f"exports write a directory: model.onnx and genai_config.json)")
    if not directory.parent.is_dir() or not os.access(directory.parent, os.W_OK):
        raise ExportError(f"cannot write {str(directory)!r}: {str(directory.parent)!r} is not a writable directory")
    return directory
