"""gm.generate against transformers' generate on PEFT holding the same non-identity adapters: greedy, sampling,
left padding, any prompt length, adapter controls between calls without a new capture, mixed batches, merged and
quantized bases, compiled decoding, and bad input."""

import copy
import warnings

import peft
import pytest
import torch
from torch._dynamo.utils import counters

import lora_fx
from lora_fx import CallError, LoraSpec
from lora_fx.generation import programs
from lora_fx.trace import trace_step
from tests.conftest import MLP, ids, randomize_lora, tiny_gpt2, tiny_llama
from tests.lora_fx.test_peft_parity import copied_into, peft_config

BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}
SPEC = LoraSpec(targets="all-linear", rank=4, alpha=8.0)


def adapted(arch: str, spec: LoraSpec = SPEC):
    """(gm with `spec` randomized, PEFT with the same weights, the base model), all in eval mode."""
    torch.manual_seed(0)
    model = BUILD[arch]().eval()
    gm = lora_fx.apply(copy.deepcopy(model), spec, (ids(),), {"use_cache": False})
    randomize_lora(gm)
    reference = peft.get_peft_model(copy.deepcopy(model), peft_config(spec))
    copied_into(reference, gm)
    return gm, reference.eval(), model


@pytest.fixture(scope="module")
def llama_pair():
    return adapted("llama")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])             # GQA with rotary positions; Conv1D, absolute ones
def test_greedy_tokens_equal_peft_generate_for_every_prompt_length(arch):
    gm, reference, model = adapted(arch)
    for batch, length in [(3, 5), (1, 1), (2, 9)]:
        x = ids(batch, length, seed=length)
        ours = gm.generate(x, max_new_tokens=12)
        assert torch.equal(ours, reference.generate(input_ids=x, max_new_tokens=12, do_sample=False))
    assert not torch.equal(ours, model.generate(x, max_new_tokens=12, do_sample=False))        # adapters are live


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_rows_equal_peft_and_eos_stops_with_padding(arch):
    gm, reference, _ = adapted(arch)
    x = ids(3, 6, seed=1)
    mask = torch.ones_like(x)
    mask[0, :3], mask[2, :1] = 0, 0
    x = x.masked_fill(mask == 0, 0)
    settings = dict(max_new_tokens=10, pad_token_id=0)
    ours = gm.generate(x, attention_mask=mask, **settings)
    assert torch.equal(ours, reference.generate(input_ids=x, attention_mask=mask, do_sample=False, **settings))
    eos = int(ours[1, 8])                             # a token row 1 generates: it stops there, the others go on
    stopped = gm.generate(x, attention_mask=mask, eos_token_id=eos, **settings)
    assert torch.equal(stopped, reference.generate(input_ids=x, attention_mask=mask, eos_token_id=eos,
                                                   do_sample=False, **settings))
    assert (stopped[1, 9:] == 0).all()


def test_sampling_from_the_same_seed_draws_transformers_tokens_and_scores(llama_pair):
    gm, reference, _ = llama_pair
    x = ids(2, 4, seed=2)
    settings = dict(max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9, temperature=0.7, repetition_penalty=1.3,
                    return_dict_in_generate=True, output_scores=True, output_logits=True)
    torch.manual_seed(11)
    ours = gm.generate(x, **settings)
    torch.manual_seed(11)
    theirs = reference.generate(input_ids=x, **settings)
    assert torch.equal(ours.sequences, theirs.sequences)
    for mine, expected in [*zip(ours.scores, theirs.scores), *zip(ours.logits, theirs.logits)]:
        torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-5)
    assert ours.cache.get_seq_length() == ours.sequences.shape[1] - 1     # the last token is not run


def test_adapter_controls_take_effect_at_the_next_call_without_a_capture(tmp_path, monkeypatch):
    gm, _, model = adapted("llama")
    traces = []
    monkeypatch.setattr(programs, "trace_step", lambda *a, **k: traces.append(a[1].__name__) or trace_step(*a, **k))
    x = ids(2, 5, seed=4)
    first = gm.generate(x, max_new_tokens=8)
    assert traces == ["prefill_step", "decode_step"]
    base = model.generate(x, max_new_tokens=8, do_sample=False)
    with lora_fx.disabled(gm):
        assert torch.equal(gm.generate(x, max_new_tokens=8), base)
    lora_fx.apply(gm, LoraSpec(targets=["v_proj", "down_proj"], rank=2, adapter="b"))
    randomize_lora(gm, std=0.5, seed=3)
    lora_fx.set_active(gm, "b")
    only_b = gm.generate(x, max_new_tokens=8)
    assert not torch.equal(only_b, base) and not torch.equal(only_b, first)
    lora_fx.save_adapter(gm, tmp_path / "b", adapter="b")
    lora_fx.hotswap_adapter(gm, tmp_path / "b", adapter="default")        # b's weights in the first slot
    lora_fx.set_active(gm, "default")
    assert torch.equal(gm.generate(x, max_new_tokens=8), only_b)
    lora_fx.delete_adapter(gm, "b")
    lora_fx.load_adapter(gm, tmp_path / "b", adapter="c")
    lora_fx.set_active(gm, "c")
    assert torch.equal(gm.generate(x, max_new_tokens=8), only_b)
    assert traces == ["prefill_step", "decode_step"]                        # every graph rebuilt, none traced


