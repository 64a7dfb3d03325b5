import torch

from lora_fx.cli import main
from tests.conftest import MLP


def mlp_factory():
    return MLP(), (torch.randn(2, 8),)


def test_inspect_lists_sites_without_changing_anything(capsys):
    assert main(["inspect", "--model", "tests.lora_fx.test_cli:mlp_factory", "--targets", "up", "--rank", "2"]) == 0
    out = capsys.readouterr().out
    assert "up" in out and "12x8" in out and "40" in out and "1 sites, 40 LoRA parameters" in out


def test_inspect_of_the_demo_model_with_skipped_reasons(capsys):
    assert main(["inspect", "--targets", "q_proj", "--layers", "1", "--show-skipped"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.self_attn.q_proj" in out and "layer 0 is not in `layers`" in out


def test_inspect_reports_bad_targets_with_exit_code_2(capsys):
    assert main(["inspect", "--targets", "q_prj"]) == 2
    assert "target 'q_prj' matched no module; nearest: ['q_proj'" in capsys.readouterr().err


def test_inspect_rejects_a_malformed_factory_path(capsys):
    assert main(["inspect", "--model", "no_colon"]) == 2
    assert "'module:factory'" in capsys.readouterr().err


def test_demo_trains_and_the_loss_falls(capsys):
    assert main(["demo", "--steps", "30"]) == 0
    out = capsys.readouterr().out
    assert "trainable: 16,384" in out and "14 sites" in out
    base, adapted = (float(x.split()[-1].rstrip(",")) for x in out.split("held-out loss:")[1].split("with adapter"))
    assert adapted < base - 0.5


def test_demo_saves_and_merge_writes_merged_weights(tmp_path, capsys):
    from safetensors.torch import load_file

    import lora_fx
    from lora_fx.demo import demo_model

    assert main(["demo", "--steps", "3", "--save", str(tmp_path / "adapter")]) == 0
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged.safetensors")]) == 0
    merged = load_file(tmp_path / "merged.safetensors")
    model, args, kwargs = demo_model()
    gm = lora_fx.load_adapter(lora_fx.capture(model, args, kwargs), tmp_path / "adapter")
    expected = lora_fx.merge(gm).state_dict()
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in merged)
    assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"], model.model.layers[0].mlp.up_proj.weight)


def test_convert_turns_a_tensor_pickle_into_safetensors_and_refuses_code(tmp_path, capsys):
    import pickle
    from pathlib import Path

    from safetensors.torch import load_file

    from tests.exporters.test_peft_dir import Trap

    tensors = {"base_model.model.up.lora_A.weight": torch.randn(2, 8)}
    torch.save(tensors, tmp_path / "adapter_model.bin")
    assert main(["convert", str(tmp_path)]) == 0
    assert torch.equal(load_file(tmp_path / "adapter_model.safetensors")["base_model.model.up.lora_A.weight"],
                       tensors["base_model.model.up.lora_A.weight"])
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "adapter_model.bin").write_bytes(pickle.dumps(Trap(tmp_path / "pwned")))
    assert main(["convert", str(evil)]) == 2
    assert "refusing to load it" in capsys.readouterr().err and not Path(tmp_path / "pwned").exists()


def test_export_writes_unmerged_onnx_and_adapter_files(tmp_path, capsys):
    assert main(["demo", "--steps", "2", "--save", str(tmp_path / "counting")]) == 0
    assert main(["export", "--adapter", str(tmp_path / "counting"), "--out", str(tmp_path / "m.onnx"),
                 "--unmerged"]) == 0
    assert (tmp_path / "m.onnx").exists() and (tmp_path / "m.counting.onnx_adapter").exists()
    assert "checking it in onnxruntime" in capsys.readouterr().out


def mamba2_factory():
    from tests.lora_fx.test_ops import tiny_mamba2

    return tiny_mamba2(), (torch.randint(0, 50, (2, 12)),), {"use_cache": False}


def test_inspect_lists_out_proj_sites_that_need_the_fused_op_lowered(capsys):
    assert main(["inspect", "--model", "tests.lora_fx.test_cli:mamba2_factory", "--targets", "out_proj"]) == 0
    out = capsys.readouterr().out
    assert "backbone.layers.1.mixer.out_proj" in out and "2 sites" in out
