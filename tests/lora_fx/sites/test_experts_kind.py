"""MoE expert sites (`target_parameters`): outputs and gradients equal PEFT's `ParamWrapper` with the same weights
under every experts implementation torch.export can capture (Qwen3-MoE stores experts (E, out, in), GPT-OSS
(E, in, out)); adapters load both ways with PEFT's exact keys; merge equals unmerged; the LoRA branch is low-rank
(no dense delta); bad targets and uncapturable implementations are refused by name, changing nothing."""

import copy

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import lora_fx
from lora_fx import AdapterError, CaptureError, LoraSpec, TargetError
from lora_fx.state import tag_of
from tests.conftest import all_nodes, assert_graph_unchanged, graph_snapshot, randomize_lora

BOTH = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_moe(family: str, implementation: str, dtype=torch.float32):
    torch.manual_seed(0)
    if family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(vocab_size=97, hidden_size=24, intermediate_size=48,
                                             moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                             max_position_embeddings=64)
        model_class = transformers.Qwen3MoeForCausalLM
    else:
        config = transformers.GptOssConfig(vocab_size=97, hidden_size=24, intermediate_size=16, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                                           layer_types=["full_attention"],
                                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        model_class = transformers.GptOssForCausalLM
    config._experts_implementation = implementation
    return model_class(config).eval().to(dtype)


def example_ids(batch=2, seq=8, seed=0):
    return torch.randint(0, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


_CAPTURES = {}
def captured(family, implementation, dtype=torch.float32):
    """A deep copy of a once-per-session capture of `tiny_moe(family, implementation, dtype)`."""
    key = (family, implementation, dtype)
    if key not in _CAPTURES:
        _CAPTURES[key] = lora_fx.capture(tiny_moe(*key), (example_ids(),), {"use_cache": False})
    return copy.deepcopy(_CAPTURES[key])


def peft_twin(gm, model, **config):
    """PEFT on a copy of `model` holding `gm`'s LoRA weights."""
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config))
    params = dict(reference.named_parameters())
    trainable = [(name, p) for name, p in gm.named_parameters() if p.requires_grad]
    assert trainable and len(trainable) == sum(p.requires_grad for p in reference.parameters())
    with torch.no_grad():
        for name, param in trainable:
            params["base_model.model." + name].copy_(param)
    return reference


def assert_outputs_and_gradients_equal(gm, reference, x):
    ours, expected = gm(x).logits, reference(input_ids=x, use_cache=False).logits
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    ours.pow(2).mean().backward()
    expected.pow(2).mean().backward()
    params = dict(reference.named_parameters())
    for name, param in gm.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, params["base_model.model." + name].grad, rtol=1e-4, atol=1e-7,
                                       msg=name)


LOW_RANK = {"grouped_mm": {"grouped_mm"}, "batched_mm": {"bmm"}}


@pytest.mark.parametrize("family, implementation", [("qwen3_moe", "grouped_mm"), ("qwen3_moe", "batched_mm"),
                                                    ("gpt_oss", "grouped_mm"), ("gpt_oss", "batched_mm")])
def test_experts_equal_peft_target_parameters_and_merge(family, implementation):
    model = tiny_moe(family, implementation)
    gm = lora_fx.apply(captured(family, implementation), LoraSpec(target_parameters=BOTH, rank=2, alpha=6.0))
    info = gm.meta["lora_fx"].site_info
    gate_up = info["model.layers.0.mlp.experts.gate_up_proj"]
    assert (gate_up.kind, gate_up.in_features, gate_up.out_features) == ("experts", 24, 32)
    assert gm.get_parameter("model.layers.0.mlp.experts.base_layer.lora_A.default.weight").shape == (2 * 4, 24)
    assert gm.get_parameter("model.layers.0.mlp.experts.lora_B.default.weight").shape == (24, 2 * 4)
    # the branch is two rank-r products per read, by the read's own op: no (E, out, in) delta is ever formed
    products = [n for n in all_nodes(gm) if tag_of(n).get("role") in ("down", "up")]
    assert {n.target._schema.name.split("::")[-1] for n in products} == LOW_RANK[implementation]
    assert len(products) == 2 * len(info)
    randomize_lora(gm)
    reference = peft_twin(gm, model, target_modules=[], target_parameters=BOTH, r=2, lora_alpha=6)
    x = example_ids(3, 7, seed=1)
    assert_outputs_and_gradients_equal(gm, reference, x)
    assert not torch.allclose(gm(x).logits, model(x, use_cache=False).logits, atol=1e-3)
    torch.testing.assert_close(lora_fx.merge(gm)(x).logits, gm(x).logits, rtol=0, atol=1e-5)


