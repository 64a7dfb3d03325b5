"""The zoo: per architecture, lora_fx's "all-linear" adapts the modules PEFT's does, and with the same non-identity
adapter weights the outputs, LoRA gradients and saved keys equal PEFT's; merging changes nothing; dynamic dims stay
dynamic (or the dim export fixed is reported at capture); the embedding and conv modules are adapted as PEFT adapts
them, or refused by a lora_fx error naming the module.

The default run takes a representative subset (`Arch.ci`); `python3 -m pytest -q -m zoo tests/zoo` runs the other
architectures, and `python -m tests.zoo.report` writes the table to benchmarks/results/zoo.md.
"""

import pytest

from tests.zoo.architectures import ARCHITECTURES
from tests.zoo.checks import problems, run


def check(arch) -> None:
    found = problems(run(arch))
    unexpected = {name: detail for name, detail in found.items() if name not in arch.known}
    assert not unexpected, f"{arch.name}: {unexpected}"
    fixed = sorted(set(arch.known) - set(found))
    assert not fixed, f"{arch.name}: {fixed} pass now: remove them from `known`"


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a.ci], ids=lambda a: a.name)
def test_representative_architecture(arch):
    check(arch)


@pytest.mark.zoo
@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if not a.ci], ids=lambda a: a.name)
def test_architecture(arch):
    check(arch)
