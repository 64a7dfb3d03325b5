"""`gm.train()` / `gm.eval()` mean what they mean on the model, whatever mode capture ran in: every mode-dependent
op follows, checked against the eager model (seeded equality in training: the graph draws random numbers in the
model's own order)."""

import copy

import peft
import pytest
import torch
import transformers

import lora_fx
from lora_fx import LoraSpec, TargetError
from lora_fx.ops import FUSED_OP
from tests.conftest import VOCAB, all_nodes, assert_graph_unchanged, graph_snapshot, ids, randomize_lora
from tests.lora_fx.test_ops import tiny_mamba2


def seeded(call, seed=1):
    torch.manual_seed(seed)
    return call()


def llama_with_attention_dropout(training: bool) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      attention_dropout=0.3)
    return transformers.LlamaForCausalLM(config).train(training)


@pytest.mark.parametrize("captured_training", [True, False])
def test_sdpa_dropout_follows_the_mode_and_equals_peft(captured_training):
    """SDPA's dropout_p is baked into an exported graph: each mode has its own capture."""
    model = llama_with_attention_dropout(captured_training)
    gm = lora_fx.apply(model, LoraSpec(targets=["q_proj", "down_proj"], rank=4, alpha=8.0), (ids(),),
                       {"use_cache": False})
    randomize_lora(gm)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["q_proj", "down_proj"],
                                                                          r=4, lora_alpha=8))
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if param.requires_grad:
                params["base_model.model." + name].copy_(param)
    x = ids(3, 7, seed=2)
    for mode in (not captured_training, captured_training, not captured_training):
        gm.train(mode), reference.train(mode)
        ours = seeded(lambda: gm(x).logits)
        expected = seeded(lambda: reference(input_ids=x, use_cache=False).logits)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
        assert torch.equal(ours, seeded(lambda: gm(x).logits, seed=2)) == (not mode)   # dropout live in training
    assert model.training == captured_training            # the user's flags are untouched


class DropoutForms(torch.nn.Module):
    """nn.Dropout, F.dropout(x, p, self.training), and a branch on self.training."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        x = torch.nn.functional.dropout(self.proj(x), 0.25, self.training)
        x = self.drop(x)
        return x * 2 if self.training else x - 1


@pytest.mark.parametrize("tracer", ["export", "fx"])
@pytest.mark.parametrize("captured_training", [True, False])
def test_every_dropout_form_and_mode_branch_follows_the_mode(tracer, captured_training):
    torch.manual_seed(0)
    model = DropoutForms().train(captured_training)
    gm = lora_fx.apply(model, LoraSpec(rank=2), *([(torch.randn(4, 8),)] if tracer == "export" else []))
    reference = copy.deepcopy(model)
    x = torch.randn(16, 8)
    for mode in (not captured_training, captured_training):
        gm.train(mode), reference.train(mode)
        with lora_fx.disabled(gm):
            torch.testing.assert_close(seeded(lambda: gm(x)), seeded(lambda: reference(x)), rtol=0, atol=0)
        assert gm.training == mode


class Normalized(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(6, 6)
        self.norm = torch.nn.BatchNorm1d(6)

    def forward(self, x):
        return self.norm(self.proj(x))


@pytest.mark.parametrize("captured_training", [True, False])
def test_batch_norm_uses_batch_statistics_in_training_and_updates_only_its_own_buffers(captured_training):
    torch.manual_seed(0)
    model = Normalized().train(captured_training)
    user_buffers = {name: b.clone() for name, b in model.named_buffers()}
    gm = lora_fx.apply(model, LoraSpec(targets=["proj"], rank=2), (torch.randn(4, 6),))
    randomize_lora(gm)
    norm = copy.deepcopy(model.norm)            # the oracle: the eager norm on the graph's adapted projection
    gm.train(), norm.train()
    for scale in (1.0, 2.0, 3.0):
        batch = torch.randn(5, 6) * scale
        torch.testing.assert_close(gm(batch), norm(_projection(gm, batch)), rtol=1e-5, atol=1e-6)
    for name, value in norm.named_buffers():
        torch.testing.assert_close(gm.get_buffer(f"norm.{name}"), value, rtol=1e-6, atol=0)
    assert gm.get_buffer("norm.num_batches_tracked") == 3
    gm.eval(), norm.eval()
    batch = torch.randn(5, 6)
    torch.testing.assert_close(gm(batch), norm(_projection(gm, batch)), rtol=1e-5, atol=1e-6)
    for name, value in model.named_buffers():           # the user's statistics were never written
        assert torch.equal(value, user_buffers[name]), name


def _projection(gm, x):
    """proj(x) + s·B·A·x with gm's own weights: the input the norm sees."""
    A, B, scale = lora_fx.adapter_weights(gm, "default")["proj"]
    with torch.no_grad():
        return x @ gm.get_parameter("proj.weight").T + gm.get_parameter("proj.bias") + scale * (x @ A.T @ B.T)


