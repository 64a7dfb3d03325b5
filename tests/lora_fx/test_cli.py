import contextlib
import io
import os
import subprocess
import sys

import pytest
import torch

import lora_fx
from lora_fx.cli import main
from tests.conftest import MLP


def mlp_factory():
    return MLP(), (torch.randn(2, 8),)


def failing_factory():
    raise RuntimeError("the factory broke\nsecond line of detail")


def interrupted_factory():
    raise KeyboardInterrupt


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """(stdout, adapter directory) of one `lora-fx demo --steps 30 --save DIR`, shared by the tests that need it."""
    adapter = tmp_path_factory.mktemp("demo") / "counting"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["demo", "--steps", "30", "--save", str(adapter)]) == 0
    return out.getvalue(), adapter


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
    err = capsys.readouterr().err
    assert err.startswith("lora-fx inspect: cannot apply LoRA: target 'q_prj' matched no module; nearest: ['q_proj'")
    assert err.count("\n") == 1


def test_inspect_rejects_a_malformed_factory_path(capsys):
    assert main(["inspect", "--model", "no_colon"]) == 2
    assert "'module:factory'" in capsys.readouterr().err


def test_demo_trains_and_the_loss_falls(demo_run):
    out, adapter = demo_run
    assert "trainable: 16,384" in out and "14 sites" in out and f"adapter saved to {adapter}" in out
    held_out = next(line for line in out.splitlines() if line.startswith("held-out loss:"))
    base, adapted = (float(x.split()[-1].rstrip(",")) for x in held_out.split("with adapter"))
    assert adapted < base - 0.5
    lines = out.splitlines()
    table = lines[lines.index("generated (8 new tokens, greedy, KV cache):") + 3:][:3]
    for row in table:                                   # prompt | base | adapter, 4 + 8 + 8 numbers
        numbers = [int(x) for x in row.split()]
        prompt, base_tokens, adapter_tokens = numbers[:4], numbers[4:12], numbers[12:]
        assert adapter_tokens[0] == (prompt[-1] + 1) % 64 and adapter_tokens != base_tokens    # it learned to count


def test_merge_writes_merged_weights(demo_run, tmp_path, capsys):
    from safetensors.torch import load_file

    from lora_fx.demo import demo_model

    _, adapter = demo_run
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged.safetensors")]) == 0
    merged = load_file(tmp_path / "merged.safetensors")
    model, args, kwargs = demo_model()
    gm = lora_fx.load_adapter(lora_fx.capture(model, args, kwargs), adapter)
    expected = lora_fx.merge(gm).state_dict()
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in merged)
    assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"], model.model.layers[0].mlp.up_proj.weight)


