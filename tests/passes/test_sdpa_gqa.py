"""sdpa_gqa: in training and eval graphs (decoding included), SDPA over repeat_kv'd keys and values reads the grouped
heads (`enable_gqa`)."""

import torch

import lora_fx
from lora_fx import LoraSpec
from passes.sdpa_gqa import SDPA
from tests.conftest import all_nodes, ids, randomize_lora, tiny_llama


class GroupedAttention(torch.nn.Module):
    """Four query heads over two key/value heads, repeated as transformers' repeat_kv does; or, with
    `interleave`, by repeat_interleave on the head dim (the same values: left alone by the pass)."""

    def __init__(self, interleave: bool = False):
        super().__init__()
        self.q, self.kv = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
        self.interleave = interleave

    def forward(self, x):                                            # x: (b, s, 16)
        b, s, _ = x.shape
        q = self.q(x).view(b, s, 4, 4).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, 2, 4).permute(3, 0, 2, 1, 4)   # each (b, 2, s, 4)
        if self.interleave:
            k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        else:
            k, v = (t[:, :, None].expand(b, 2, 2, s, 4).reshape(b, 4, s, 4) for t in (k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_nodes(gm) -> list:
    return [node for node in all_nodes(gm) if node.target is SDPA]


def saved_bytes(run) -> int:
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(saved.values())


def outputs_and_gradients(gm, x):
    x = x.clone().requires_grad_()
    out = gm(x)
    lora = [param for name, param in gm.named_parameters() if param.requires_grad]
    return out, torch.autograd.grad(out.square().sum(), [x, *lora])


def test_training_graph_groups_heads_exactly_and_saves_less(monkeypatch):
    """The eval graph built without the pass (no dropout: the same function) is the oracle."""
    torch.manual_seed(0)
    gm = lora_fx.apply(GroupedAttention(), LoraSpec(rank=2), example_args=(torch.randn(2, 6, 16),)).train()
    randomize_lora(gm)
    (node,) = sdpa_nodes(gm)
    assert node.kwargs["enable_gqa"] and node.args[1].meta["val"].shape[1] == 2                 # the grouped heads
    assert not any(n.target is torch.ops.aten.expand.default for n in all_nodes(gm))
    x = torch.randn(3, 9, 16)
    out, grads = outputs_and_gradients(gm, x)
    trained_bytes = saved_bytes(lambda: gm(x.requires_grad_()))
    monkeypatch.setattr(lora_fx.build, "PIPELINE", [p for p in lora_fx.build.PIPELINE if p.name != "sdpa_gqa"])
    gm.eval()
    assert not sdpa_nodes(gm)[0].kwargs.get("enable_gqa", False)
    expected, expected_grads = outputs_and_gradients(gm, x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert trained_bytes < saved_bytes(lambda: gm(x.requires_grad_()))          # no repeated key/value copies


def test_other_repeats_are_left_alone():
    gm = lora_fx.apply(GroupedAttention(interleave=True), LoraSpec(rank=2),
                       example_args=(torch.randn(2, 6, 16),)).train()
    assert [node.kwargs.get("enable_gqa", False) for node in sdpa_nodes(gm)] == [False]


def test_llama_training_graph_groups_heads():
    gm = lora_fx.apply(tiny_llama(), LoraSpec(rank=2), example_args=(ids(),), example_kwargs={"use_cache": False})
    assert [node.kwargs.get("enable_gqa") for node in sdpa_nodes(gm.train())] == [True, True]


def test_eval_and_decoding_graphs_group_heads_too():
    from lora_fx.generation.programs import DECODE
    from lora_fx.graph_module import GraphKey

    gm = lora_fx.apply(tiny_llama(), LoraSpec(rank=2), example_args=(ids(),), example_kwargs={"use_cache": False})
    decode = gm.graph_view(GraphKey(False, DECODE))
    assert [node.kwargs.get("enable_gqa") for node in sdpa_nodes(gm.eval())] == [True, True]
    assert [n.kwargs.get("enable_gqa") for n in decode.graph.nodes if n.target is SDPA] == [True, True]
