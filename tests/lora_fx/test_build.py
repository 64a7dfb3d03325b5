"""build's pass pipeline: one signature, one ordered list, optional passes as typed state options, failures named."""

import pytest
import torch
from torch.fx.passes.infra.pass_base import PassResult

import lora_fx
import lora_fx.build
from lora_fx import LoraSpec
from lora_fx.build import PIPELINE, GraphPass
from lora_fx.state import building_of, state_of
from tests.conftest import MLP, assert_graph_unchanged, graph_snapshot, ids, tiny_llama


def test_every_pass_takes_a_graph_module_and_returns_a_pass_result(monkeypatch):
    """Build both modes of a graph that turns on every optional pass but quantization; record what each pass got and
    returned, in the order they ran."""
    ran = []

    def recorded(graph_pass):
        def run(gm):
            result = graph_pass.run(gm)
            ran.append((graph_pass.name, building_of(gm).training, isinstance(gm, torch.fx.GraphModule),
                        isinstance(result, PassResult)))
            return result
        return GraphPass(graph_pass.name, run, graph_pass.runs_when)

    monkeypatch.setattr(lora_fx.build, "PIPELINE", [recorded(p) for p in PIPELINE])
    gm = lora_fx.apply(tiny_llama().train(), LoraSpec(rank=2, dropout=0.1), example_args=(ids(),),
                       example_kwargs={"use_cache": False})
    names = [p.name for p in PIPELINE]
    for training, change in ((True, lambda: lora_fx.fuse_siblings(gm, share_dropout=True)), (False, gm.eval)):
        ran.clear()
        change()                                                      # builds the graph of one mode
        run = [name for name, mode, _, _ in ran]
        assert {mode for _, mode, _, _ in ran} == {training}
        assert run == sorted(run, key=names.index) and len(set(run)) == len(run)     # once each, in PIPELINE's order
        assert {"insert_lora", "fuse_siblings", "fuse_siblings_sharing_dropout"} <= set(run)
        assert ("lean_dropout" in run) is training
        assert all(module and result for _, _, module, result in ran)
    assert state_of(gm).siblings == "fused_sharing_dropout"                          # a typed option, not a name


def test_a_failing_pass_names_itself_and_the_mode_and_changes_nothing(monkeypatch):
    gm = lora_fx.apply(MLP(), LoraSpec(rank=2), example_args=(torch.randn(4, 8),))
    before = graph_snapshot(gm)

    def broken(gm):
        raise RuntimeError("a broken pass")

    monkeypatch.setattr(lora_fx.build, "PIPELINE", [*PIPELINE, GraphPass("broken", broken)])
    with pytest.raises(RuntimeError, match="a broken pass") as caught:
        gm.eval()                                                     # captures and builds the eval graph
    assert any("lora_fx graph pass 'broken'" in note and "eval graph" in note for note in caught.value.__notes__)
    assert_graph_unchanged(gm, before)
