"""README.md's Python blocks run as written, in order, in one namespace (the first defines the model the others use)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_the_readme_has_the_blocks_this_test_runs():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 6 and "transformers.LlamaConfig" in blocks[0]


@pytest.mark.slow
def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                        # the blocks write out/...
    (tmp_path / "out").mkdir()
    namespace: dict = {"__name__": "readme"}
    for index, block in enumerate(python_blocks(README.read_text())):
        try:
            exec(compile(block, f"README.md block {index}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"README.md python block {index} failed: {type(err).__name__}: {err}\n{block}")
