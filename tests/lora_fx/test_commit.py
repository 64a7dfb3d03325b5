"""Every change commits whole or not at all: an exception (KeyboardInterrupt included) raised midway through any
operation leaves graph code, node meta, parameters, buffers, state dict, adapter list and tags exactly as before.
Faults are injected into the steps each operation runs; planning never mutates."""

import copy
import sys
import threading
from collections import Counter

import peft
import pytest
import torch

import lora_fx
from lora_fx import LoraSpec, TargetError
from lora_fx.apply import plan
from lora_fx.commit import Journal
from lora_fx.ops import FUSED_CALL_SITES, FUSED_OP, opaque_fused_calls
from lora_fx.passes import fuse_siblings, insert_lora
from tests.conftest import all_nodes, assert_graph_unchanged, captured, graph_snapshot, ids, randomize_lora
from tests.lora_fx.test_ops import tiny_mamba2

FAULTS = [RuntimeError("injected"), KeyboardInterrupt()]
MAMBA_CAPTURE = {"example_args": (torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0)),),
                 "example_kwargs": {"use_cache": False}}


def fail_on_call(monkeypatch, owner, name: str, call: int, fault: BaseException) -> None:
    """Make `owner.name` raise `fault` on its `call`-th call (the earlier calls run normally)."""
    original = getattr(owner, name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise fault
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, failing)


def lora_adds(gm) -> int:
    return sum(n.meta.get("lora_fx", {}).get("role") == "add" for n in all_nodes(gm))


@pytest.fixture
def adapted():
    gm = captured("llama")
    lora_fx.apply(gm, LoraSpec(targets=["q_proj", "v_proj", "up_proj"], rank=4))
    lora_fx.apply(gm, LoraSpec(targets=["q_proj"], rank=2, adapter="b"))
    randomize_lora(gm)
    gm.train()                          # two captured modes: every change rebuilds both
    return gm


@pytest.mark.parametrize("fault", FAULTS, ids=type)
def test_apply_failing_midway_changes_nothing_and_the_retry_is_not_doubled(adapted, monkeypatch, fault):
    before, x = graph_snapshot(adapted), ids(2, 5)
    expected = adapted(x).logits
    fail_on_call(monkeypatch, insert_lora, "_insert_branch", 5, fault)
    with pytest.raises(type(fault)):
        lora_fx.apply(adapted, LoraSpec(targets="all-linear", rank=2, adapter="c"))
    assert_graph_unchanged(adapted, before)
    torch.testing.assert_close(adapted(x).logits, expected, rtol=0, atol=0)
    monkeypatch.undo()
    lora_fx.apply(adapted, LoraSpec(targets="all-linear", rank=2, adapter="c"))
    assert lora_adds(adapted) == 6 + 2 + 14            # default, b and c, each once per site


@pytest.mark.parametrize("fault", FAULTS, ids=type)
@pytest.mark.parametrize("operation", ["apply", "delete", "set_active", "fuse_siblings", "combine", "disabled"])
def test_operations_failing_at_their_last_step_change_nothing(adapted, monkeypatch, fault, operation):
    """The scale buffers are written last: a fault there (after one write) must undo the writes, the new graphs,
    state and tensors too."""
    before = graph_snapshot(adapted)
    run = {"apply": lambda: lora_fx.apply(adapted, LoraSpec(targets=["k_proj"], rank=2, adapter="c")),
           "delete": lambda: lora_fx.delete_adapter(adapted, "default"),
           "set_active": lambda: lora_fx.set_active(adapted, ["b"]),
           "fuse_siblings": lambda: lora_fx.fuse_siblings(adapted),
           "combine": lambda: lora_fx.add_weighted_adapter(adapted, ["default", "b"], [1.0, 0.5], "mix"),
           "disabled": lambda: lora_fx.disabled(adapted).__enter__()}[operation]
    fail_on_call(monkeypatch, Journal, "write", 2, fault)
    with pytest.raises(type(fault)):
        run()
    assert_graph_unchanged(adapted, before)


@pytest.mark.parametrize("fault", FAULTS, ids=type)
def test_delete_failing_while_unregistering_changes_nothing(adapted, monkeypatch, fault):
    import lora_fx.commit

    before = graph_snapshot(adapted)
    fail_on_call(monkeypatch, lora_fx.commit, "unregister", 4, fault)
    with pytest.raises(type(fault)):
        lora_fx.delete_adapter(adapted, "default")
    assert_graph_unchanged(adapted, before)


@pytest.mark.parametrize("fault", FAULTS, ids=type)
def test_fuse_siblings_failing_changes_nothing(adapted, monkeypatch, fault):
    before = graph_snapshot(adapted)
    fail_on_call(monkeypatch, fuse_siblings, "inherit_meta", 2, fault)
    with pytest.raises(type(fault)):
        lora_fx.fuse_siblings(adapted)
    assert_graph_unchanged(adapted, before)


