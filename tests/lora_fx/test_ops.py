"""The opaque Mamba2 fused op against transformers' own Mamba2 (torch path) and the paper's chunked SSD."""

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.models.mamba2 import modeling_mamba2

from lora_fx.ops import FUSED_OP, mamba2, mamba2_reference, mamba_split_conv1d_scan_combined, opaque_fused_calls, \
    reference


def tiny_mamba2(chunk_size: int = 8) -> transformers.Mamba2ForCausalLM:
    torch.manual_seed(0)
    config = transformers.Mamba2Config(hidden_size=32, num_heads=4, head_dim=16, expand=2, state_size=8, n_groups=2,
                                       conv_kernel=4, chunk_size=chunk_size, num_hidden_layers=2, vocab_size=50,
                                       pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return transformers.Mamba2ForCausalLM(config).train()


@pytest.mark.parametrize("length", [16, 21])    # a multiple of chunk_size, and not
def test_equals_transformers_mamba2_forward_and_gradients(length):
    model = tiny_mamba2()
    ids = torch.randint(0, 50, (2, length), generator=torch.Generator().manual_seed(length))
    reference = copy.deepcopy(model)
    entry_point = modeling_mamba2.mamba2_split_conv1d_scan_combined     # a function, or a hub-kernel module
    with opaque_fused_calls():                   # the mixer's fused call now runs our op
        assert modeling_mamba2.mamba2_split_conv1d_scan_combined is not entry_point
        ours = model(ids, use_cache=False).logits
    expected = reference(ids, use_cache=False).logits     # transformers' torch path (no mamba_ssm here)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    ours.pow(2).mean().backward()
    expected.pow(2).mean().backward()
    grads = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    assert modeling_mamba2.mamba2_split_conv1d_scan_combined is entry_point      # restored on exit


def segsum(x):
    """exp(segsum) is the 1-semiseparable mask of the SSD paper's minimal listing."""
    length = x.size(-1)
    x = x[..., None].expand(*x.shape, length)
    x = x.masked_fill(~torch.tril(torch.ones(length, length, dtype=torch.bool), -1), 0)
    return torch.cumsum(x, dim=-2).masked_fill(~torch.tril(torch.ones(length, length, dtype=torch.bool)), -torch.inf)


def ssd_minimal(X, A, B, C, block, initial_states):
    """Mamba2 paper, Listing 1 (mamba_ssm/modules/ssd_minimal.py), without einops.
    X (b, L, h, p), A (b, L, h), B/C (b, L, h, n)."""
    b, length, h, p = X.shape
    chunks = length // block
    X, B, C = (t.reshape(b, chunks, block, h, -1) for t in (X, B, C))
    A = A.reshape(b, chunks, block, h).permute(0, 3, 1, 2)                 # (b, h, c, l)
    A_cumsum = torch.cumsum(A, dim=-1)
    L = torch.exp(segsum(A))
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, L, X)
    decay_states = torch.exp(A_cumsum[..., -1:] - A_cumsum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)
    states = torch.cat([initial_states[:, None], states], dim=1)
    decay_chunk = torch.exp(segsum(F.pad(A_cumsum[..., -1], (1, 0))))
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final = new_states[:, :-1], new_states[:, -1]
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(A_cumsum))
    return (Y_diag + Y_off).reshape(b, length, h, p), final


