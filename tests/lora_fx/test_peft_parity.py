"""The end-to-end oracle: HF PEFT on the same transformers model, with the same non-identity adapter weights."""

import copy

import peft
import pytest
import torch

import lora_fx
from lora_fx import LoraSpec
from tests.conftest import ids, randomize_lora, tiny_gpt2, tiny_llama

CASES = [
    ("llama", dict(targets="all-linear")),
    ("llama", dict(targets=["q_proj", "v_proj"])),
    ("llama", dict(targets=r".*\.mlp\..*_proj")),
    ("llama", dict(targets="all-linear", exclude=["o_proj"], layers=[1], rank_pattern={"up_proj": 2},
                   alpha_pattern={"down_proj": 3.0}, use_rslora=True)),
    ("gpt2", dict(targets="all-linear")),
    ("gpt2", dict(targets=["c_attn"])),
    ("gpt2", dict(targets=r".*\.h\.1\..*c_proj")),
]
BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def peft_config(spec: LoraSpec) -> peft.LoraConfig:
    targets = spec.targets if isinstance(spec.targets, str) else list(spec.targets)
    return peft.LoraConfig(target_modules=targets, r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                           exclude_modules=spec.exclude and list(spec.exclude), layers_to_transform=spec.layers and
                           list(spec.layers), rank_pattern=spec.rank_pattern or {},
                           alpha_pattern=spec.alpha_pattern or {}, use_rslora=spec.use_rslora)


def peft_lora_fqns(peft_model) -> list[str]:
    return sorted(name for name, module in peft_model.base_model.model.named_modules() if hasattr(module, "lora_A"))


def copied_into(reference, gm) -> dict:
    """`reference`'s parameters by name, its LoRA weights set to `gm`'s."""
    reference_params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if param.requires_grad:
                reference_params["base_model.model." + name].copy_(param)
    return reference_params


def assert_same_lora_gradients(gm, reference_params: dict) -> None:
    for name, param in gm.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, reference_params["base_model.model." + name].grad, rtol=0,
                                       atol=1e-5, msg=name)


@pytest.mark.parametrize("arch, fields", CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)])
def test_same_sites_outputs_and_gradients_as_peft(arch, fields):
    torch.manual_seed(0)
    model = BUILD[arch]().eval()
    spec = LoraSpec(rank=4, alpha=8.0, **fields)
    if spec.layers is not None and not isinstance(spec.targets, tuple):
        # PEFT applies layers_to_transform to list targets only: resolve all-linear to names for it
        ours = lora_fx.apply(copy.deepcopy(model), LoraSpec(rank=4, alpha=8.0), example_args=(ids(),),
                             example_kwargs={"use_cache": False})
        names = sorted({k.split(".lora_A.")[0].rsplit(".", 1)[-1] for k in ours.state_dict() if ".lora_A." in k})
        reference = peft.get_peft_model(copy.deepcopy(model), peft_config(LoraSpec(**{**fields, "targets": names},
                                                                                   rank=4, alpha=8.0)))
    else:
        reference = peft.get_peft_model(copy.deepcopy(model), peft_config(spec))
    gm = lora_fx.apply(model, spec, example_args=(ids(),), example_kwargs={"use_cache": False})
    randomize_lora(gm)

    ours = sorted(k.split(".lora_A.")[0] for k in gm.state_dict() if ".lora_A." in k)
    assert ours == peft_lora_fqns(reference)
    reference_params = copied_into(reference, gm)
    assert sum(p.requires_grad for p in gm.parameters()) == sum(p.requires_grad for p in reference.parameters())

    x = ids(3, 6, seed=5)     # a shape not seen at capture
    ours_logits, reference_logits = gm(x).logits, reference(input_ids=x, use_cache=False).logits
    torch.testing.assert_close(ours_logits, reference_logits, rtol=0, atol=1e-5)
    assert not torch.allclose(ours_logits, model(x, use_cache=False).logits, atol=1e-3)   # adapters are live
    (ours_logits ** 2).mean().backward()
    (reference_logits ** 2).mean().backward()
    assert_same_lora_gradients(gm, reference_params)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_with_dropout_draws_peft_s_masks(arch):
    """With PEFT's draws (`lora_fx.dropout_masks(gm, "peft")`, the opt-in), each site's dropout and shrink run as one
    `lora_fx::dropout_linear` (passes/lean_dropout.py), which draws exactly what `nn.Dropout` draws: from the same
    seed, outputs and gradients equal PEFT's."""
    torch.manual_seed(0)
    model = BUILD[arch]().train()
    for module in model.modules():                # the model's own dropouts off: only LoRA's draw
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    spec = LoraSpec(targets="all-linear", rank=4, alpha=8.0, dropout=0.3)
    reference = peft.get_peft_model(copy.deepcopy(model), peft_config(spec)).train()
    gm = lora_fx.dropout_masks(lora_fx.apply(model, spec, example_args=(ids(),), example_kwargs={"use_cache": False}),
                               "peft")
    randomize_lora(gm)
    roles = block_roles(gm)
    assert "dropout" not in roles and roles.count("dropout_down") == roles.count("up")
    x = ids(3, 6, seed=5)
    ours_logits = assert_same_draws_as_peft(gm, reference, x)
    torch.manual_seed(2)
    assert not torch.allclose(ours_logits, gm(x).logits, atol=1e-3)                  # dropout is live