class ShapesMade(TorchDispatchMode):
    """Records the shape of every tensor with new storage an op returns (custom ops included, as one op)."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = lambda tree: [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]
        read = {t.untyped_storage().data_ptr() for t in tensors((args, kwargs))}
        self.shapes |= {tuple(t.shape) for t in tensors(out) if t.untyped_storage().data_ptr() not in read}
        return out


@pytest.mark.parametrize("family, implementation, spec", [
    ("qwen3_moe", "grouped_mm", LoraSpec(target_parameters=BOTH, rank=2)),
    ("qwen3_moe", "batched_mm", LoraSpec(target_parameters=BOTH, rank=2)),
    ("gpt_oss", "grouped_mm", LoraSpec(target_parameters=BOTH, rank=2)),
    ("qwen3_moe", "grouped_mm", LoraSpec(targets=["q_proj"], layers=[0], rank=2)),     # experts frozen, backward
])                                                                                    # still runs through them
def test_a_training_step_makes_no_tensor_of_a_frozen_expert_weights_size(family, implementation, spec):
    # transformers' fp32 `grouped_mm_fallback` backward allocates and computes the (E, k, n) gradient of the frozen
    # weight at every read; while an adapter exists the graph reads experts with `lora_fx::grouped_mm`, which does
    # not (nor copies the weight); deleting the adapter gives back the plain capture's fallback
    gm = lora_fx.apply(captured(family, implementation), spec)
    randomize_lora(gm)
    weights = {tuple(p.shape) for name, p in gm.named_parameters() if name.endswith(("gate_up_proj", "down_proj"))}
    weight_shapes = weights | {(e, n, k) for e, k, n in weights}
    fallbacks = lambda: [n for n in all_nodes(gm) if "grouped_mm_fallback" in str(n.target)]
    assert not fallbacks()
    with ShapesMade() as made:
        gm(example_ids(3, 7, seed=1)).logits.pow(2).mean().backward()
    assert made.shapes and not made.shapes & weight_shapes
    assert all(p.grad is None for name, p in gm.named_parameters() if not p.requires_grad)
    lora_fx.delete_adapter(gm, "default")
    assert bool(fallbacks()) == (implementation == "grouped_mm")


SMALL = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, num_experts_per_tok=2)
SHARED = dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1,
              first_k_dense_replace=1, n_group=1, topk_group=1)
FAMILIES = {
    "mixtral": ("Mixtral", dict(intermediate_size=16, num_local_experts=4)),
    "qwen2_moe": ("Qwen2Moe", dict(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                   num_experts=4)),
    "olmoe": ("Olmoe", dict(intermediate_size=16, num_experts=4)),
    "granitemoe": ("GraniteMoe", dict(intermediate_size=16, num_local_experts=4)),
    "deepseek_v3": ("DeepseekV3", dict(SHARED, num_key_value_heads=4, kv_lora_rank=8, q_lora_rank=8,
                                       qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)),
    "glm4_moe": ("Glm4Moe", dict(SHARED, head_dim=8)),
    "qwen3_next": ("Qwen3Next", dict(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                     num_experts=4, head_dim=8, linear_num_value_heads=4, linear_num_key_heads=2,
                                     linear_key_head_dim=8, linear_value_head_dim=8,
                                     layer_types=["linear_attention", "full_attention"])),
}


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("family", [pytest.param(name, marks=pytest.mark.zoo) if name == "qwen3_next" else name
                                    for name in FAMILIES])      # Qwen3-Next: 70 s, with the zoo (pytest -m zoo)
def test_moe_families_equal_peft_target_parameters(family, implementation):
    prefix, sizes = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, f"{prefix}Config")(**(SMALL | sizes))
    config._experts_implementation = implementation
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
    targets = ["experts.gate_up_proj", "experts.down_proj"]
    gm = lora_fx.apply(model, LoraSpec(target_parameters=targets, rank=2, alpha=6.0), (example_ids(),),
                       {"use_cache": False})
    assert {site.kind for site in gm.meta["lora_fx"].site_info.values()} == {"experts"}
    randomize_lora(gm)
    reference = peft_twin(gm, model, target_modules=[], target_parameters=targets, r=2, lora_alpha=6)
    x = example_ids(3, 7, seed=1)
    assert_outputs_and_gradients_equal(gm, reference, x)
    torch.testing.assert_close(lora_fx.merge(gm)(x).logits, gm(x).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("target_parameters", [["gate_up_proj"], ["down_proj"], BOTH])
def test_adapters_load_both_ways_with_peft_keys(target_parameters, tmp_path):
    model = tiny_moe("qwen3_moe", "grouped_mm")
    spec = LoraSpec(target_parameters=target_parameters, rank=2, alpha=6.0)
    gm = lora_fx.apply(captured("qwen3_moe", "grouped_mm"), spec)
    randomize_lora(gm)
    reference = peft_twin(gm, model, target_modules=[], target_parameters=target_parameters, r=2, lora_alpha=6)
    lora_fx.save_adapter(gm, tmp_path / "ours")
    reference.save_pretrained(str(tmp_path / "theirs"))
    ours, theirs = (load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in ("ours", "theirs"))
    assert ours.keys() == theirs.keys()                    # nested keys included: `experts.base_layer.lora_A.weight`
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    x = example_ids(3, 5, seed=2)
    expected = gm(x).logits
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours"))
    torch.testing.assert_close(in_peft(input_ids=x, use_cache=False).logits, expected, rtol=0, atol=1e-5)
    loaded = lora_fx.load_adapter(captured("qwen3_moe", "grouped_mm"), tmp_path / "theirs")
    torch.testing.assert_close(loaded(x).logits, expected, rtol=0, atol=0)


def test_targets_and_target_parameters_together(tmp_path):
    model = tiny_moe("qwen3_moe", "batched_mm")
    gm = lora_fx.apply(captured("qwen3_moe", "batched_mm"),
                       LoraSpec(targets=["q_proj", "v_proj"], target_parameters=["down_proj"], rank=4, alpha=8.0))
    assert sorted(site.kind for site in gm.meta["lora_fx"].site_info.values()) == ["experts"] * 2 + ["linear"] * 4
    randomize_lora(gm)
    reference = peft_twin(gm, model, target_modules=["q_proj", "v_proj"], target_parameters=["down_proj"], r=4,
                          lora_alpha=8)
    assert_outputs_and_gradients_equal(gm, reference, example_ids(2, 6, seed=3))
    lora_fx.save_adapter(gm, tmp_path)
    loaded = lora_fx.load_adapter(captured("qwen3_moe", "batched_mm"), tmp_path)
    x = example_ids(2, 5, seed=4)
    torch.testing.assert_close(loaded(x).logits, gm(x).logits, rtol=0, atol=0)


def test_bf16_experts_read_by_aten_grouped_mm():
    model = tiny_moe("qwen3_moe", "grouped_mm", torch.bfloat16)
    gm = lora_fx.apply(captured("qwen3_moe", "grouped_mm", torch.bfloat16),
                       LoraSpec(target_parameters=BOTH, rank=2, alpha=4.0))
    assert {n.target for n in all_nodes(gm) if "grouped_mm" in str(n.target)} == {
        torch.ops.aten._grouped_mm.default, torch.ops.lora_fx.grouped_mm.default}     # the model's, and the branch's
    assert gm.get_parameter("model.layers.0.mlp.experts.lora_A.default.weight").dtype == torch.bfloat16
    randomize_lora(gm)
    reference = peft_twin(gm, model, target_modules=[], target_parameters=BOTH, r=2, lora_alpha=4)
    x = example_ids(2, 6, seed=5)
    torch.testing.assert_close(gm(x).logits, reference(input_ids=x, use_cache=False).logits, rtol=0, atol=3e-2)


def test_adapters_of_other_ranks_share_a_slot_and_combine_is_refused(tmp_path):
    gm = lora_fx.apply(captured("qwen3_moe", "grouped_mm"), LoraSpec(target_parameters=BOTH, rank=4))
    small = lora_fx.apply(captured("qwen3_moe", "grouped_mm"), LoraSpec(target_parameters=BOTH, rank=2, alpha=4.0))
    randomize_lora(small, seed=3)
    lora_fx.save_adapter(small, tmp_path)
    lora_fx.hotswap_adapter(gm, tmp_path)            # rank 2 zero-padded per expert into the rank-4 slot
    x = example_ids(2, 6, seed=6)
    torch.testing.assert_close(gm(x).logits, small(x).logits, rtol=0, atol=1e-5)
    lora_fx.load_adapter(gm, tmp_path, adapter="b")
    with pytest.raises(AdapterError, match="combines module sites only; .*experts.gate_up_proj"):
        lora_fx.add_weighted_adapter(gm, ["default", "b"], [0.5, 0.5], "mix")


def test_onnx_export_merged_and_unmerged_with_swappable_adapters(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from lora_fx.exporters.onnx import export_onnx_adapter
    gm = lora_fx.apply(captured("qwen3_moe", "grouped_mm"), LoraSpec(target_parameters=BOTH, rank=2))
    lora_fx.apply(gm, LoraSpec(target_parameters=BOTH, rank=3, alpha=5.0, adapter="b"))
    randomize_lora(gm)
    gm.eval()
    lora_fx.set_active(gm, "default")
    # each file is checked against torch in onnxruntime before it is kept; grouped_mm goes through its decomposition
    lora_fx.export_onnx(gm, tmp_path / "merged.onnx")
    lora_fx.export_onnx(gm, tmp_path / "unmerged.onnx", merged=False)
    export_onnx_adapter(gm, tmp_path / "b.onnx_adapter", adapter="b")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = lambda name: ort.InferenceSession(str(tmp_path / name), options, providers=["CPUExecutionProvider"])
    x = example_ids(3, 5, seed=7)                                   # not the capture's shape
    expected = gm(x).logits.detach().numpy()
    torch.testing.assert_close(torch.from_numpy(session("merged.onnx").run(None, {"input_ids": x.numpy()})[0]),
                               torch.from_numpy(expected), rtol=0, atol=1e-4)
    unmerged = session("unmerged.onnx")
    slots = [i.name for i in unmerged.get_overridable_initializers()]         # PEFT's keys, nested ones included
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in slots
    adapter = ort.LoraAdapter()
    adapter.Load(str(tmp_path / "b.onnx_adapter"))
    run_options = ort.RunOptions()
    run_options.add_active_adapter(adapter)
    swapped = unmerged.run(None, {"input_ids": x.numpy()}, run_options)[0]
    lora_fx.set_active(gm, "b")
    expected_b = gm(x).logits.detach()
    torch.testing.assert_close(torch.from_numpy(swapped), expected_b, rtol=0, atol=1e-4)
    assert not torch.allclose(expected_b, torch.from_numpy(expected), atol=1e-3)


# ---- bad input: refused by name, nothing changed ---------------------------------------------------------------------

@pytest.mark.parametrize("target_parameters, message", [
    (["mlp.experts.gate_proj"], r"target parameter 'mlp.experts.gate_proj' matched no parameter; nearest: "
                                r"\[.*'gate_up_proj'"),
    (["mlp.experts.gate_up_proj_bias"], r"'mlp.experts.gate_up_proj_bias' names 'model.layers.0.mlp.experts."
                                        r"gate_up_proj_bias' \(4, 32\), which no parameter site kind adapts: "
                                        r"`target_parameters` adapts 3-D MoE expert weights"),
])
def test_missing_or_non_3d_target_parameters_are_refused(target_parameters, message):
    gm = lora_fx.apply(captured("gpt_oss", "grouped_mm"), LoraSpec(target_parameters=["down_proj"], adapter="a"))
    before = graph_snapshot(gm)
    with pytest.raises(TargetError, match=message):
        lora_fx.apply(gm, LoraSpec(target_parameters=target_parameters))
    assert_graph_unchanged(gm, before)


def test_dropout_and_another_nesting_of_a_parameter_are_refused():
    gm = lora_fx.apply(captured("qwen3_moe", "grouped_mm"), LoraSpec(target_parameters=BOTH, adapter="a"))
    before = graph_snapshot(gm)
    with pytest.raises(TargetError, match=r"`dropout` must be 0 for expert parameters .*ParamWrapper"):
        lora_fx.apply(gm, LoraSpec(target_parameters=BOTH, dropout=0.1))
    with pytest.raises(TargetError, match=r"'model.layers.0.mlp.experts.gate_up_proj' is adapted by \['a'\] with "
                                          r"PEFT's nesting depth 1, but .* give it depth 0"):
        lora_fx.apply(gm, LoraSpec(target_parameters=["gate_up_proj"]))
    assert_graph_unchanged(gm, before)
    lora_fx.apply(gm, LoraSpec(target_parameters=["down_proj"], adapter="b"))     # same depth: fine
    assert "model.layers.1.mlp.experts.lora_A.b.weight" in gm.state_dict()


@pytest.mark.parametrize("implementation", ["eager", "sonicmoe", "deepgemm"])
def test_uncapturable_experts_implementations_are_refused_naming_module_and_alternatives(implementation):
    model = tiny_moe("qwen3_moe", implementation)
    with pytest.raises(CaptureError, match=rf"experts module 'model.layers.0.mlp.experts' \(and 1 more\) runs the "
                                           rf"'{implementation}' experts implementation.*'grouped_mm' and "
                                           rf"'batched_mm'.*set_experts_implementation\('grouped_mm'\)"):
        lora_fx.apply(model, LoraSpec(target_parameters=BOTH), (example_ids(),), {"use_cache": False})
