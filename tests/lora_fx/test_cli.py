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
