"""export_onnx(..., generation=True): a decoder with a KV cache in onnxruntime-genai's layout. Its greedy tokens in
onnxruntime (a plain decoding loop here) and in onnxruntime-genai itself (an environment of its own, see
genai_generate.py) equal gm.generate, for the base and for adapters switched on one loaded model."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import lora_fx
from lora_fx import ExportError, LoraSpec
from tests.conftest import ids, randomize_lora, tiny_gpt2, tiny_llama

GENAI_PYTHON = os.environ.get("LORA_FX_GENAI_PYTHON")     # .ci/run makes that environment and sets it


def two_adapters(build=tiny_llama):
    torch.manual_seed(0)
    gm = lora_fx.capture(build().eval(), (ids(),), {"use_cache": False})
    lora_fx.apply(gm, LoraSpec(targets="all-linear", rank=4, alpha=8.0, adapter="a"))
    lora_fx.apply(gm, LoraSpec(targets=["q_proj", "v_proj"] if build is tiny_llama else ["c_attn"], rank=2,
                               alpha=8.0, adapter="b"))
    randomize_lora(gm, std=0.3)
    return gm


def ort_greedy(directory: Path, prompt: torch.Tensor, new_tokens: int, feeds: dict | None = None) -> torch.Tensor:
    """Greedy decoding with onnxruntime alone: the prompt over an empty cache, then one token a step."""
    session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    past = {i.name: np.zeros([prompt.shape[0], *i.shape[1:2], 0, *i.shape[3:]], dtype=np.float32)
            for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    sequence, tokens = prompt.numpy(), prompt.numpy()
    for _ in range(new_tokens):
        length = sequence.shape[1]
        feed = {"input_ids": tokens, "attention_mask": np.ones_like(sequence),
                "position_ids": np.arange(length - tokens.shape[1], length)[None].repeat(len(tokens), 0), **past,
                **(feeds or {})}
        logits, *present = session.run(None, {name: feed[name] for name in names})
        tokens = logits[:, -1].argmax(-1)[:, None]
        sequence = np.concatenate([sequence, tokens], axis=1)
        past = dict(zip(past, present))
    return torch.from_numpy(sequence)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_merged_decoder_has_genai_names_dynamic_dims_and_decodes_as_generate(tmp_path, build):
    gm = two_adapters(build)
    lora_fx.set_active(gm, ["a", "b"])
    directory = lora_fx.export_onnx(gm, tmp_path / "genai", generation=True)
    assert sorted(p.name for p in directory.iterdir()) == ["genai_config.json", "model.onnx"]
    model = onnx.load(directory / "model.onnx")
    layers = gm._lora_fx_template.config.num_hidden_layers
    kv = [f"{i}.{role}" for i in range(layers) for role in ("key", "value")]
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "position_ids",
                                                   *(f"past_key_values.{name}" for name in kv)]
    assert [o.name for o in model.graph.output] == ["logits", *(f"present.{name}" for name in kv)]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert all(isinstance(d, str) for d in dims["input_ids"] + dims["attention_mask"])       # batch, lengths
    assert isinstance(dims["past_key_values.0.key"][0], str) and isinstance(dims["past_key_values.0.key"][2], str)
    assert model.ir_version <= 10
    config = json.loads((directory / "genai_config.json").read_text())
    assert config["model"]["type"] == gm._lora_fx_template.config.model_type
    assert config["model"]["decoder"]["num_hidden_layers"] == layers
    assert config["model"]["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    prompt = ids(2, 5, seed=3)
    assert torch.equal(ort_greedy(directory, prompt, 8), gm.generate(prompt, max_new_tokens=8,
                                                                     eos_token_id=-1, pad_token_id=0))


def test_mixed_decoder_takes_adapter_ids_for_plain_onnxruntime_loops(tmp_path):
    gm = two_adapters()
    mixed = lora_fx.mixed_batch(gm, ["a", "b"])
    directory = lora_fx.export_onnx(mixed, tmp_path / "mixed", generation=True)
    assert not (directory / "genai_config.json").exists()            # onnxruntime-genai would not pass the ids
    prompt, rows = ids(3, 4, seed=2), torch.tensor([1, -1, 0])
    assert torch.equal(ort_greedy(directory, prompt, 6, {"adapter_ids": rows.numpy()}),
                       mixed.generate(prompt, adapter_ids=rows, max_new_tokens=6, eos_token_id=-1, pad_token_id=0))


@pytest.mark.skipif(GENAI_PYTHON is None, reason="set LORA_FX_GENAI_PYTHON to a Python with onnxruntime-genai "
                                                 "(.ci/run makes one)")
def test_onnxruntime_genai_loads_the_directory_and_switches_adapters_like_generate(tmp_path):
    gm = two_adapters()
    lora_fx.set_active(gm, [])                     # the model's own slot weights: zeros, the base model
    directory = lora_fx.export_onnx(gm, tmp_path / "genai", generation=True, merged=False)
    prompt = ids(1, 5, seed=3)
    expected = {"": gm.generate(prompt, max_new_tokens=10)[0].tolist()}
    for adapter in ("a", "b"):
        lora_fx.export_onnx_adapter(gm, directory / f"{adapter}.onnx_adapter", adapter=adapter)
        lora_fx.set_active(gm, adapter)
        expected[adapter] = gm.generate(prompt, max_new_tokens=10)[0].tolist()
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"prompt": prompt.tolist(), "max_length": 15,
                                   "adapters": {a: str(directory / f"{a}.onnx_adapter") for a in ("a", "b")}}))
    run = subprocess.run([GENAI_PYTHON, str(Path(__file__).with_name("genai_generate.py")), str(directory),
                          str(request)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    eos = gm._lora_fx_template.config.eos_token_id
    drop_eos = lambda tokens: tokens[:-1] if tokens[-1] == eos else tokens    # onnxruntime-genai leaves it out
    assert {name: drop_eos(tokens) for name, tokens in expected.items()} == json.loads(run.stdout)
    assert len({tuple(tokens) for tokens in expected.values()}) == 3              # three different generations


def test_what_cannot_be_exported_for_generation_says_why(tmp_path):
    import transformers

    gm = two_adapters()
    (tmp_path / "file").write_text("")
    with pytest.raises(ExportError, match=r"it is a file \(generation exports write a directory"):
        lora_fx.export_onnx(gm, tmp_path / "file", generation=True)
    config = transformers.Mamba2Config(hidden_size=32, num_heads=4, head_dim=16, expand=2, state_size=8, n_groups=2,
                                       chunk_size=8, num_hidden_layers=1, vocab_size=97)
    mamba = lora_fx.capture(transformers.Mamba2ForCausalLM(config).eval(), (ids(2, 12),), {"use_cache": False})
    with pytest.raises(ExportError, match=r"cache also holds linear-attention \(state-space\) states"):
        lora_fx.export_onnx(mamba, tmp_path / "mamba", generation=True)
    assert not (tmp_path / "mamba").exists()