def block_roles(gm) -> list[str]:
    return [node.meta["lora_fx"]["role"] for block in lora_fx.blocks(gm) for node in block.graph.nodes
            if "lora_fx" in node.meta]


def assert_same_draws_as_peft(gm, reference, x) -> torch.Tensor:
    """From one seed, `gm` and the PEFT `reference` (given `gm`'s LoRA weights) give the same logits and LoRA
    gradients; returns `gm`'s logits."""
    reference_params = copied_into(reference, gm)
    torch.manual_seed(1)
    ours_logits = gm(x).logits
    torch.manual_seed(1)
    reference_logits = reference(input_ids=x, use_cache=False).logits
    torch.testing.assert_close(ours_logits, reference_logits, rtol=0, atol=1e-5)
    (ours_logits ** 2).mean().backward()
    (reference_logits ** 2).mean().backward()
    assert_same_lora_gradients(gm, reference_params)
    return ours_logits.detach()


class OneMaskPerInput(torch.nn.Module):
    """PEFT's LoRA dropout made to give every sibling that reads the same input the same dropped copy."""

    def __init__(self, p: float):
        super().__init__()
        self.p, self.last = p, None

    def forward(self, x):
        if self.last is None or self.last[0] is not x:
            self.last = (x, torch.nn.functional.dropout(x, self.p, self.training))
        return self.last[1]


def test_shared_dropout_draws_one_mask_per_input_as_peft_with_shared_dropouts():
    """`fuse_siblings(gm, share_dropout=True)`: q/k/v (and gate/up) see one dropout mask of their common input. The
    oracle is PEFT whose sibling sites share one dropout draw per input: from the same seed, the same outputs and
    gradients (PEFT's draws, the opt-in). Off again, each site draws its own mask, as PEFT does."""
    torch.manual_seed(0)
    model = tiny_llama().train()
    spec = LoraSpec(targets="all-linear", rank=4, alpha=8.0, dropout=0.3)
    reference = peft.get_peft_model(copy.deepcopy(model), peft_config(spec)).train()
    shared = {}
    for name, module in reference.named_modules():
        if hasattr(module, "lora_dropout"):
            module.lora_dropout["default"] = shared.setdefault(name.rsplit(".", 1)[0], OneMaskPerInput(0.3))
    gm = lora_fx.dropout_masks(lora_fx.apply(model, spec, example_args=(ids(),), example_kwargs={"use_cache": False}),
                               "peft")
    randomize_lora(gm)
    assert lora_fx.fuse_siblings(gm, share_dropout=True).modified
    layers = len(lora_fx.blocks(gm))
    roles = block_roles(gm)
    assert roles.count("dropout_down") == 4 * layers and roles.count("up") == 7 * layers     # qkv, o, gate/up, down
    assert_same_draws_as_peft(gm, reference, ids(3, 6, seed=5))

    assert lora_fx.fuse_siblings(gm).modified                                         # independent masks again
    roles = block_roles(gm)
    assert roles.count("dropout_down") == roles.count("up") == 7 * layers
