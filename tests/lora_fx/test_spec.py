import math

import pytest

from lora_fx import LoraSpec, LoraSpecError


@pytest.mark.parametrize("field, value, message", [
    ("rank", 0, "`rank` must be a positive int, got 0"),
    ("rank", 2.0, "`rank` must be a positive int, got 2.0"),
    ("rank", True, "`rank` must be a positive int, got True"),
    ("alpha", 0, "`alpha` must be a positive finite number, got 0"),
    ("alpha", math.inf, "`alpha` must be a positive finite number, got inf"),
    ("alpha", "16", "`alpha` must be a positive finite number"),
    ("dropout", 1.0, "`dropout` must be a number in \\[0, 1\\), got 1.0"),
    ("dropout", -0.1, "`dropout` must be a number in \\[0, 1\\)"),
    ("adapter", "", "`adapter` must be a non-empty name"),
    ("adapter", "a.b", "`adapter` must be a non-empty name.*'a.b'"),
    ("targets", "(", "`targets` is not a valid regular expression"),
    ("targets", [], "`targets` as a list must hold non-empty module names"),
    ("targets", ["q_proj", ""], "`targets` as a list must hold non-empty module names"),
    ("targets", 3, "`targets` must be 'all-linear', a regex str, a list of module names or a callable"),
    ("targets", "", "`targets` must not be an empty string"),
    ("exclude", "all-linear", "`exclude` cannot be 'all-linear'"),
    ("exclude", "[", "`exclude` is not a valid regular expression"),
    ("layers", -1, "`layers` must be a non-negative int or a non-empty list"),
    ("layers", [], "`layers` must be a non-negative int or a non-empty list"),
    ("layers", [0, "1"], "`layers` must be a non-negative int or a non-empty list"),
    ("rank_pattern", {"q_proj": 0}, "`rank_pattern\\['q_proj'\\]` must be a positive int, got 0"),
    ("rank_pattern", {"(": 4}, "`rank_pattern` is not a valid regular expression"),
    ("rank_pattern", ["q"], "`rank_pattern` must be a non-empty dict"),
    ("alpha_pattern", {"q": -1.0}, "`alpha_pattern\\['q'\\]` must be a positive finite number"),
    ("use_rslora", 1, "`use_rslora` must be a bool, got 1"),
    ("init", "pissa", "`init` must be one of \\('default', 'gaussian'\\), got 'pissa'"),
    ("alpha", 10 ** 400, "`alpha` must be a positive finite number, got 1000.*\\(401 characters\\)"),
    ("targets", "all_linear", "`targets` 'all_linear' looks like a misspelling of 'all-linear'.*did you mean"),
    ("targets", "All-Linear", "did you mean 'all-linear'"),
    ("adapter", "training", "`adapter` 'training' is an nn.Module attribute name"),
    ("adapter", "forward", "`adapter` 'forward' is an nn.Module attribute name"),
    ("adapter", "to", "`adapter` 'to' is an nn.Module attribute name"),
    ("adapter", "../x", "`adapter` must be a non-empty name of letters, digits"),
])
def test_each_invalid_field_is_named(field, value, message):
    with pytest.raises(LoraSpecError, match=message):
        LoraSpec(**{field: value})


@pytest.mark.parametrize("field, value", [("rank", 0), ("alpha", -1.0), ("dropout", 1.5), ("adapter", "a/b")])
def test_one_bad_field_names_only_that_field(field, value):
    with pytest.raises(LoraSpecError) as caught:
        LoraSpec(**{field: value})
    named = [f for f in ("rank", "alpha", "dropout", "adapter", "targets") if f"`{f}`" in str(caught.value)]
    assert named == [field]


def test_every_problem_is_reported_at_once():
    with pytest.raises(LoraSpecError) as caught:
        LoraSpec(rank=0, alpha=-1, dropout=2)
    text = str(caught.value)
    assert "`rank`" in text and "`alpha`" in text and "`dropout`" in text


def test_spec_errors_are_value_and_type_errors():
    with pytest.raises(ValueError):
        LoraSpec(rank=0)
    with pytest.raises(TypeError):
        LoraSpec(targets=3)


def test_spec_is_immutable_and_hashable_and_owns_its_values():
    targets, ranks = ["q_proj"], {"q_proj": 2}
    spec = LoraSpec(targets=targets, layers=1, rank_pattern=ranks)
    targets.append("v_proj")
    ranks["q_proj"] = 5
    assert spec.targets == ("q_proj",) and spec.layers == (1,) and spec.rank_pattern == {"q_proj": 2}
    assert spec.rank_for("model.q_proj") == 2
    with pytest.raises(AttributeError):
        spec.rank = 4
    with pytest.raises(TypeError):
        spec.rank_pattern["q_proj"] = 3
    assert hash(spec) == hash(LoraSpec(targets=["q_proj"], layers=[1], rank_pattern={"q_proj": 2}))
    assert len({spec, LoraSpec(targets=("q_proj",), layers=(1,), rank_pattern={"q_proj": 2})}) == 1


def test_rank_and_alpha_patterns_follow_peft_suffix_rule():
    spec = LoraSpec(rank=8, alpha=16, rank_pattern={"q_proj": 2, r"layers\.1\.mlp\..*": 4}, alpha_pattern={"q_proj": 4})
    assert spec.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert spec.rank_for("model.layers.1.mlp.up_proj") == 4
    assert spec.rank_for("model.layers.0.mlp.up_proj") == 8
    assert spec.rank_for("model.layers.0.self_attn.xq_proj") == 8   # a suffix match is on dotted boundaries
    assert spec.scale_for("model.layers.0.self_attn.q_proj") == 4 / 2
    assert spec.scale_for("model.layers.0.mlp.up_proj") == 16 / 8


def test_rslora_scale():
    assert LoraSpec(rank=16, alpha=8, use_rslora=True).scale_for("x") == pytest.approx(8 / 4)


def test_differences_names_fields():
    assert LoraSpec(rank=4).differences(LoraSpec(rank=8, dropout=0.1)) == ["rank", "dropout"]