def test_generate_decodes_in_eval_mode_and_leaves_the_mode_alone():
    spec = LoraSpec(targets="all-linear", rank=4, alpha=8.0, dropout=0.5)
    gm, reference, _ = adapted("llama", spec)
    gm.train()
    x = ids(2, 5, seed=6)
    assert torch.equal(gm.generate(x, max_new_tokens=8), reference.generate(input_ids=x, max_new_tokens=8,
                                                                               do_sample=False))
    assert gm.training and all(p.grad is None for p in gm.parameters())


def test_merged_and_quantized_bases_generate():
    gm, _, _ = adapted("llama")
    x = ids(2, 5, seed=7)
    expected = gm.generate(x, max_new_tokens=8)
    assert torch.equal(lora_fx.merge(gm).generate(x, max_new_tokens=8), expected)
    quantized = lora_fx.quantize_base(gm, "int8")
    dequantized = lora_fx.merge(quantized)           # W' = dequantize(W) + ΔW: the quantized model's own numbers
    assert torch.equal(quantized.generate(x, max_new_tokens=8), dequantized.generate(x, max_new_tokens=8))


def test_each_row_of_a_mixed_batch_decodes_with_its_adapter_as_peft_adapter_names():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    gm = lora_fx.capture(copy.deepcopy(model), (ids(),), {"use_cache": False})
    specs = [LoraSpec(targets="all-linear", rank=4, alpha=8.0, adapter="a"),
             LoraSpec(targets=["q_proj", "v_proj"], rank=2, alpha=4.0, adapter="b")]
    reference = peft.get_peft_model(copy.deepcopy(model), peft_config(specs[0]), adapter_name="a")
    reference.add_adapter("b", peft_config(specs[1]))
    for spec in specs:
        lora_fx.apply(gm, spec)
    randomize_lora(gm)
    copied_into(reference, gm)
    reference.eval()
    mixed = lora_fx.mixed_batch(gm, ["a", "b"])
    x, rows = ids(4, 6, seed=8), [0, 1, -1, 1]
    ours = mixed.generate(x, adapter_ids=torch.tensor(rows), max_new_tokens=10)
    names = [["a", "b"][row] if row >= 0 else "__base__" for row in rows]
    assert torch.equal(ours, reference.generate(input_ids=x, adapter_names=names, max_new_tokens=10,
                                                do_sample=False))
    for row, adapter in enumerate(rows):
        lora_fx.set_active(gm, [] if adapter < 0 else ["a", "b"][adapter])
        alone = gm.generate(x[row:row + 1], max_new_tokens=10)[0]       # stops at EOS; the batch pads past it
        assert torch.equal(ours[row, :len(alone)], alone) and (ours[row, len(alone):] == alone[-1]).all()


@pytest.mark.slow
def test_compiled_decoding_equals_eager_and_never_recompiles(tmp_path):
    torch._dynamo.reset()
    gm, _, _ = adapted("llama")
    lora_fx.apply(gm, LoraSpec(targets=["q_proj", "v_proj"], rank=2, adapter="b"))
    randomize_lora(gm, seed=1)
    lora_fx.save_adapter(gm, tmp_path / "b", adapter="b")
    mixed = lora_fx.mixed_batch(gm, ["default", "b"])
    compiled_once = None
    for batch, length, rows in [(3, 5, [1, -1, 0]), (2, 7, [0, 0]), (4, 2, [1, 0, -1, 1])]:
        x, rows = ids(batch, length, seed=length), torch.tensor(rows)
        settings = dict(adapter_ids=rows, max_new_tokens=6)
        assert torch.equal(mixed.generate(x, compile=True, **settings), mixed.generate(x, **settings))
        compiled_once = compiled_once or counters["stats"]["unique_graphs"]
        lora_fx.hotswap_adapter(mixed, tmp_path / "b", adapter="default")
        lora_fx.set_active(mixed, ["b"])
    assert counters["stats"]["unique_graphs"] == compiled_once


