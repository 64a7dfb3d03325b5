"""lora_fx.integrations.transformers.Trainer: it trains a graph as the stock Trainer trains the PEFT model with the
same adapter weights (gradient accumulation, evaluation, bf16 with gradient checkpointing, torch.compile); its
checkpoints hold the adapter (a PEFT directory), never the frozen base, and resume exactly; bad checkpoints and
models are refused before anything changes."""

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors import safe_open

import lora_fx
from lora_fx import AdapterError, LoraSpec
from lora_fx.integrations.transformers import Trainer
from tests.conftest import ids
from tests.lora_fx.integrations.twins import lora_state, model_and_graph, peft_twin, token_rows

CHECKPOINT_FILES = {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "rng_state.pth",
                    "scheduler.pt", "trainer_state.json", "training_args.bin"}


def arguments(directory, **overrides) -> transformers.TrainingArguments:
    settings = dict(per_device_train_batch_size=4, max_steps=4, save_steps=2, logging_steps=1, learning_rate=1e-2,
                    report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    return transformers.TrainingArguments(str(directory), **{**settings, **overrides})


def logged(trainer, key: str = "loss") -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def assert_close_states(ours: dict, theirs: dict, **tolerance) -> None:
    assert ours.keys() == theirs.keys() and ours
    for name, value in ours.items():
        torch.testing.assert_close(value, theirs[name], msg=name, **tolerance)


def test_trains_as_the_stock_trainer_trains_the_peft_model(tmp_path):
    model, gm = model_and_graph()
    reference = peft_twin(model, gm)
    options = dict(gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                   metric_for_best_model="eval_loss", max_steps=6)          # the best of 3 evaluations, at the end
    ours = Trainer(model=gm, args=arguments(tmp_path / "ours", **options), train_dataset=token_rows(),
                   eval_dataset=token_rows(4, seed=1))
    theirs = transformers.Trainer(model=reference, args=arguments(tmp_path / "theirs", **options),
                                  train_dataset=token_rows(), eval_dataset=token_rows(4, seed=1))
    ours.train()
    theirs.train()
    assert len(logged(ours)) == 6 and len(logged(ours, "eval_loss")) == 3
    for key in ("loss", "eval_loss", "grad_norm"):
        torch.testing.assert_close(logged(ours, key), logged(theirs, key), rtol=1e-5, atol=1e-6, msg=key)
    best = [trainer.state.best_model_checkpoint.rpartition("/")[2] for trainer in (ours, theirs)]
    assert best == ["checkpoint-2", "checkpoint-2"]             # not the last: loading it restores older weights
    assert_close_states(lora_state(gm), lora_state(reference), rtol=1e-4, atol=1e-5)


def test_checkpoints_hold_the_adapter_resume_exactly_and_load_in_peft_both_ways(tmp_path):
    model, gm = model_and_graph(LoraSpec(rank=4, alpha=8.0, dropout=0.1))        # dropout: the RNG state matters
    start = copy.deepcopy(gm)
    whole = Trainer(model=gm, args=arguments(tmp_path / "whole"), train_dataset=token_rows())
    whole.train()
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    assert {path.name for path in checkpoint.iterdir()} == CHECKPOINT_FILES
    with safe_open(str(checkpoint / "adapter_model.safetensors"), "pt") as saved:
        assert saved.keys() and all(".lora_" in key for key in saved.keys())

    resumed_graph = copy.deepcopy(start)
    resumed = Trainer(model=resumed_graph, args=arguments(tmp_path / "resumed"), train_dataset=token_rows())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert logged(resumed) == logged(whole) and len(logged(whole)) == 4
    assert_close_states(lora_state(resumed_graph), lora_state(gm), rtol=0, atol=0)

    whole.save_model(str(tmp_path / "final"))
    assert {path.name for path in (tmp_path / "final").iterdir()} == {"adapter_config.json",
                                                                      "adapter_model.safetensors",
                                                                      "training_args.bin"}
    gm.eval()
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "final").eval()
    torch.testing.assert_close(reference(ids()).logits, gm(input_ids=ids(), attention_mask=torch.ones_like(ids()),
                                                           labels=ids()).logits, rtol=0, atol=1e-5)
    reference.save_pretrained(tmp_path / "from_peft")
    back = lora_fx.load_adapter(lora_fx.capture(model, (ids(),), {"use_cache": False}), tmp_path / "from_peft")
    torch.testing.assert_close(back.eval()(ids()).logits, reference(ids()).logits, rtol=0, atol=1e-5)