@pytest.mark.parametrize("fault", FAULTS, ids=type)
def test_load_and_hot_swap_failing_change_nothing(adapted, monkeypatch, tmp_path, fault):
    reference = peft.get_peft_model(tiny_reference(), peft.LoraConfig(target_modules=["q_proj"], r=2, lora_alpha=3))
    randomize_lora(reference, seed=3)
    reference.save_pretrained(str(tmp_path))
    before = graph_snapshot(adapted)
    fail_on_call(monkeypatch, insert_lora, "_insert_branch", 3, fault)
    with pytest.raises(type(fault)):
        lora_fx.load_adapter(adapted, tmp_path, adapter="loaded")
    assert_graph_unchanged(adapted, before)
    monkeypatch.undo()
    fail_on_call(monkeypatch, Journal, "write", 2, fault)
    with pytest.raises(type(fault)):
        lora_fx.hotswap_adapter(adapted, tmp_path, adapter="b")
    assert_graph_unchanged(adapted, before)


def tiny_reference():
    from tests.conftest import tiny_llama
    torch.manual_seed(0)
    return tiny_llama().eval()


def test_planning_and_inspecting_never_mutate(adapted):
    before = graph_snapshot(adapted)
    change = plan(adapted, LoraSpec(rank=2, adapter="c"))
    lora_fx.match.match(adapted, LoraSpec(rank=2, adapter="c"), adapted.meta["lora_fx"])
    assert change.add and "c" in change.state.specs
    assert_graph_unchanged(adapted, before)


@pytest.mark.parametrize("fault", FAULTS, ids=type)
def test_a_failure_after_lowering_leaves_the_fused_op_whole(monkeypatch, fault):
    gm = lora_fx.capture(tiny_mamba2(), **MAMBA_CAPTURE)
    plain = Counter(n.target for n in all_nodes(gm))
    before = graph_snapshot(gm)
    with pytest.raises(TargetError, match="conv1d"):      # a later check fails: the lowering is never kept
        lora_fx.apply(gm, LoraSpec(targets=["out_proj", "conv1d"], rank=2))
    assert_graph_unchanged(gm, before)
    fail_on_call(monkeypatch, insert_lora, "_insert_branch", 2, fault)
    with pytest.raises(type(fault)):
        lora_fx.apply(gm, LoraSpec(targets=["out_proj"], rank=2))
    assert_graph_unchanged(gm, before)
    monkeypatch.undo()
    lora_fx.apply(gm, LoraSpec(targets=["out_proj"], rank=2))
    assert all(n.kwargs.get("outproj_weight", 0) is None for n in all_nodes(gm) if n.target is FUSED_OP)
    lora_fx.delete_adapter(gm, "default")           # the last adapter that needed the lowering: it goes too
    assert Counter(n.target for n in all_nodes(gm)) == plain


def test_the_capture_patch_is_reentrant_thread_local_and_always_restored():
    module_name, attribute = FUSED_CALL_SITES[0]
    module = sys.modules[module_name]
    original = getattr(module, attribute)
    seen_outside = []
    with opaque_fused_calls():
        with opaque_fused_calls():
            pass
        assert getattr(module, attribute) is not original            # still patched after the inner block
        outside = threading.Thread(target=lambda: seen_outside.append(getattr(module, attribute)(
            *[torch.zeros(1)] * 6, chunk_size=1)))
        outside.start(), outside.join()
    assert seen_outside == [None]                # another thread reached transformers' own (kernel-less) function
    assert getattr(module, attribute) is original
    with pytest.raises(ZeroDivisionError):
        with opaque_fused_calls():
            1 / 0
    assert getattr(module, attribute) is original


def test_two_threads_capture_mamba2_at_once():
    module_name, attribute = FUSED_CALL_SITES[0]
    original = getattr(sys.modules[module_name], attribute)
    models = [tiny_mamba2(), tiny_mamba2()]
    results, errors = [None, None], []

    def run(i):
        try:
            results[i] = lora_fx.apply(models[i], LoraSpec(targets=["out_proj"], rank=2), **MAMBA_CAPTURE)
        except BaseException as err:     # noqa: BLE001  (reported below)
            errors.append(err)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    [t.start() for t in threads], [t.join() for t in threads]
    assert not errors
    for gm in results:
        assert sum(n.target is FUSED_OP for n in all_nodes(gm)) == 2
    assert getattr(sys.modules[module_name], attribute) is original
    x = MAMBA_CAPTURE["example_args"][0]
    torch.testing.assert_close(results[0](x).logits, copy.deepcopy(results[1])(x).logits, rtol=0, atol=0)