def test_convert_turns_a_tensor_pickle_into_safetensors_and_refuses_code(tmp_path, capsys, recwarn):
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
    (evil / "adapter_model.bin").write_bytes(pickle.dumps(Trap(tmp_path / "pwned"), protocol=4))
    assert main(["convert", str(evil)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lora-fx convert: {evil / 'adapter_model.bin'} is not a plain tensor checkpoint, "
                          f"refusing to load it: Unsupported operand")
    assert err.count("\n") == 1 and not Path(tmp_path / "pwned").exists()
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


def test_export_writes_unmerged_onnx_and_adapter_files_without_library_noise(demo_run, tmp_path):
    """Run as a user would, in a fresh process: pytest's warning filters and logging set-up do not apply, so
    torch.onnx's notices and deprecation warnings would show on stderr."""
    _, adapter = demo_run
    result = subprocess.run([sys.executable, "-m", "lora_fx.cli", "export", "--adapter", str(adapter), "--out",
                             "m.onnx", "--unmerged"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m.onnx").exists() and (tmp_path / "m.counting.onnx_adapter").exists()
    assert "checking it in onnxruntime" in result.stdout
    assert not [line for line in result.stderr.splitlines() if "Warning" in line]
    assert result.stderr == ""


def mamba2_factory():
    from tests.lora_fx.test_ops import tiny_mamba2

    return tiny_mamba2(), (torch.randint(0, 50, (2, 12)),), {"use_cache": False}


def test_inspect_lists_out_proj_sites_that_need_the_fused_op_lowered(capsys):
    assert main(["inspect", "--model", "tests.lora_fx.test_cli:mamba2_factory", "--targets", "out_proj"]) == 0
    out = capsys.readouterr().out
    assert "backbone.layers.1.mixer.out_proj" in out and "2 sites" in out


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"lora-fx {lora_fx.__version__}\n"


@pytest.mark.parametrize("command, default", [
    ("demo", "training steps (default: 60)"),
    ("inspect", "LoRA alpha (scale = alpha / rank) (default: 16.0)"),
    ("merge", "(default: demo)"),
    ("export", "(default: demo)"),
])
def test_help_of_each_command_shows_defaults(command, default, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")                # no wrapping inside the expected text
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lora-fx {command} ") and default in out


@pytest.mark.parametrize("argv, error", [
    (["demo", "--steps", "0"], "argument --steps: must be a positive int, got '0'"),
    (["demo", "--steps", "many"], "argument --steps: must be a positive int, got 'many'"),
    (["demo", "--rank", "0"], "argument --rank: must be a positive int, got '0'"),
    (["demo", "--lr", "nan"], "argument --lr: must be a positive finite number, got 'nan'"),
    (["inspect", "--alpha", "inf"], "argument --alpha: must be a positive finite number, got 'inf'"),
    (["inspect", "--layers", "0", "-1"], "argument --layers: must be an int >= 0, got '-1'"),
    (["merge", "--adapter", ".", "--out", "missing_dir/m.safetensors"],
     "argument --out: cannot write 'missing_dir/m.safetensors': directory 'missing_dir' does not exist"),
    (["merge", "--adapter", "missing_dir", "--out", "m.safetensors"],
     "argument --adapter: 'missing_dir' does not exist or is not a directory"),
    (["export", "--out", "."], "argument --out: '.' is a directory, not a file"),
])
def test_bad_options_are_one_error_line_naming_the_option(argv, error, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    *usage, last = capsys.readouterr().err.splitlines()
    assert last == f"lora-fx {argv[0]}: error: {error}"
    assert usage[0].startswith(f"usage: lora-fx {argv[0]} ") and all(line.startswith(" ") for line in usage[1:])


@pytest.mark.parametrize("argv, error", [
    (["inspect", "--model", "os.path:nosuch"], "--model 'os.path:nosuch': module 'os.path' has no attribute 'nosuch'"),
    (["inspect", "--model", "os.path:sep"], "--model 'os.path:sep': os.path.sep is not callable"),
    (["inspect", "--model", "os:getcwd"],
     "--model 'os:getcwd': os.getcwd() must return a model or (model, example_args[, kwargs]), got str"),
    (["inspect", "--model", "no_such_module_anywhere:make"],
     "--model 'no_such_module_anywhere:make': no module named 'no_such_module_anywhere' in the working directory or "
     "on sys.path"),
    (["inspect", "--model", "tests.lora_fx.test_cli:failing_factory"], "the factory broke"),
    (["inspect", "--model", "tests.lora_fx.test_cli:mlp_factory", "--targets", "upp", "downn"],
     "cannot apply LoRA: target 'upp' matched no module; nearest: ['up']; target 'downn' matched no module; "
     "nearest: ['down']"),
])
def test_failures_while_running_are_one_line_and_exit_code_2(argv, error, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err == f"lora-fx {argv[0]}: {error}\n"


def test_ctrl_c_exits_130_quietly(capsys):
    assert main(["inspect", "--model", "tests.lora_fx.test_cli:interrupted_factory"]) == 130
    assert capsys.readouterr().err == ""


def test_model_factory_is_imported_from_the_working_directory(tmp_path, capsys, monkeypatch):
    (tmp_path / "cwd_only_factory.py").write_text(
        "import torch\n\n\ndef make():\n    return torch.nn.Sequential(torch.nn.Linear(4, 6)), (torch.randn(2, 4),)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", ".")])
    try:
        assert main(["inspect", "--model", "cwd_only_factory:make", "--targets", "0", "--rank", "2"]) == 0
    finally:
        sys.modules.pop("cwd_only_factory", None)
    assert sys.path[0] == os.getcwd()
    assert "1 sites, 20 LoRA parameters" in capsys.readouterr().out


def test_inspect_shows_each_sites_kind(capsys):
    assert main(["inspect", "--targets", "embed_tokens", "q_proj"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    kinds = {row[0]: row[1] for row in rows if row and row[0].startswith("model.")}
    assert kinds == {"model.embed_tokens": "embedding", "model.layers.0.self_attn.q_proj": "linear",
                     "model.layers.1.self_attn.q_proj": "linear"}
