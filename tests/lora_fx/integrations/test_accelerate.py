"""accelerate: examples/train_accelerate.py launched on 2 processes (`accelerate launch`, gloo on CPU) trains what one
process trains on the same global batches, and only the main process writes the adapter (a PEFT directory)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).parents[3] / "examples" / "train_accelerate.py"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def losses(command: list[str], directory: Path) -> list[float]:
    done = subprocess.run(command, cwd=directory, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [float(loss) for loss in re.findall(r"step \d+: loss (\S+)", done.stdout)]


def test_two_processes_train_what_one_process_trains(tmp_path):
    two = losses([*LAUNCH, str(EXAMPLE), "--batch", "2", "--out", "two"], tmp_path)
    one = losses([sys.executable, str(EXAMPLE), "--batch", "4", "--out", "one"], tmp_path)
    assert len(two) == 3 and two == pytest.approx(one, abs=1e-4)          # printed with 4 decimals
    ours, theirs = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("two", "one"))
    assert ours.keys() == theirs.keys() and all(".lora_" in key for key in ours)
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-4, atol=1e-5, msg=key)
    assert sorted(path.name for path in (tmp_path / "two").iterdir()) == ["adapter_config.json",
                                                                         "adapter_model.safetensors"]