def test_bf16_with_gradient_checkpointing_trains_as_peft_does(tmp_path):
    model, gm = model_and_graph()
    reference = peft_twin(model, gm)
    options = dict(bf16=True, gradient_checkpointing=True, max_steps=3, save_strategy="no")
    ours = Trainer(model=gm, args=arguments(tmp_path / "ours", **options), train_dataset=token_rows())
    theirs = transformers.Trainer(model=reference, args=arguments(tmp_path / "theirs", **options),
                                  train_dataset=token_rows())
    ours.train()
    theirs.train()
    assert gm.meta["lora_fx"].checkpoint == "selective"
    torch.testing.assert_close(logged(ours), logged(theirs), rtol=1e-2, atol=0)     # bf16 matmuls on both sides
    assert_close_states(lora_state(gm), lora_state(reference), rtol=0, atol=5e-3)


@pytest.mark.slow
def test_torch_compile_trains_as_eager(tmp_path):
    _, gm = model_and_graph()
    eager_graph = copy.deepcopy(gm)
    options = dict(max_steps=2, save_steps=2)
    compiled = Trainer(model=gm, args=arguments(tmp_path / "compiled", torch_compile=True, **options),
                       train_dataset=token_rows())
    eager = Trainer(model=eager_graph, args=arguments(tmp_path / "eager", **options), train_dataset=token_rows())
    compiled.train()
    eager.train()
    torch.testing.assert_close(logged(compiled), logged(eager), rtol=1e-5, atol=1e-6)
    assert {path.name for path in (tmp_path / "compiled" / "checkpoint-2").iterdir()} == CHECKPOINT_FILES


def test_a_graph_without_trainable_parameters_is_refused(tmp_path, llama):
    gm = lora_fx.capture(llama, (ids(),), {"use_cache": False})
    with pytest.raises(AdapterError, match=r"has no trainable parameters \(adapters: none\): add one with "
                                           r"lora_fx.apply"):
        Trainer(model=gm, args=arguments(tmp_path), train_dataset=token_rows())


def test_resuming_from_another_layout_or_a_whole_model_checkpoint_changes_nothing(tmp_path):
    _, gm = model_and_graph()
    Trainer(model=gm, args=arguments(tmp_path / "rank4", max_steps=2), train_dataset=token_rows()).train()
    _, other = model_and_graph(LoraSpec(targets=["q_proj", "v_proj"], rank=8, alpha=8.0))
    transformers.Trainer(model=other, args=arguments(tmp_path / "stock", max_steps=2),
                         train_dataset=token_rows()).train()
    assert (tmp_path / "stock" / "checkpoint-2" / "model.safetensors").is_file()          # the whole base
    before = lora_state(other)
    cases = [(tmp_path / "rank4" / "checkpoint-2", r"(?s)layout differs from the model's.* it adapts "
                                                   r"'model.layers.0.self_attn.k_proj'.* which adapter 'default' "
                                                   r"does not adapt.* site 'model.layers.0.self_attn.q_proj' has "
                                                   r"rank 4 there and 8 here"),
             (tmp_path / "stock" / "checkpoint-2", r"holds the whole model's state dict \(model.safetensors, frozen "
                                                   r"base included\)")]
    for checkpoint, message in cases:
        trainer = Trainer(model=other, args=arguments(tmp_path / "never"), train_dataset=token_rows())
        with pytest.raises(AdapterError, match=message):
            trainer.train(resume_from_checkpoint=str(checkpoint))
        assert_close_states(lora_state(other), before, rtol=0, atol=0)
        assert not any((tmp_path / "never").glob("checkpoint-*"))
    saved = json.loads((tmp_path / "rank4" / "checkpoint-2" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and Path(tmp_path / "rank4" / "checkpoint-2" / "adapter_model.safetensors").is_file()