def raw_inputs(length=16, heads=4, headdim=8, groups=2, dstate=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    dim = heads * headdim
    rand = lambda *shape: torch.randn(*shape, generator=generator)
    return dict(zxbcdt=rand(2, length, 2 * dim + 2 * groups * dstate + heads),
                conv1d_weight=rand(dim + 2 * groups * dstate, 4) * 0.5, conv1d_bias=rand(dim + 2 * groups * dstate),
                dt_bias=rand(heads), A=-torch.rand(heads, generator=generator) - 0.5, D=rand(heads), chunk_size=8,
                headdim=headdim, ngroups=groups)


def test_scan_equals_the_chunked_ssd_reference_with_initial_and_final_states():
    inputs = raw_inputs()
    heads, headdim, groups, dstate, dim = 4, 8, 2, 4, 32
    identity = torch.zeros_like(inputs["conv1d_weight"])
    identity[:, -1] = 1.0                                        # the conv passes xBC through unchanged
    inputs.update(conv1d_weight=identity, conv1d_bias=None, activation=None)
    z = torch.full((2, 16, dim), 3.0)                            # gate silu(3) is a known constant
    zxbcdt = inputs["zxbcdt"].clone()
    zxbcdt[..., :dim] = z
    initial = torch.randn(2, heads, headdim, dstate, generator=torch.Generator().manual_seed(5))
    out, final = mamba_split_conv1d_scan_combined(**{**inputs, "zxbcdt": zxbcdt}, initial_states=initial,
                                                  return_final_states=True)
    x, B, C = zxbcdt[..., dim:2 * dim + 2 * groups * dstate].split([dim, groups * dstate, groups * dstate], dim=-1)
    x = x.unflatten(-1, (heads, headdim))
    B, C = (t.unflatten(-1, (groups, dstate)).repeat_interleave(heads // groups, dim=2) for t in (B, C))
    dt = F.softplus(zxbcdt[..., -heads:] + inputs["dt_bias"])
    Y, expected_final = ssd_minimal(x * dt[..., None], inputs["A"] * dt, B, C, 8, initial)
    expected = (Y + x * inputs["D"][:, None]).flatten(-2) * F.silu(torch.tensor(3.0))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, expected_final, rtol=1e-5, atol=1e-5)


def test_nonssm_part_is_a_gated_mlp_in_front():
    plain = raw_inputs(seed=1)
    zx0 = torch.randn(2, 16, 12)
    with_mlp = {**plain, "zxbcdt": torch.cat([zx0, plain["zxbcdt"]], dim=-1)}      # d_nonssm = 6
    out = mamba_split_conv1d_scan_combined(**with_mlp)
    z0, x0 = zx0.chunk(2, dim=-1)
    torch.testing.assert_close(out[..., :6], F.silu(z0) * x0)
    torch.testing.assert_close(out[..., 6:], mamba_split_conv1d_scan_combined(**plain))


def test_output_projection_and_rmsnorm_match_their_definitions():
    inputs = raw_inputs(seed=2)
    weight, bias, norm = torch.randn(10, 32), torch.randn(10), torch.rand(32) + 0.5
    base = mamba_split_conv1d_scan_combined(**inputs, rmsnorm_weight=norm, norm_before_gate=False)
    projected = mamba_split_conv1d_scan_combined(**inputs, rmsnorm_weight=norm, norm_before_gate=False,
                                                 outproj_weight=weight, outproj_bias=bias)
    torch.testing.assert_close(projected, F.linear(base, weight, bias))
    with pytest.raises(ValueError, match="outproj_bias must be None"):
        mamba_split_conv1d_scan_combined(**inputs, outproj_bias=bias)


@pytest.mark.parametrize("length", [13, 16])
def test_chunked_and_sequential_scans_agree(length):
    inputs = raw_inputs(length=length, seed=7)
    initial = torch.randn(2, 4, 8, 4, generator=torch.Generator().manual_seed(8))
    chunked = mamba_split_conv1d_scan_combined(**inputs, initial_states=initial, return_final_states=True)
    one_sequence = torch.zeros(2, length, dtype=torch.int32)        # seq_idx selects the sequential scan
    sequential = mamba_split_conv1d_scan_combined(**inputs, initial_states=initial, return_final_states=True,
                                                  seq_idx=one_sequence)
    for got, want in zip(chunked, sequential):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_seq_idx", [False, True])
def test_gradients_are_exact_in_float64_and_seq_idx_resets(with_seq_idx):
    inputs = {k: v.double() if torch.is_tensor(v) else v for k, v in raw_inputs(length=5, heads=2, headdim=2,
                                                                               dstate=2, seed=3).items()}
    names = ["zxbcdt", "conv1d_weight", "conv1d_bias", "dt_bias", "A", "D"]
    for name in names:
        inputs[name] = inputs[name].detach().requires_grad_()
    inputs["chunk_size"] = 2       # length 5: two full chunks and a padded one
    rms = torch.rand(4, dtype=torch.float64, requires_grad=True)
    out_w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    seq_idx = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.int32) if with_seq_idx else None

    def run(*tensors):
        given = dict(zip(names, tensors[:6]))
        return mamba_split_conv1d_scan_combined(**{**inputs, **given}, rmsnorm_weight=tensors[6],
                                                outproj_weight=tensors[7], seq_idx=seq_idx, rmsnorm_eps=1e-5)

    assert torch.autograd.gradcheck(run, [inputs[n] for n in names] + [rms, out_w])
    split = raw_inputs(length=6, seed=4)
    joined = mamba_split_conv1d_scan_combined(**split, seq_idx=torch.tensor([[0, 0, 0, 1, 1, 1]] * 2,
                                                                          dtype=torch.int32))
    second = mamba_split_conv1d_scan_combined(**{**split, "zxbcdt": split["zxbcdt"][:, 3:]})
    torch.testing.assert_close(joined[:, 3:], second)        # nothing crosses the boundary


def test_opcheck():
    inputs = raw_inputs(length=5, seed=6)
    args = (inputs["zxbcdt"].requires_grad_(), inputs["conv1d_weight"], inputs["conv1d_bias"], inputs["dt_bias"],
            inputs["A"], inputs["D"], 8, None, None, [0.0, float("inf")], "silu", None, 1e-6, None, None, 8, 2, True)
    torch.library.opcheck(FUSED_OP, args)


VARIANTS = {      # each path of the hand-written backward; a shape stands for a random tensor of that shape
    "plain": {},
    "no conv bias, no activation": dict(conv1d_bias=None, activation=None),
    "rmsnorm after the gate": dict(rmsnorm_weight=(32,), norm_before_gate=False),
    "rmsnorm before the gate, 2-D D": dict(rmsnorm_weight=(32,), norm_before_gate=True, D=(4, 8)),
    "initial state, dt clamped": dict(initial_states=(2, 4, 8, 4), dt_limit=[0.6, 1.2]),
    "gated MLP in front, out_proj with bias": dict(d_nonssm=6, outproj_weight=(5, 38), outproj_bias=(5,)),
    "one group": dict(groups=1, rmsnorm_weight=(32,)),
}


DEFAULTS = dict(conv1d_bias=None, initial_states=None, seq_idx=None, dt_limit=[0.0, float("inf")], activation="silu",
                rmsnorm_weight=None, outproj_weight=None, outproj_bias=None, norm_before_gate=True)


def op_args(inputs: dict) -> list:
    """The op's arguments in schema order (the reference's parameters), defaults filled in as the wrapper does."""
    return [inputs[name] if name in inputs else DEFAULTS[name] for name in inspect.signature(reference).parameters]


def variant_inputs(variant: str) -> dict:
    """Float64 inputs for one VARIANTS entry, tensors as leaves requiring grad: length 13 in chunks of 4, so the
    last chunk is padded."""
    options = dict(VARIANTS[variant])
    groups, d_nonssm = options.pop("groups", 2), options.pop("d_nonssm", 0)
    generator = torch.Generator().manual_seed(len(variant))
    inputs = raw_inputs(length=13, groups=groups, seed=len(variant))
    inputs["zxbcdt"] = torch.cat([torch.randn(2, 13, 2 * d_nonssm, generator=generator), inputs["zxbcdt"]], dim=-1)
    inputs.update({k: torch.randn(*v, generator=generator) if isinstance(v, tuple) else v for k, v in options.items()})
    inputs.update(chunk_size=4, rmsnorm_eps=1e-5)
    return {k: v.double().requires_grad_() if torch.is_tensor(v) else v for k, v in inputs.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hand_written_backward_equals_autograd_through_the_reference(variant):
    inputs = variant_inputs(variant)
    leaves = {k: v for k, v in inputs.items() if torch.is_tensor(v)}
    ours = mamba_split_conv1d_scan_combined(**inputs, return_final_states=True)      # the op: residuals, by hand
    expected = reference(*op_args(inputs))                                           # plain torch, autograd
    generator = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in expected]
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    got = torch.autograd.grad(ours, list(leaves.values()), cotangents)
    want = torch.autograd.grad(expected, list(leaves.values()), cotangents)
    for name, g, w in zip(leaves, got, want):
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("with_seq_idx", [False, True])
def test_frozen_inputs_get_no_gradient_and_the_others_theirs(with_seq_idx):
    inputs = variant_inputs("gated MLP in front, out_proj with bias")
    inputs.update({name: inputs[name].detach() for name in ("conv1d_weight", "dt_bias", "A", "D", "outproj_weight")})
    inputs["seq_idx"] = torch.tensor([[0] * 6 + [1] * 7] * 2, dtype=torch.int32) if with_seq_idx else None
    trained = [inputs[name] for name in ("zxbcdt", "conv1d_bias", "outproj_bias")]
    ours = mamba_split_conv1d_scan_combined(**inputs)
    cotangent = torch.randn(ours.shape, generator=torch.Generator().manual_seed(2), dtype=ours.dtype)
    for got, want in zip(torch.autograd.grad(ours, trained, cotangent),
                         torch.autograd.grad(reference(*op_args(inputs))[0], trained, cotangent)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("with_seq_idx", [False, True])
def test_the_backward_reruns_the_forward_only_with_seq_idx(monkeypatch, with_seq_idx):
    calls, forward = [], mamba2_reference.forward
    monkeypatch.setattr(mamba2_reference, "forward", lambda *args, **kw: calls.append(1) or forward(*args, **kw))
    inputs = variant_inputs("rmsnorm after the gate")
    seq_idx = torch.tensor([[0] * 6 + [1] * 7] * 2, dtype=torch.int32) if with_seq_idx else None
    out = mamba_split_conv1d_scan_combined(**inputs, seq_idx=seq_idx)
    assert len(calls) == 1
    out.pow(2).sum().backward()
    assert len(calls) == (2 if with_seq_idx else 1)      # seq_idx: the sequential scan keeps no residuals
    assert inputs["zxbcdt"].grad.abs().sum() > 0


@pytest.mark.parametrize("variant", ["plain", "rmsnorm before the gate, 2-D D",
                                     "gated MLP in front, out_proj with bias"])
def test_opcheck_of_the_forward_op_with_its_residuals(variant):
    """The forward op's fake kernel (residual shapes included) against its CPU kernel, and its schema."""
    inputs = {k: v.detach().float() if torch.is_tensor(v) else v for k, v in variant_inputs(variant).items()}
    args = op_args(inputs)
    _, _, residuals = mamba2.FORWARD_OP(*args)
    assert [tuple(r.shape) for r in residuals] == [shape for shape, _ in mamba2_reference.residual_shapes(
        inputs["zxbcdt"], inputs["conv1d_weight"], inputs["D"], 4, inputs["headdim"], inputs["ngroups"],
        "rmsnorm_weight" in inputs, "outproj_weight" in inputs)]
    torch.library.opcheck(mamba2.FORWARD_OP, args)


def test_compiled_training_keeps_forward_and_backward_opaque():
    """torch.compile's joint graph: the forward op and the backward op, never the scan inside them."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, _):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    inputs = variant_inputs("rmsnorm after the gate")
    run = torch.compile(lambda: mamba_split_conv1d_scan_combined(**inputs), fullgraph=True,
                        backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
    run().sum().backward()
    assert len(graphs) == 2
    forward_graph, backward_graph = ({n.target for n in gm.graph.nodes} for gm in graphs)
    assert mamba2.FORWARD_OP in forward_graph and mamba2.BACKWARD_OP in backward_graph
    assert not {torch.ops.aten.bmm.default, torch.ops.aten.cumsum.default} & (forward_graph | backward_graph)
