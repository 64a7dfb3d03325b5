"""PEFT adapter directories both ways, checked against PEFT itself; broken adapters change nothing."""

import copy
import json
import pickle
from pathlib import Path

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lora_fx
from lora_fx import AdapterError, LoraSpec
from tests.conftest import all_code, assert_unchanged, captured, ids, randomize_lora, snapshot, tiny_gpt2, tiny_llama

BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def build(arch):
    torch.manual_seed(0)
    return BUILD[arch]().eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ours_loads_in_peft_with_equal_outputs(arch, tmp_path):
    model = build(arch)
    rank_pattern = {"layers.1.*": 2} if arch == "llama" else None
    spec = LoraSpec(targets="all-linear", rank=4, alpha=8.0, rank_pattern=rank_pattern)
    gm = lora_fx.apply(captured(arch), spec)
    randomize_lora(gm)
    lora_fx.save_adapter(gm, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["auto_mapping"]["base_model_class"] == type(model).__name__
    assert config["fan_in_fan_out"] == (arch == "gpt2")
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as reader:
        assert reader.metadata()["lora_fx_version"] == lora_fx.__version__
        assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                   for k in reader.keys())
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path))
    x = ids(3, 6, seed=2)
    expected = gm(x).logits
    assert not torch.allclose(expected, model(x, use_cache=False).logits, atol=1e-3)
    torch.testing.assert_close(reference(input_ids=x, use_cache=False).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_saved_adapter_loads_with_equal_outputs(arch, tmp_path):
    model = build(arch)
    targets = ["q_proj", "down_proj"] if arch == "llama" else "all-linear"
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=targets, r=4, lora_alpha=12,
                                                                          use_rslora=True))
    randomize_lora(reference, seed=4)
    reference.save_pretrained(str(tmp_path))
    gm = lora_fx.load_adapter(captured(arch), tmp_path, adapter="from_peft")
    assert lora_fx.adapters(gm) == ["from_peft"]
    x = ids(2, 9, seed=3)
    torch.testing.assert_close(gm(x).logits, reference(input_ids=x, use_cache=False).logits, rtol=0, atol=1e-5)


def test_round_trip_through_our_own_files(tmp_path):
    gm = lora_fx.apply(captured("llama"), LoraSpec(targets=["q_proj", "v_proj"], rank=3, alpha=5.0, dropout=0.1))
    randomize_lora(gm)
    lora_fx.save_adapter(gm, tmp_path / "a")
    loaded = lora_fx.load_adapter(captured("llama"), tmp_path / "a")
    gm.eval(), loaded.eval()
    torch.testing.assert_close(loaded(ids()).logits, gm(ids()).logits, rtol=0, atol=0)
    assert loaded.meta["lora_fx"].specs["default"].dropout == 0.1


@pytest.fixture
def saved(tmp_path):
    gm = lora_fx.apply(captured("llama"), LoraSpec(targets=["q_proj"], rank=2))
    randomize_lora(gm)
    lora_fx.save_adapter(gm, tmp_path)
    return tmp_path


def edit_tensors(path: Path, edit):
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as reader:
        tensors = {k: reader.get_tensor(k) for k in reader.keys()}
    edit(tensors)
    save_file(tensors, str(path / "adapter_model.safetensors"))


def edit_config(path: Path, **fields):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(fields)
    (path / "adapter_config.json").write_text(json.dumps(config))


def wrong_rank(path):
    edit_tensors(path, lambda t: t.update({k: torch.zeros(3, 32) for k in t if "lora_A" in k}))


def wrong_key(path):
    def rename(tensors):
        key = next(k for k in tensors if "layers.0" in k and "lora_B" in k)
        tensors[key.replace("lora_B", "lora_b")] = tensors.pop(key)
    edit_tensors(path, rename)


def truncated(path):
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])


