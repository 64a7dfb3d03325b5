import pytest
import torch

import lora_fx
from lora_fx import LoraSpec, TargetError
from lora_fx.match import analyse, layer_index, match
from lora_fx.state import state_of
from tests.conftest import all_code, assert_unchanged, captured, ids, randomize_lora, snapshot

LLAMA_PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def sites_of(gm, spec):
    return [site.fqn for site in match(gm, spec, state_of(gm)).sites]


@pytest.fixture
def llama_graph():
    return captured("llama")


def test_all_linear_skips_only_the_output_layer_in_graph_order(llama_graph):
    expected = [f"model.layers.{i}.{p}" for i in range(2) for p in LLAMA_PROJ]
    assert sites_of(llama_graph, LoraSpec()) == expected
    skipped = {s.fqn: s.reason for s in match(llama_graph, LoraSpec(), state_of(llama_graph)).skipped}
    assert "output layer" in skipped["lm_head"]


def test_list_regex_callable_exclude_and_layers(llama_graph):
    assert sites_of(llama_graph, LoraSpec(targets=["q_proj", "model.layers.1.mlp.down_proj"])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    assert sites_of(llama_graph, LoraSpec(targets=r".*\.(q|v)_proj", layers=[1])) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert sites_of(llama_graph, LoraSpec(targets=["q_proj", "v_proj"], exclude=["v_proj"], layers=0)) == [
        "model.layers.0.self_attn.q_proj"]
    square = LoraSpec(targets=lambda site: site.in_features == site.out_features and site.layer == 0)
    assert sites_of(llama_graph, square) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"]


def test_site_describes_shape_layer_and_op():
    gm = captured("gpt2")
    site = next(s for s in analyse(gm)["transformer.h.1.attn.c_attn"].sites)
    assert (site.in_features, site.out_features, site.layer, site.op, site.fan_in_fan_out) == (32, 96, 1, "addmm", True)
    assert site.weight == "transformer.h.1.attn.c_attn.weight" and len(site.nodes) == 1


def test_layer_index_is_the_first_numeric_component():
    assert layer_index("model.layers.3.mlp.experts.1.w1") == 3
    assert layer_index("lm_head") is None


def test_module_called_twice_is_one_site_with_two_nodes():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.shared(torch.relu(self.shared(x)))

    gm = lora_fx.capture(Twice(), (torch.randn(2, 4),))
    [site] = match(gm, LoraSpec(), state_of(gm)).sites
    assert site.fqn == "shared" and len(site.nodes) == 2


def test_unmatched_target_lists_nearest_names(llama_graph):
    with pytest.raises(TargetError, match=r"target 'q_prj' matched no module; nearest: \['q_proj'"):
        lora_fx.apply(llama_graph, LoraSpec(targets=["q_prj", "v_proj"]))


def test_regex_that_matches_nothing(llama_graph):
    with pytest.raises(TargetError, match=r"target '.\*qkv' matched no module"):
        lora_fx.apply(llama_graph, LoraSpec(targets=".*qkv"))


def test_selecting_nothing_after_filters_is_an_error(llama_graph):
    with pytest.raises(TargetError, match="selects no site.*layers=\\(7,\\)"):
        lora_fx.apply(llama_graph, LoraSpec(targets=["q_proj"], layers=7))


def test_a_target_no_site_kind_reads_names_module_op_and_kinds(llama_graph):
    with pytest.raises(TargetError, match=r"'model.norm' is targeted but has no read lora_fx can adapt: its "
                                          r"parameters are read by \['mul'\]; supported: site kinds \['linear', "
                                          r"'embedding', 'conv', 'experts'\] \(linear ops: .*aten.linear.default"):
        lora_fx.apply(llama_graph, LoraSpec(targets=["model.norm"]))


def test_weight_also_read_by_an_unknown_op_is_refused(copy_of):
    class Fused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x) + self.proj.weight.sum()   # a second read, that no site kind understands

    model = Fused()
    before = snapshot(model)
    gm = lora_fx.capture(model, (torch.randn(2, 4),))
    code = all_code(gm)
    with pytest.raises(TargetError, match=r"'proj' is targeted but its weight is also read by \['sum'\]"):
        lora_fx.apply(gm, LoraSpec(targets=["proj"]))
    assert all_code(gm) == code and not lora_fx.adapters(gm)
    assert_unchanged(model, before)
    traced = lora_fx.capture(model)                   # torch.fx: the read is a method call, named as such
    with pytest.raises(TargetError, match=r"'proj' is targeted but its weight is also read by \['sum'\]"):
        lora_fx.apply(traced, LoraSpec(targets=["proj"]))


def test_failed_apply_on_a_model_leaves_it_unchanged(llama):
    before = snapshot(llama)
    with pytest.raises(TargetError):
        lora_fx.apply(llama, LoraSpec(targets=["nope"]), example_args=(ids(),), example_kwargs={"use_cache": False})
    assert_unchanged(llama, before)


class TwoLayouts(torch.nn.Module):
    """One weight read as nn.Linear reads it (x @ W.T) and as HF Conv1D does (y @ W)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(6, 4, bias=False)      # W: (4, 6)

    def forward(self, x, y):                               # x: (n, 6), y: (n, 4)
        return self.proj(x), torch.mm(y, self.proj.weight)


def test_every_read_of_a_weight_is_adapted_in_its_own_layout_and_merge_agrees():
    torch.manual_seed(0)
    model = TwoLayouts()
    gm = lora_fx.apply(model, LoraSpec(targets=["proj"], rank=2, alpha=3.0), (torch.randn(3, 6), torch.randn(3, 4)))
    [site] = match(gm, LoraSpec(targets=["proj"]), state_of(gm)).sites
    assert site.op == "linear+mm" and not site.fan_in_fan_out and [r.detail.weight_transposed for r in site.reads] == [False, True]
    randomize_lora(gm)
    A, B, scale = lora_fx.adapter_weights(gm, "default")["proj"]
    adapted = model.proj.weight + scale * B @ A                        # ΔW in the weight's own (out, in) layout
    x, y = torch.randn(5, 6), torch.randn(5, 4)
    expected = (x @ adapted.T, y @ adapted)
    for ours, want in zip(gm(x, y), expected):
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)
    for ours, want in zip(lora_fx.merge(gm)(x, y), expected):
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)


def test_only_reads_of_the_weight_matter():
    class BiasReadElsewhere(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x) * self.proj.bias.sigmoid()

    gm = lora_fx.apply(BiasReadElsewhere(), LoraSpec(targets=["proj"], rank=2), (torch.randn(2, 4),))
    assert lora_fx.adapters(gm) == ["default"] and gm.get_parameter("proj.lora_A.default.weight").shape == (2, 4)
