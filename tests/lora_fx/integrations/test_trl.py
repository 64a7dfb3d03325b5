"""lora_fx.integrations.trl: SFTTrainer and DPOTrainer train a graph as TRL's trainers train the PEFT model with the
same adapter weights (TRL's fused LM head on one side, the graph's logits on the other), and checkpoint adapters."""

import copy

import datasets
import pytest
import torch
import trl

from lora_fx.integrations.trl import DPOTrainer, SFTTrainer, per_token_outputs
from tests.conftest import VOCAB
from tests.lora_fx.integrations.twins import (copy_lora, lora_state, model_and_graph, peft_config, peft_twin,
                                               word_tokenizer)

INPUTS = ("input_ids", "attention_mask")            # what TRL's collators give the model (labels go to the loss)


def settings(config_class, directory, **overrides):
    return config_class(str(directory), **{**dict(per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                                                  learning_rate=1e-2, report_to=[], use_cpu=True, seed=0,
                                                  disable_tqdm=True, bf16=False), **overrides})     # TRL: bf16 on


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def words(generator, count: int) -> str:
    return " ".join(f"t{i}" for i in torch.randint(2, VOCAB, (count,), generator=generator).tolist())


def assert_same_training(ours, theirs, ours_model, theirs_model, keys) -> None:
    for key in keys:
        values = logged(ours, key)
        assert len(values) == 3, key
        torch.testing.assert_close(values, logged(theirs, key), rtol=1e-4, atol=1e-5, msg=key)
    theirs_state = lora_state(theirs_model)
    for name, value in lora_state(ours_model).items():
        torch.testing.assert_close(value, theirs_state[name], rtol=1e-4, atol=1e-5, msg=name)


def test_sft_trains_as_trl_trains_the_peft_model_and_checkpoints_the_adapter(tmp_path):
    model, gm = model_and_graph(inputs=INPUTS)
    reference = peft_twin(model, gm)
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(2, VOCAB, (int(length),), generator=generator).tolist()}
            for length in torch.randint(6, 12, (12,), generator=generator)]          # padded in each batch
    dataset = datasets.Dataset.from_list(rows)
    ours = SFTTrainer(model=gm, args=settings(trl.SFTConfig, tmp_path / "ours", save_steps=3),
                      train_dataset=dataset, processing_class=word_tokenizer())
    theirs = trl.SFTTrainer(model=reference, args=settings(trl.SFTConfig, tmp_path / "theirs", save_steps=3),
                            train_dataset=dataset, processing_class=word_tokenizer())
    ours.train()
    theirs.train()
    assert gm.meta["lora_fx"].checkpoint == "selective"           # SFTConfig turns gradient checkpointing on
    assert_same_training(ours, theirs, gm, reference, ("loss", "entropy", "mean_token_accuracy", "num_tokens"))
    assert {path.name for path in (tmp_path / "ours" / "checkpoint-3").iterdir()} >= {
        "adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "tokenizer.json"}
    assert not (tmp_path / "ours" / "checkpoint-3" / "model.safetensors").exists()


@pytest.mark.parametrize("precompute", [False, True], ids=["reference-each-step", "precomputed-reference"])
def test_dpo_with_the_disabled_graph_as_reference_trains_as_trl_s_peft_path(tmp_path, precompute):
    model, gm = model_and_graph(inputs=INPUTS)
    generator = torch.Generator().manual_seed(0)
    dataset = datasets.Dataset.from_list([{"prompt": words(generator, 4), "chosen": " " + words(generator, 3),
                                           "rejected": " " + words(generator, 2)} for _ in range(12)])
    options = dict(gradient_checkpointing=False, save_strategy="no", precompute_ref_log_probs=precompute)
    ours = DPOTrainer(model=gm, args=settings(trl.DPOConfig, tmp_path / "ours", **options), train_dataset=dataset,
                      processing_class=word_tokenizer())
    theirs = trl.DPOTrainer(model=copy.deepcopy(model), args=settings(trl.DPOConfig, tmp_path / "theirs", **options),
                            train_dataset=dataset, processing_class=word_tokenizer(), peft_config=peft_config())
    reference = copy_lora(gm, theirs.model)            # a new PEFT adapter: TRL's reference is the adapter disabled
    ours.train()
    theirs.train()
    assert logged(ours, "rewards/chosen")[0] != 0          # the adapter starts non-identity: not a vacuous check
    assert_same_training(ours, theirs, gm, reference, ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen",
                                                       "logits/chosen", "entropy", "mean_token_accuracy"))


def test_per_token_outputs_match_the_model_s_own_loss():
    logits = torch.randn(2, 5, VOCAB, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    labels[0, :2] = -100
    out = per_token_outputs(logits, labels)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)
    assert out.label_mask.sum() == 7 and (out.log_probs[~out.label_mask] == 0).all()
    probs = logits[:, :-1].softmax(-1)
    torch.testing.assert_close(out.entropy[out.label_mask], (-(probs * probs.log()).sum(-1))[out.label_mask])
    assert copy.copy(out.is_top1).sum() == ((logits[:, :-1].argmax(-1) == labels[:, 1:]) & out.label_mask).sum()
