import re
import warnings

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
    x = torch.randn(5, 8)
    with pytest.warns(lora_fx.CaptureWarning, match=r"input 'x' has shape \(5, 8\), but the graph fixes dims "
                                                    r"\{0: 3\} \(dim: size\) of it: captured with dynamic=False; "
                                                    r"lora_fx captured the eval \(shape variant 1\) graph") as caught:
        torch.testing.assert_close(gm(x), mlp(x))
    assert caught[0].filename == __file__
    strict = lora_fx.capture(mlp.eval(), (torch.randn(3, 8),), dynamic=False, strict_shapes=True)
    with pytest.raises(lora_fx.CallError, match=r"input 'x' has shape \(5, 8\), but the graph fixes dims "
                                                r"\{0: 3\} \(dim: size\) of it: captured with dynamic=False"):
        strict(x)


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


class KeywordsLast(torch.nn.Module):
    """Tensor inputs reaching forward through **kwargs, after a non-tensor keyword."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x, scale: bool = False, **kwargs):
        y = self.proj(x) + kwargs["bias"]
        return y * 2 if scale else y


def test_keyword_inputs_in_any_order_and_through_kwargs_stay_dynamic():
    torch.manual_seed(0)
    model = KeywordsLast()
    gm = lora_fx.capture(model, (), {"scale": True, "bias": torch.randn(2, 3, 4), "x": torch.randn(2, 3, 4)})
    x, bias = torch.randn(5, 7, 4), torch.randn(5, 7, 4)
    torch.testing.assert_close(gm(x=x, bias=bias), model(x, scale=True, bias=bias), rtol=0, atol=1e-6)


class FixedWidth(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):                               # x: (batch, 12, 4): the reshape needs 12 rows
        return self.proj(x).reshape(x.shape[0], 3, 16)


def test_a_dim_export_specializes_is_reported_at_capture_and_checked_at_call():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = lora_fx.capture(FixedWidth(), (torch.randn(2, 12, 4),))
    reported = [str(w.message) for w in caught if w.category is lora_fx.CaptureWarning]
    assert len(reported) == 1 and re.match(r"torch.export fixed dim 1 of input 'x' at 12 \(guard Eq\(.*48.*\) at "
                                           r".*\): the graph runs only that size", reported[0])     # not dim 2: a weight's
    assert caught[0].filename == __file__                                                         # fixes that one
    assert gm(torch.randn(5, 12, 4)).shape == (5, 3, 16)            # the other dims stay dynamic
    strict = lora_fx.capture(FixedWidth(), (torch.randn(2, 12, 4),), strict_shapes=True)
    with pytest.raises(lora_fx.CallError, match=r"input 'x' has shape \(5, 13, 4\), but the graph fixes dims "
                                                r"\{1: 12\} .*torch.export specialized it"):
        strict(torch.randn(5, 13, 4))
    with pytest.raises(lora_fx.CaptureError, match="could not capture FixedWidth"):   # a variant: the model's own
        gm(torch.randn(5, 13, 4))                                                     # reshape fails at 13 rows
    assert gm(torch.randn(3, 12, 4)).shape == (3, 3, 16)


class LoopsOverSequence(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, ids):                             # ids: (batch, seq): a Python loop over the sequence
        x = self.embed(ids)
        return torch.stack([self.proj(x[:, i]) for i in range(ids.shape[1])], 1)


def test_a_fixed_sequence_length_as_large_as_a_weights_dim_is_still_reported():
    """Mamba in transformers 5 loops over the sequence; with length 8 and a state size of 8 the fixed length went
    unreported (the size matched a weight's dim) and surfaced only at the next call. Integer inputs have no feature
    dims, so the size heuristic does not apply to them."""
    ids = torch.randint(0, 10, (2, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = lora_fx.capture(LoopsOverSequence(), (ids,))
    reported = [str(w.message) for w in caught if w.category is lora_fx.CaptureWarning]
    assert len(reported) == 1 and re.match(r"torch.export fixed dim 1 of input 'ids' at 4 \(guard Eq\(s\d+, 4\) at "
                                           r".*test_capture.py:\d+ in forward\)", reported[0]), reported
    assert gm(torch.randint(0, 10, (3, 4))).shape == (3, 4, 4)
    strict = lora_fx.capture(LoopsOverSequence(), (ids,), strict_shapes=True)
    with pytest.raises(lora_fx.CallError, match=r"input 'ids' has shape \(3, 5\), but the graph fixes dims "
                                                r"\{1: 4\}"):
        strict(torch.randint(0, 10, (3, 5)))
    model, longer = LoopsOverSequence(), torch.randint(0, 10, (3, 5))
    gm = lora_fx.capture(model, (ids,))
    with pytest.warns(lora_fx.CaptureWarning, match=r"captured the training \(shape variant 1\) graph for these shapes"):
        torch.testing.assert_close(gm(longer), model(longer))
    torch.testing.assert_close(gm(longer[:, :4]), model(longer[:, :4]))         # variant 0 still serves length 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                           # no capture for a known region
        torch.testing.assert_close(gm(longer[:2]), model(longer[:2]))


class OneChunk(torch.nn.Module):
    """Pads the length to a multiple of 8 and takes one chunk, as Mamba2's chunked scan does for short inputs:
    torch.export keeps the length symbolic but bounds it by a guard (padded length // 8 == 1)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        padded = torch.nn.functional.pad(x, (0, 0, 0, (8 - x.shape[1] % 8) % 8))
        chunk = padded.reshape(x.shape[0], -1, 8, 4)[:, 0] if padded.shape[1] // 8 == 1 else padded[:, :8]
        return self.proj(chunk)


def test_a_dim_bounded_by_export_guards_is_reported_at_capture_and_is_a_call_error_beyond():
    """Mamba2, Falcon-H1 and Bamba: a length outside the guard's bound failed at the next call as a raw torch
    AssertionError, unreported at capture. Now capture names the sizes that run, and the call is a CallError."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = OneChunk()
        gm = lora_fx.capture(model, (torch.randn(2, 6, 4),))
    reported = [str(w.message) for w in caught if w.category is lora_fx.CaptureWarning]
    assert len(reported) == 1 and re.match(r"torch.export kept dim 1 of input 'x' dynamic only under guards .*"
                                           r"x\.size\(1\).*: of sizes 2\.\.64 it runs 2\.\.8; a call with another "
                                           r"size captures a graph", reported[0]), reported    # not dim 2: features
    assert caught[0].filename == __file__
    for length in (5, 8):                                            # inside the bound: runs, equal to eager
        x = torch.randn(3, length, 4)
        torch.testing.assert_close(gm(x), model(x))
    strict = lora_fx.capture(model, (torch.randn(2, 6, 4),), strict_shapes=True)
    with pytest.raises(lora_fx.CallError, match=r"these inputs fail a guard torch.export put on the captured graph "
                                                r"\(Guard failed: .*x\.size\(\)\[1\]"):
        strict(torch.randn(3, 12, 4))
    for length in (12, 20, 3):                                       # past the bound: a variant; then inside again
        x = torch.randn(3, length, 4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lora_fx.CaptureWarning)
            torch.testing.assert_close(gm(x), model(x))
    assert sorted(key.variant for key in gm._lora_fx_graphs) == [0, 1]     # 12 and 20 share one region


class BranchesOnValues(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Module()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        if torch.nonzero(x > 0).shape[0] > 3:
            return self.proj(x)
        return x


def test_data_dependent_code_is_a_clear_error_naming_the_code_and_module(capfd):
    with pytest.raises(CaptureError, match=r"could not capture BranchesOnValues: its code branches on tensor values "
                                           r"\(data-dependent control flow\) at test_capture.py:\d+ in forward: "
                                           r"`if torch.nonzero.*` \(module BranchesOnValues\).*'batched_mm' or "
                                           r"'grouped_mm'"):
        lora_fx.capture(BranchesOnValues(), (torch.randn(3, 4),))
    assert "def forward(self" not in capfd.readouterr().err          # no partial-graph dump from torch.export