BROKEN = {
    "wrong rank": (wrong_rank, [r"has shape \(3, 32\), expected \(2, 32\)"]),
    "wrong key": (wrong_key, [r"missing tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight'",
                              r"unexpected tensor '.*lora_b.weight'"]),
    "truncated file": (truncated, [r"cannot be read .*truncated"]),
    "DoRA without magnitudes": (lambda p: edit_config(p, use_dora=True),
                                [r"missing tensor '.*layers.0.self_attn.q_proj.lora_magnitude_vector'"]),
    "unsupported field": (lambda p: edit_config(p, lora_bias=True), [r"`lora_bias` = True is not supported"]),
    "not LoRA": (lambda p: edit_config(p, peft_type="LOHA"), [r"peft_type is 'LOHA'"]),
    "two problems": (lambda p: (edit_config(p, lora_bias=True, modules_to_save=["lm_head"]), wrong_rank(p)),
                     [r"`lora_bias`", r"`modules_to_save`", r"has shape"]),
    "bad json": (lambda p: (p / "adapter_config.json").write_text("{"), [r"not valid JSON"]),
    "no weights": (lambda p: (p / "adapter_model.safetensors").unlink(), [r"adapter_model.safetensors is missing"]),
    "no target": (lambda p: edit_config(p, target_modules=["q_prj"]), [r"'q_prj' matched no module"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_adapter_is_one_error_and_changes_nothing(case, saved):
    damage, messages = BROKEN[case]
    damage(saved)
    gm = lora_fx.apply(captured("llama"), LoraSpec(targets=["v_proj"], rank=2))
    code, keys, before = all_code(gm), set(gm.state_dict()), snapshot(gm)
    with pytest.raises(AdapterError) as caught:
        lora_fx.load_adapter(gm, saved, adapter="new")
    for message in messages:
        assert __import__("re").search(message, str(caught.value)), (message, str(caught.value))
    assert "nothing was changed" in str(caught.value)
    assert all_code(gm) == code and set(gm.state_dict()) == keys and lora_fx.adapters(gm) == ["default"]
    assert_unchanged(gm, before)


class Trap:
    """Unpickling this creates a file: proof that a pickle ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_adapter_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    edit = {"peft_type": "LORA", "target_modules": ["q_proj"], "r": 2, "lora_alpha": 4}
    (adapter_dir / "adapter_config.json").write_text(json.dumps(edit))
    (adapter_dir / "adapter_model.bin").write_bytes(pickle.dumps(Trap(marker)))
    gm = captured("llama")
    with pytest.raises(AdapterError, match=r"only adapter_model.bin \(a pickle\) is present.*lora-fx convert"):
        lora_fx.load_adapter(gm, adapter_dir)
    assert not marker.exists()
    pickle.loads((adapter_dir / "adapter_model.bin").read_bytes())   # the trap is real: unpickling runs it
    assert marker.exists()


def test_existing_adapter_name_and_missing_directory(tmp_path):
    gm = lora_fx.apply(captured("llama"), LoraSpec(targets=["q_proj"], rank=2))
    with pytest.raises(AdapterError, match="'default' already exists"):
        lora_fx.load_adapter(gm, tmp_path)
    with pytest.raises(AdapterError, match="does not exist or is not a directory"):
        lora_fx.load_adapter(gm, tmp_path / "nope", adapter="b")


def test_save_refuses_a_file_path_and_unknown_adapter(tmp_path):
    gm = lora_fx.apply(captured("llama"), LoraSpec(targets=["q_proj"], rank=2))
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterError, match="exists and is not a directory"):
        lora_fx.save_adapter(gm, tmp_path / "file")
    with pytest.raises(AdapterError, match="unknown adapter"):
        lora_fx.save_adapter(gm, tmp_path / "d", adapter="b")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("content", ["[1, 2]", '"LORA"', "null", "3"])
def test_a_config_that_is_not_a_json_object_is_a_clear_error(saved, content):
    (saved / "adapter_config.json").write_text(content)
    gm = captured("llama")
    with pytest.raises(AdapterError, match=r"adapter_config.json must hold a JSON object \(a PEFT LoraConfig\)"):
        lora_fx.load_adapter(gm, saved)
    assert lora_fx.adapters(gm) == []


def test_non_finite_adapter_weights_are_refused_on_load_and_hot_swap(saved):
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    edit_tensors(saved, lambda t: t[key].__setitem__((0, 0), float("nan")))
    gm = lora_fx.apply(captured("llama"), LoraSpec(targets=["q_proj"], rank=2))
    before = snapshot(gm)
    for load in (lambda: lora_fx.load_adapter(gm, saved, adapter="new"), lambda: lora_fx.hotswap_adapter(gm, saved)):
        with pytest.raises(AdapterError, match=f"tensor '{key}' holds NaN or Inf"):
            load()
    assert_unchanged(gm, before)


def test_saving_replaces_the_directory_as_one_unit_and_keeps_other_files(saved, monkeypatch):
    previous = {p.name: p.read_bytes() for p in saved.iterdir()}
    (saved / "README.md").write_text("my notes")
    gm = lora_fx.apply(captured("llama"), LoraSpec(targets=["v_proj"], rank=3))

    def crash_midway(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt
    monkeypatch.setattr("lora_fx.exporters.peft_dir.save_file", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        lora_fx.save_adapter(gm, saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir() if p.name != "README.md"} == previous
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(f".{saved.name}.")]   # no staging left
    monkeypatch.undo()
    lora_fx.save_adapter(gm, saved)
    assert (saved / "README.md").read_text() == "my notes"
    assert json.loads((saved / "adapter_config.json").read_text())["r"] == 3


def test_saving_never_writes_through_symbolic_links(tmp_path):
    gm = lora_fx.apply(captured("llama"), LoraSpec(targets=["q_proj"], rank=2))
    outside = tmp_path / "precious.json"
    outside.write_text("keep me")
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").symlink_to(outside)
    lora_fx.save_adapter(gm, adapter_dir)
    assert outside.read_text() == "keep me" and not (adapter_dir / "adapter_config.json").is_symlink()
    (tmp_path / "link").symlink_to(adapter_dir)
    with pytest.raises(AdapterError, match="is a symbolic link, and lora_fx never writes through links"):
        lora_fx.save_adapter(gm, tmp_path / "link")


class Nested(torch.nn.Module):
    """`up` is also a dotted suffix of `block.up`: as PEFT list targets, the name `up` would select both."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(4, 4)
        self.block = torch.nn.Module()
        self.block.up = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.block.up(self.up(x))


@pytest.mark.parametrize("targets", [["up"], ["block.up"]])
def test_saved_targets_reload_as_exactly_those_modules(tmp_path, targets):
    torch.manual_seed(0)
    model = Nested()
    gm = lora_fx.apply(model, LoraSpec(targets=r"up" if targets == ["up"] else targets, rank=2),
                       example_args=(torch.randn(2, 4),))
    randomize_lora(gm)
    lora_fx.save_adapter(gm, tmp_path)
    loaded = lora_fx.load_adapter(lora_fx.capture(model, (torch.randn(2, 4),)), tmp_path)
    assert loaded.meta["lora_fx"].sites["default"] == gm.meta["lora_fx"].sites["default"] == tuple(targets)
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path))
    x = torch.randn(3, 4)
    torch.testing.assert_close(reference(x), gm(x), rtol=0, atol=1e-6)


def test_path_like_adapter_names_never_reach_the_file_system(saved, tmp_path):
    gm = captured("llama")
    with pytest.raises(lora_fx.LoraSpecError, match="`adapter` must be a non-empty name"):
        lora_fx.load_adapter(gm, saved, adapter="../escape")
    with pytest.raises(AdapterError, match="unknown adapter"):
        lora_fx.save_adapter(gm, tmp_path / "out", adapter="../escape")
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape").exists()