def test_mamba2_uses_its_fused_kernel_in_training_and_the_torch_path_in_eval():
    """transformers' Mamba2 picks its code path by self.training: each mode's graph is the model's own path."""
    model = tiny_mamba2().eval()
    gm = lora_fx.apply(model, LoraSpec(targets=["in_proj", "out_proj"], rank=2),
                       (torch.randint(0, 50, (2, 12)),), {"use_cache": False})
    randomize_lora(gm, std=0.05)
    x = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(4))
    eval_logits = gm(x).logits
    assert not any(n.target is FUSED_OP for n in all_nodes(gm))
    gm.train()
    assert sum(n.target is FUSED_OP for n in all_nodes(gm)) == 2          # lowered for out_proj, still one op
    torch.testing.assert_close(gm(x).logits, eval_logits, rtol=0, atol=1e-5)   # no dropout: same function
    gm.eval()
    torch.testing.assert_close(gm(x).logits, eval_logits, rtol=0, atol=0)


def test_mixed_submodule_modes_are_kept_until_train_or_eval():
    torch.manual_seed(0)
    model = DropoutForms().train()
    model.drop.eval()                                        # a frozen submodule, as in some recipes
    gm = lora_fx.apply(model, LoraSpec(rank=2), (torch.randn(4, 8),))
    x = torch.randn(16, 8)
    with lora_fx.disabled(gm):
        torch.testing.assert_close(seeded(lambda: gm(x)), seeded(lambda: model(x)), rtol=0, atol=0)
        gm.train()                                           # as model.train(): every submodule in training
        reference = copy.deepcopy(model).train()
        torch.testing.assert_close(seeded(lambda: gm(x)), seeded(lambda: reference(x)), rtol=0, atol=0)
    assert not model.drop.training


class ReadsDifferentlyInEval(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x) if self.training else self.proj(x) * self.proj.weight.mean()


def test_a_mode_whose_graph_cannot_carry_the_adapters_refuses_and_keeps_the_mode():
    torch.manual_seed(0)
    gm = lora_fx.apply(ReadsDifferentlyInEval().train(), LoraSpec(rank=2), (torch.randn(3, 4),))
    before = graph_snapshot(gm)
    with pytest.raises(TargetError, match=r"'proj' is adapted, but in eval mode its weight is also read by "
                                          r"\['mean'\]"):
        gm.eval()
    assert_graph_unchanged(gm, before)
    assert [n.meta["lora_fx"]["role"] for n in all_nodes(gm)
            if n.meta.get("lora_fx", {}).get("role") in ("down", "up")] == ["down", "up"]    # the branch is kept


def test_train_takes_only_bools(mlp):
    gm = lora_fx.capture(mlp, (torch.randn(2, 8),))
    with pytest.raises(ValueError, match="training mode must be a bool, got 'yes'"):
        gm.train("yes")