def test_bad_input_is_a_clear_error_that_changes_nothing():
    gm, _, _ = adapted("llama")
    x = ids(2, 5)
    before = {key: entry.graph for key, entry in gm._lora_fx_graphs.items()}
    cases = [
        (dict(input_ids=x.float()), r"input_ids must be a 2-D integer tensor"),
        (dict(input_ids=x[0]), r"input_ids must be a 2-D integer tensor"),
        (dict(input_ids=x, attention_mask=torch.ones(2, 3)), r"attention_mask must be a tensor shaped like"),
        (dict(input_ids=x, adapter_ids=torch.tensor([0, 0])), r"adapter_ids picks an adapter per row on a graph made"),
        (dict(input_ids=x, num_beams=2), r"greedy search and sampling; these settings ask for beam_search"),
        (dict(input_ids=x, output_attentions=True), r"argument\(s\) \['output_attentions'\] that are not generation"),
        (dict(input_ids=x, do_sample=True, num_return_sequences=2), r"does not support \['num_return_sequences > 1'\]"),
        (dict(input_ids=x, max_new_tokens=60), r"past the model's context length \(max_position_embeddings=64\)"),
        (dict(input_ids=x, labels=x), r"argument\(s\) \['labels'\] that are not generation settings"),
    ]
    for kwargs, message in cases:
        with pytest.raises(CallError, match=message):
            gm.generate(**kwargs)
    assert {key: entry.graph for key, entry in gm._lora_fx_graphs.items()} == before
    mixed = lora_fx.mixed_batch(gm, ["default"])
    for adapter_ids, message in [(None, r"needs adapter_ids: one adapter index per row \(batch 2\)"),
                                 (torch.tensor([0]), r"adapter_ids has 1 entries, but the batch has 2 rows"),
                                 (torch.tensor([0, 1]), r"adapter_ids \[1\] out of range"),
                                 (torch.tensor([0.0, 1.0]), r"adapter_ids must be int32 or int64, got torch.float32")]:
        with pytest.raises(CallError, match=message):
            mixed.generate(x, adapter_ids=adapter_ids, max_new_tokens=2)


def test_models_that_cannot_decode_say_why():
    import transformers

    config = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=48)
    bert = lora_fx.capture(transformers.BertModel(config).eval(), (ids(),))
    with pytest.raises(CallError, match=r"BertModel has no language-model head to decode with"):
        bert.generate(ids(), max_new_tokens=2)
    headless = lora_fx.capture(tiny_llama().model.eval(), (ids(),), {"use_cache": False})
    with pytest.raises(CallError, match=r"LlamaModel has no language-model head .*capture its \*ForCausalLM"):
        headless.generate(ids(), max_new_tokens=2)
    with pytest.raises(CallError, match=r"traced with torch.fx; decoding needs a torch.export capture"):
        lora_fx.capture(MLP()).generate(ids(), max_new_tokens=2)


@pytest.mark.parametrize("experts", ["grouped_mm", "batched_mm"])
def test_moe_experts_adapted_through_target_parameters_decode_as_peft(experts):
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    config._experts_implementation = experts
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    spec = LoraSpec(targets=["q_proj", "v_proj"], target_parameters=["mlp.experts.gate_up_proj",
                                                                     "mlp.experts.down_proj"], rank=4, alpha=8.0)
    gm = lora_fx.apply(copy.deepcopy(model), spec, (ids(),), {"use_cache": False})
    randomize_lora(gm)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        target_modules=["q_proj", "v_proj"], target_parameters=list(spec.target_parameters), r=4, lora_alpha=8.0))
    copied_into(reference, gm)
    for batch, length in [(2, 5), (1, 3)]:                # batch 1 decodes one token at a time through the experts
        x = ids(batch, length, seed=length)
        assert torch.equal(gm.generate(x, max_new_tokens=8),
                           reference.eval().generate(input_ids=x, max_new_tokens=8, do_sample=False))


def test_mamba2_decodes_with_its_conv_and_ssm_state_and_lora_on_in_and_out_proj():
    """PEFT refuses out_proj on Mamba, so the oracle is the eager model with W + s·B·A written into the weights.
    Prompts on both sides of the chunk size (8) and of the captured length (12): shape variants of the prefill."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Mamba2Config(hidden_size=32, num_heads=4, head_dim=16, expand=2, state_size=8, n_groups=2,
                                       conv_kernel=4, chunk_size=8, num_hidden_layers=2, vocab_size=97,
                                       pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model = transformers.Mamba2ForCausalLM(config).eval()
    with pytest.warns(lora_fx.CaptureWarning, match=r"it runs 9..15, .*; a call with another size captures a graph"):
        gm = lora_fx.apply(copy.deepcopy(model), LoraSpec(targets=["in_proj", "out_proj"], rank=4, alpha=8.0),
                           (ids(2, 12),), {"use_cache": False})
    randomize_lora(gm)
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for fqn, (lora_A, lora_B, scale) in lora_fx.adapter_weights(gm, "default").items():
            merged.get_submodule(fqn).weight += scale * lora_B @ lora_A
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lora_fx.CaptureWarning)           # the shape variants say so
        for length in (12, 5, 1, 20):
            x = ids(2, length, seed=length)
            ours = gm.generate(x, max_new_tokens=10)
            assert torch.equal(ours, merged.generate(x, max_new_tokens=10, do_sample=False))
    assert not torch.equal(ours, model.generate(x, max_new_tokens=10, do_sample=False))
