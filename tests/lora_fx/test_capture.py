import pytest
import torch

import lora_fx
from lora_fx import CaptureError
from tests.conftest import MLP, assert_unchanged, ids, snapshot


def test_capture_keeps_fqns_output_type_and_accepts_new_shapes(llama):
    gm = lora_fx.capture(llama, (ids(),), {"use_cache": False})
    assert {n for n, _ in gm.named_parameters()} == {n for n, _ in llama.named_parameters()}
    for batch, seq in ((2, 8), (3, 5), (1, 13)):
        x = ids(batch, seq, seed=batch)
        out = gm(x)
        assert type(out) is type(llama(x, use_cache=False))
        torch.testing.assert_close(out.logits, llama(x, use_cache=False).logits, rtol=0, atol=1e-6)


def test_an_example_that_is_a_view_does_not_tie_the_graph_to_it(llama):
    batch = ids(4, 16)
    gm = lora_fx.capture(llama, (batch[:2, :8],), {"use_cache": False})
    torch.testing.assert_close(gm(batch).logits, llama(batch, use_cache=False).logits, rtol=0, atol=1e-6)


def test_constant_keywords_may_be_repeated_or_omitted(llama):
    gm = lora_fx.capture(llama, (), {"input_ids": ids(), "use_cache": False})
    expected = llama(input_ids=ids(3, 5), use_cache=False).logits
    torch.testing.assert_close(gm(input_ids=ids(3, 5)).logits, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(gm(input_ids=ids(3, 5), use_cache=False).logits, expected, rtol=0, atol=1e-6)


def test_capture_does_not_mutate_and_shares_storage(llama):
    before = snapshot(llama)
    gm = lora_fx.capture(llama, (ids(),), {"use_cache": False})
    assert_unchanged(llama, before)
    base, user = gm.get_parameter("model.layers.0.mlp.up_proj.weight"), llama.model.layers[0].mlp.up_proj.weight
    assert base is not user and base.data_ptr() == user.data_ptr() and not base.requires_grad


def test_static_capture_when_not_dynamic(mlp):
    gm = lora_fx.capture(mlp.eval(), (torch.randn(3, 8),), dynamic=False)
    x = torch.randn(3, 8)
    torch.testing.assert_close(gm(x), mlp(x))
    with pytest.raises(lora_fx.CallError, match=r"input 'x' has shape \(5, 8\), but the graph was captured with "
                                                r"dynamic=False for shape \(3, 8\)"):
        gm(torch.randn(5, 8))


def test_fx_capture_without_example_inputs(mlp):
    gm = lora_fx.capture(mlp)
    mlp.eval(), gm.eval()
    x = torch.randn(4, 8)
    torch.testing.assert_close(gm(x), mlp(x))


def test_model_needing_example_inputs_says_so(llama):
    with pytest.raises(CaptureError, match="LlamaForCausalLM cannot be traced.*pass example inputs"):
        lora_fx.capture(llama)


def test_export_failure_names_model_and_hint(llama):
    with pytest.raises(CaptureError, match="could not capture LlamaForCausalLM(.|\n)*hint: .*use_cache"):
        lora_fx.capture(llama, (ids(),))


def test_capture_rejects_non_modules_and_captured_graphs(mlp):
    with pytest.raises(TypeError, match="expects an nn.Module"):
        lora_fx.capture(lambda x: x)
    gm = lora_fx.capture(mlp)
    with pytest.raises(TypeError, match="already captured"):
        lora_fx.capture(gm)


@pytest.mark.parametrize("training", [True, False])
def test_train_and_eval_switch_model_dropout(training):
    torch.manual_seed(0)
    model = MLP().train(training)
    gm = lora_fx.capture(model, (torch.randn(4, 8),))
    assert gm.training == training and model.training == training
    x = torch.randn(64, 8)
    gm.eval()
    torch.testing.assert_close(gm(x), model.eval()(x))
    gm.train()
    assert not torch.allclose(gm(x), gm(x))       # dropout p=0.5 is live again
    assert gm.training and not model.training      # the user's module flags are untouched
