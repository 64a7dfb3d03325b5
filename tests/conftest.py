"""Small models built from configs (no downloads) and helpers shared by the tests."""

import copy
import importlib
import os

import pytest
import torch
import transformers

import lora_fx
from lora_fx.quantize import dense

VOCAB = 97


def _decorate_triton_kernels_for_the_interpreter() -> None:
    """`@triton.jit` reads TRITON_INTERPRET when it decorates: import lora_fx's Triton kernels with it set, before
    any test can import them, so tests run them on CPU tensors (the ops pick them only while TRITON_INTERPRET=1 is
    set, as the `triton_kernels` fixture of tests/lora_fx/test_mixed_lora.py does). Without triton those tests skip."""
    if torch.cuda.is_available():
        return                                  # a GPU machine tests the compiled kernels
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        importlib.import_module("lora_fx.ops.mixed_lora_triton")
    except ImportError:
        pass
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


_decorate_triton_kernels_for_the_interpreter()


def tiny_llama(layers: int = 2) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2(layers: int = 2) -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


class MLP(torch.nn.Module):
    def __init__(self, width: int = 8, hidden: int = 12):
        super().__init__()
        self.up = torch.nn.Linear(width, hidden)
        self.down = torch.nn.Linear(hidden, width, bias=False)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.down(self.drop(torch.relu(self.up(x))))


class ReferenceLora(torch.nn.Module):
    """Eager LoRA around a linear module: y = base(x) + sum over branches of s * x A^T B^T."""

    def __init__(self, base, branches):
        super().__init__()
        self.base, self.branches = base, branches

    @property
    def weight(self):          # as PEFT's layers do: code that reads `.weight` sees the base weight
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x):
        return self.base(x) + sum(s * (x @ A.T @ B.T) for A, B, s in self.branches)


def ids(batch: int = 2, seq: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def randomize_lora(gm: torch.nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Make every adapter non-identity (B != 0), so equality checks are never vacuous."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def snapshot(model: torch.nn.Module) -> dict:
    """Everything about a module's parameters and buffers that lora_fx must not change."""
    return {name: (t.detach().clone(), t.requires_grad, t) for name, t in
            [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]}


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, (value, requires_grad, obj) in before.items():
        assert after[name][2] is obj, f"{name} was replaced"
        assert after[name][1] == requires_grad, f"{name}.requires_grad changed"
        assert torch.equal(dense(after[name][0]), dense(value)), f"{name} was written"   # quantized: its values


_CAPTURES: dict = {}
def captured(arch: str, training: bool = False):
    """A deep copy of a once-per-session capture of the tiny `arch` model built with seed 0 (the same weights as
    the `llama`/`gpt2` fixtures), in `training` mode. Captures take seconds; copies take milliseconds."""
    key = (arch, training)
    if key not in _CAPTURES:
        torch.manual_seed(0)
        model = {"llama": tiny_llama, "gpt2": tiny_gpt2}[arch]().train(training)
        _CAPTURES[key] = lora_fx.capture(model, (ids(),), {"use_cache": False})
    return copy.deepcopy(_CAPTURES[key])


def all_nodes(gm) -> list:
    """Every node of a graph module: the root graph's and its blocks' (see lora_fx.blocks)."""
    graphs = gm.graphs().values() if hasattr(gm, "graphs") else [gm.graph]
    return [node for graph in graphs for node in graph.nodes]


def all_code(gm) -> str:
    """The generated code of the root graph and of every block."""
    return gm.code + "".join(block.code for block in getattr(gm, "blocks", list)())


def graph_snapshot(gm) -> dict:
    """Everything a failed call must leave exactly as it was."""
    return {"code": all_code(gm), "state": gm.meta["lora_fx"], "training": gm.training,
            "nodes": [(n.name, n.op, str(n.target), repr(n.args), dict(n.meta.get("lora_fx", {})))
                      for n in all_nodes(gm)],
            "modules": [name for name, _ in gm.named_modules()],
            "tensors": snapshot(gm), "state_dict": list(gm.state_dict())}


def assert_graph_unchanged(gm, before: dict) -> None:
    after = graph_snapshot(gm)
    for key in ("code", "training", "nodes", "modules", "state_dict"):
        assert after[key] == before[key], f"{key} changed"
    assert after["state"] is before["state"], "the graph state was replaced"
    assert_unchanged(gm, before["tensors"])


@pytest.fixture
def llama():
    torch.manual_seed(0)
    return tiny_llama()


@pytest.fixture
def gpt2():
    torch.manual_seed(0)
    return tiny_gpt2()


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP()


@pytest.fixture
def copy_of():
    return copy.deepcopy
