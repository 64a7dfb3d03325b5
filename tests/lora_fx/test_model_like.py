"""A captured graph answers like the model (lora_fx.model_like): attributes read from lora_fx's copy of the model,
counts equal to transformers' and PEFT's, PEFT's save layout, and the activation-checkpointing switches."""

import copy

import peft
import pytest
import torch

import lora_fx
from lora_fx import AdapterError, LoraSpec
from tests.conftest import MLP, assert_unchanged, ids, randomize_lora, snapshot, tiny_llama


@pytest.fixture(scope="module")
def model_and_capture():
    torch.manual_seed(0)
    model = tiny_llama()
    return model, lora_fx.capture(model, (ids(),), {"use_cache": False})


@pytest.fixture
def adapted(model_and_capture):
    """(the user's model, a copy of its capture with a non-identity adapter)."""
    model, captured = model_and_capture
    gm = lora_fx.apply(copy.deepcopy(captured), LoraSpec(rank=4, alpha=8.0))
    randomize_lora(gm)
    return model, gm


def test_attributes_are_the_captured_model_s_and_never_the_user_s(adapted):
    model, gm = adapted
    before = snapshot(model)
    assert gm.config is not model.config and gm.config.to_dict() == model.config.to_dict()
    assert gm.generation_config.to_dict() == model.generation_config.to_dict()
    assert (gm.name_or_path, gm.main_input_name) == (model.name_or_path, model.main_input_name)
    assert (gm.device, gm.dtype) == (torch.device("cpu"), torch.float32)
    gm.config.pad_token_id = 5                          # Trainer and TRL write special tokens here
    assert model.config.pad_token_id is None
    assert_unchanged(model, before)


def test_dtype_follows_the_base_weights():
    gm = lora_fx.capture(tiny_llama().to(torch.bfloat16), (ids(),), {"use_cache": False})
    assert gm.dtype == torch.bfloat16


def test_input_embeddings_compute_on_the_graph_s_table_and_hooks_on_them_stay_out_of_the_graph(llama):
    gm = lora_fx.apply(llama, LoraSpec(rank=4), (ids(),), {"use_cache": False})
    randomize_lora(gm)
    model = llama
    embedding = gm.get_input_embeddings()
    assert type(embedding) is type(model.get_input_embeddings())
    assert embedding.weight is gm.get_parameter("model.embed_tokens.weight")
    assert embedding.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()      # shared, not copied
    torch.testing.assert_close(embedding(ids()), model.get_input_embeddings()(ids()), rtol=0, atol=0)
    expected = gm(ids()).logits
    embedding.register_forward_hook(lambda module, inputs, output: output * 0)
    gm.train().eval()                                   # capturing again must not trace the hook either
    torch.testing.assert_close(gm(ids()).logits, expected, rtol=0, atol=0)


def test_parameter_counts_and_summary_equal_transformers_and_peft(adapted, capsys):
    model, gm = adapted
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules="all-linear", r=4))
    assert gm.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    assert gm.num_parameters(only_trainable=True) == reference.get_nb_trainable_parameters()[0] > 0
    assert gm.num_parameters(exclude_embeddings=True) == (model.num_parameters(exclude_embeddings=True)
                                                          + gm.num_parameters(only_trainable=True))
    gm.print_trainable_parameters()
    reference.print_trainable_parameters()
    ours, theirs = capsys.readouterr().out.splitlines()
    assert ours == theirs and ours.startswith("trainable params: ")


def test_a_model_without_config_gives_a_graph_without_one(mlp):
    gm = lora_fx.capture(mlp)
    assert not hasattr(gm, "config") and not hasattr(gm, "generation_config")
    with pytest.raises(AttributeError, match="the captured MLP has no 'get_input_embeddings'"):
        gm.get_input_embeddings()


def test_save_pretrained_writes_peft_s_layout(adapted, tmp_path):
    model, gm = adapted
    lora_fx.apply(gm, LoraSpec(targets=["q_proj"], rank=2, adapter="b"))
    randomize_lora(gm, seed=1)
    gm.eval()
    gm.save_pretrained(tmp_path / "skipped", is_main_process=False)
    assert not (tmp_path / "skipped").exists()
    gm.save_pretrained(tmp_path / "saved")
    assert {p.name for p in (tmp_path / "saved").iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                                "b"}
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "saved")
    reference.load_adapter(tmp_path / "saved" / "b", adapter_name="b")
    for adapter in ("default", "b"):
        reference.set_adapter(adapter)
        lora_fx.set_active(gm, [adapter])
        torch.testing.assert_close(gm(ids()).logits, reference(ids()).logits, rtol=0, atol=1e-5)
    with pytest.raises(AdapterError, match="has no adapter to save"):
        lora_fx.capture(MLP()).save_pretrained(tmp_path / "none")


def test_activation_checkpointing_switches_the_checkpoint_policy(adapted):
    _, gm = adapted
    gm.gradient_checkpointing_enable()
    assert gm.meta["lora_fx"].checkpoint == "selective" and gm.is_gradient_checkpointing
    gm.activation_checkpointing_enable({"policy": "full", "use_reentrant": False})
    assert gm.meta["lora_fx"].checkpoint == "full"
    with pytest.raises(ValueError, match=r"options \['every_n_layers', 'offload'\] are not supported"):
        gm.activation_checkpointing_enable(every_n_layers=2, offload=True)
    assert gm.meta["lora_fx"].checkpoint == "full"
    gm.gradient_checkpointing_disable()
    assert not gm.is_activation_checkpointing
