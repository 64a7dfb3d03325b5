"""The zoo's checks for one architecture: capture, sites, forward, gradients, merge, saved keys and dynamic dims for
"all-linear", then the same with the embedding and convolution modules as targets.

Each check is run and recorded (never raised), so one failing check still lets the others report; a check that
depends on a failed one is recorded as not run. `run(arch)` returns {check: Outcome}; the tests assert on it and
`tests.zoo.report` writes it as a table.

The oracle is HF PEFT on a copy of the same model (`target_modules="all-linear"`, or the embedding/conv modules by
name), with the same non-identity adapter weights copied in by name (`"base_model.model." + name`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from safetensors import safe_open
from torch import nn

import lora_fx
from lora_fx import LoraSpec
from tests.conftest import randomize_lora
from tests.zoo.architectures import Arch

CHECKS = ("capture", "sites", "forward", "gradients", "merge", "keys", "dynamic", "kinds", "kinds_parity")
SPEC = LoraSpec(targets="all-linear", rank=4, alpha=8.0)
SCALE = SPEC.alpha / SPEC.rank
KIND_MODULES = (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)     # what the embedding and conv site kinds adapt
LORA_FX_ERRORS = (lora_fx.TargetError, lora_fx.LoraSpecError, lora_fx.CaptureError)
ATOL = RTOL = 1e-5


@dataclass(frozen=True)
class Outcome:
    status: str   # "pass" | "fail" | "skip" | "refused" (a lora_fx error that names the cause) | "fixed" (dynamic: a
    detail: str = ""  # dim export specialized, reported at capture)


def problems(outcomes: dict[str, Outcome]) -> dict[str, str]:
    """The checks that failed, and a capture lora_fx refused (with a clear error, but the model is not supported):
    {check: detail}. Checks not run after a failure are not listed; the failure is."""
    return {check: outcomes[check].detail for check in CHECKS
            if outcomes[check].status == "fail" or (check == "capture" and outcomes[check].status == "refused")}


def first_line(err: BaseException, naming: str = "") -> str:
    """The error's type and its first line (or its first line that contains `naming`)."""
    lines = [line.strip(" -") for line in str(err).strip().splitlines()]
    line = next((line for line in lines if naming and naming in line), lines[0] if lines else "")
    return f"{type(err).__name__}: {line}"[:300]


def is_direct_read(arch: Arch, fqn: str) -> bool:
    """Whether PEFT cannot serve as the oracle for module `fqn` (see `compare_with_peft`)."""
    return any(fqn == name or fqn.endswith("." + name) for name in arch.eager_oracle)


class Unadapted(nn.Module):
    """The model under PEFT's names, where PEFT has nothing to adapt (every target is a `direct_read`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.base_model = nn.Module()
        self.base_model.model = model

    def forward(self, **inputs):
        return self.base_model.model(**inputs)


def lora_fqns(gm) -> list[str]:
    return sorted({k.split(".lora_")[0] for k in gm.state_dict() if ".lora_A." in k or ".lora_embedding_A." in k})


def peft_fqns(reference) -> list[str]:
    return sorted(name for name, module in reference.base_model.model.named_modules() if hasattr(module, "lora_A")
                  and (len(module.lora_A) or len(module.lora_embedding_A)))


@contextlib.contextmanager
def peft_allowing_mamba_out_proj(allow: bool):
    """PEFT refuses `out_proj` on Mamba-type models (its LoRA there is dead in training, PEFT issue 2274). In eval
    mode transformers calls `out_proj` as a module, so PEFT's LoRA there is live and still a valid oracle."""
    if not allow:
        yield
        return
    check = peft.tuners.tuners_utils.BaseTuner._check_target_module_compatiblity
    peft.tuners.tuners_utils.BaseTuner._check_target_module_compatiblity = lambda *args: None
    try:
        yield
    finally:
        peft.tuners.tuners_utils.BaseTuner._check_target_module_compatiblity = check


def peft_model(model, arch: Arch, targets):
    """PEFT with `targets` on a copy of `model`, in eval mode."""
    config = peft.LoraConfig(target_modules=targets, r=SPEC.rank, lora_alpha=SPEC.alpha,
                             exclude_modules=list(arch.exclude + tuple(arch.eager_oracle)) or None
                             if targets == "all-linear" else None)
    with peft_allowing_mamba_out_proj(arch.peft_mamba_out_proj):
        return peft.get_peft_model(copy.deepcopy(model), config).eval()


def _difference(ours: list[str], theirs: list[str]) -> str:
    """Why the site sets differ, in a table cell."""
    only_ours, only_theirs = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    return f"lora_fx only: {only_ours[:3]}{' ...' if len(only_ours) > 3 else ''}; PEFT only: {only_theirs[:3]}" + (
        " ..." if len(only_theirs) > 3 else "")


def _compare(ours: torch.Tensor, reference: torch.Tensor, what: str) -> float:
    difference = (ours - reference).abs().max().item() if ours.shape == reference.shape else float("inf")
    torch.testing.assert_close(ours, reference, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m.splitlines()[0]}"
                               if m else what)
    return difference


def run(arch: Arch) -> dict[str, Outcome]:
    outcomes: dict[str, Outcome] = {}
    started = time.perf_counter()
    try:
        _run(arch, outcomes)
    finally:
        for check in CHECKS:
            outcomes.setdefault(check, Outcome("skip", "not run: an earlier check failed"))
        outcomes["seconds"] = Outcome("pass", f"{time.perf_counter() - started:.1f}")
    return outcomes


def _run(arch: Arch, outcomes: dict[str, Outcome]) -> None:
    model = arch.model()
    example, other = arch.example_inputs(), arch.other_inputs()
    constants = arch.constants(model)

    # capture
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", lora_fx.CaptureWarning)
            captured = lora_fx.capture(model, example_kwargs={**example, **constants})
        gm = lora_fx.apply(copy.deepcopy(captured), dataclasses.replace(SPEC, exclude=list(arch.exclude) or None))
    except lora_fx.CaptureError as err:
        outcomes["capture"] = Outcome("refused", first_line(err))
        return
    except Exception as err:
        outcomes["capture"] = Outcome("fail", first_line(err))
        return
    fixed = [str(w.message) for w in caught if issubclass(w.category, lora_fx.CaptureWarning)]
    outcomes["capture"] = Outcome("pass", "")
    gm.eval()
    randomize_lora(gm)

    # sites
    try:
        reference = peft_model(model, arch, "all-linear")
        ours = lora_fqns(gm)
        theirs = sorted(set(peft_fqns(reference)) | {fqn for fqn in ours if is_direct_read(arch, fqn)})
        if ours != theirs:
            outcomes["sites"] = Outcome("fail", _difference(ours, theirs))
            return
        excluded = f" ({', '.join(arch.exclude)} excluded on both sides: {arch.exclude_why})" if arch.exclude else ""
        direct = "".join(f" ({name}: {why}; oracle: the eager model with W + ΔW)"
                         for name, why in arch.eager_oracle.items() if any(is_direct_read(arch, f) for f in ours))
        outcomes["sites"] = Outcome("pass", f"{len(ours)}{excluded}{direct}")
    except Exception as err:
        outcomes["sites"] = Outcome("fail", "PEFT: " + first_line(err))
        return

    # dynamic dims: the graph on inputs of another shape (or the example shape, where export fixed a dim)
    inputs = other
    try:
        gm(**other)
        outcomes["dynamic"] = Outcome("fixed", fixed[0]) if fixed else Outcome("pass", arch.other_shape)
    except lora_fx.CallError as err:
        inputs = arch.example_inputs(seed=5)
        outcomes["dynamic"] = Outcome("fixed", fixed[0]) if fixed else Outcome(
            "fail", "no CaptureWarning, but " + first_line(err))
    except Exception as err:
        inputs = arch.example_inputs(seed=5)
        outcomes["dynamic"] = Outcome("fail", first_line(err))

    outcomes.update(compare_with_peft(gm, reference, arch, inputs, constants))
    if outcomes["forward"].status == "pass":
        outcomes["keys"] = compare_saved_keys(gm, reference, arch)
    kinds(captured, model, arch, inputs, constants, outcomes)


def hold_adapter(gm, reference, arch: Arch) -> dict[str, dict[str, torch.Tensor]]:
    """Copy gm's trainable LoRA weights into PEFT's `reference`; a module PEFT cannot serve (`is_direct_read`) gets
    ΔW added to the reference's own weight instead (s·B·A; s·(B·A)ᵀ for an embedding), made trainable. Returns
    those modules' factors, {fqn: {"A": lora_A, "B": lora_B}}."""
    reference_params = dict(reference.named_parameters())
    direct: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if not param.requires_grad:
                continue
            fqn = name.split(".lora_")[0]
            if is_direct_read(arch, fqn):
                direct.setdefault(fqn, {})["A" if "_A." in name else "B"] = param
            else:
                reference_params["base_model.model." + name].copy_(param)
        for fqn, factors in direct.items():
            module = reference.get_submodule("base_model.model." + fqn)
            delta = SCALE * factors["B"] @ factors["A"]
            module.weight.add_(delta.T if isinstance(module, nn.Embedding) else delta)
            module.weight.requires_grad_(True)
    return direct


def compare_with_peft(gm, reference, arch: Arch, inputs: dict, constants: dict) -> dict[str, Outcome]:
    """forward, gradients and merge of `gm` against PEFT's `reference`, after copying gm's adapter weights in.

    For modules in `arch.eager_oracle` PEFT cannot serve (transformers reads `self.dt_proj.weight @ x` directly, so
    PEFT's module LoRA is dead; PEFT's embedding wrapper looks up OPT's attention mask as ids); PEFT leaves them
    alone and the oracle adds ΔW to the reference's own weight (eager, exact): s·B·A for a linear, s·(B·A)ᵀ for an
    embedding. Their LoRA gradients follow from that weight's gradient G by the chain rule: ∂L/∂A = s·Bᵀ·G,
    ∂L/∂B = s·G·Aᵀ (with Gᵀ for an embedding)."""
    outcomes = {}
    direct = hold_adapter(gm, reference, arch)
    reference_params = dict(reference.named_parameters())
    try:
        ours = arch.output(gm(**inputs))
        theirs = arch.output(reference(**inputs, **constants))
        difference = _compare(ours, theirs, "output")
        with lora_fx.disabled(gm):
            base = arch.output(gm(**inputs))
        if torch.allclose(ours, base, atol=1e-3):
            raise AssertionError("the adapters change nothing: the comparison would be vacuous")
        outcomes["forward"] = Outcome("pass", f"{difference:.1e}")
    except Exception as err:
        outcomes["forward"] = Outcome("fail", first_line(err))
        return outcomes

    try:
        (ours.float() ** 2).mean().backward()
        (theirs.float() ** 2).mean().backward()
        worst = 0.0
        for name, param in gm.named_parameters():
            if not param.requires_grad or is_direct_read(arch, name.split(".lora_")[0]):
                continue
            their_grad = reference_params["base_model.model." + name].grad
            if param.grad is None or their_grad is None:
                if (param.grad is None) != (their_grad is None or not their_grad.any()):
                    raise AssertionError(f"{name}: grad is None on one side only")
                continue
            worst = max(worst, _compare(param.grad, their_grad, name))
        for fqn, factors in direct.items():
            module = reference.get_submodule("base_model.model." + fqn)
            weight_grad = module.weight.grad.T if isinstance(module, nn.Embedding) else module.weight.grad  # (out, in)
            worst = max(worst, _compare(factors["A"].grad, SCALE * factors["B"].T @ weight_grad, fqn + " A"),
                        _compare(factors["B"].grad, SCALE * weight_grad @ factors["A"].T, fqn + " B"))
        outcomes["gradients"] = Outcome("pass", f"{worst:.1e}")
    except Exception as err:
        outcomes["gradients"] = Outcome("fail", first_line(err))

    try:
        merged = lora_fx.merge(gm)
        with torch.no_grad():
            difference = _compare(arch.output(merged(**inputs)), arch.output(gm(**inputs)), "merged output")
        outcomes["merge"] = Outcome("pass", f"{difference:.1e}")
    except Exception as err:
        outcomes["merge"] = Outcome("fail", first_line(err))
    return outcomes


def compare_saved_keys(gm, reference, arch: Arch) -> Outcome:
    """`save_adapter` writes exactly the keys PEFT's `save_pretrained` writes, each with PEFT's tensor (but for the
    modules whose LoRA PEFT cannot serve, `arch.direct_reads`)."""
    try:
        with tempfile.TemporaryDirectory() as directory:
            lora_fx.save_adapter(gm, directory)
            with safe_open(str(Path(directory) / "adapter_model.safetensors"), "pt") as file:
                ours = {key: file.get_tensor(key) for key in file.keys()
                        if not is_direct_read(arch, key.split(".lora_")[0])}
        theirs = peft.get_peft_model_state_dict(reference, save_embedding_layers=False) \
            if isinstance(reference, peft.PeftModel) else {}
        if set(ours) != set(theirs):
            only_ours, only_theirs = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
            return Outcome("fail", f"lora_fx only: {only_ours[:2]}; PEFT only: {only_theirs[:2]}")
        for key, tensor in ours.items():
            torch.testing.assert_close(tensor, theirs[key], rtol=0, atol=0, msg=key)
        return Outcome("pass", str(len(ours)))
    except Exception as err:
        return Outcome("fail", first_line(err))


def kinds(captured, model, arch: Arch, inputs: dict, constants: dict, outcomes: dict) -> None:
    """The embedding and conv site kinds: every nn.Embedding/ConvNd module of the model as a target. Those lora_fx
    refuses are tried one at a time and must be refused with a lora_fx error naming the module (a clear error, not
    a wrong answer); the rest are compared with PEFT targeting the same modules."""
    names = [name for name, module in model.named_modules() if isinstance(module, KIND_MODULES)]
    if not names:
        outcomes["kinds"] = Outcome("skip", "no nn.Embedding or nn.ConvNd module")
        outcomes["kinds_parity"] = Outcome("skip", "")
        return
    try:
        gm = lora_fx.apply(copy.deepcopy(captured), LoraSpec(targets=names, rank=SPEC.rank, alpha=SPEC.alpha))
        accepted, refused = names, {}
    except LORA_FX_ERRORS:
        accepted, refused = [], {}
        for name in names:
            try:
                lora_fx.apply(copy.deepcopy(captured), LoraSpec(targets=[name], rank=SPEC.rank, alpha=SPEC.alpha))
                accepted.append(name)
            except LORA_FX_ERRORS as err:
                refused[name] = err
            except Exception as err:
                outcomes["kinds"] = Outcome("fail", f"{name}: {first_line(err)}")
                return
        unnamed = [name for name, err in refused.items() if f"'{name}'" not in str(err)]
        if unnamed:
            outcomes["kinds"] = Outcome("fail", f"the error for {unnamed[0]} does not name it: "
                                                f"{first_line(refused[unnamed[0]])}")
            return
        gm = lora_fx.apply(copy.deepcopy(captured), LoraSpec(targets=accepted, rank=SPEC.rank, alpha=SPEC.alpha)) \
            if accepted else None
    except Exception as err:
        outcomes["kinds"] = Outcome("fail", first_line(err))
        return
    counts = {}
    if gm is not None:
        for site in gm.meta["lora_fx"].site_info.values():
            counts[site.kind] = counts.get(site.kind, 0) + 1
    summary = ", ".join(f"{kind} {count}" for kind, count in sorted(counts.items()))
    if refused:
        name, err = next(iter(refused.items()))
        summary += f"; refused {len(refused)} of {len(names)} ({first_line(err, naming=repr(name))})"
        outcomes["kinds"] = Outcome("refused", summary.lstrip("; "))
    else:
        outcomes["kinds"] = Outcome("pass", summary)
    if gm is None:
        outcomes["kinds_parity"] = Outcome("skip", "nothing adapted")
        return
    gm.eval()
    randomize_lora(gm, seed=1)
    try:
        served = [name for name in accepted if not is_direct_read(arch, name)]
        reference = peft_model(model, arch, served) if served else Unadapted(copy.deepcopy(model)).eval()
        if lora_fqns(gm) != sorted(set(peft_fqns(reference)) | set(accepted) - set(served)):
            raise AssertionError(_difference(lora_fqns(gm), peft_fqns(reference)))
    except Exception as err:
        outcomes["kinds_parity"] = Outcome("fail", "sites: " + first_line(err))
        return
    compared = compare_with_peft(gm, reference, arch, inputs, constants)
    if compared["forward"].status == "pass":
        compared["keys"] = compare_saved_keys(gm, reference, arch)
    failed = {check: outcome.detail for check, outcome in compared.items() if outcome.status != "pass"}
    if failed:
        check, detail = next(iter(failed.items()))
        outcomes["kinds_parity"] = Outcome("fail", f"{check}: {detail}")
    else:
        outcomes["kinds_parity"] = Outcome("pass", " / ".join(compared[c].detail for c in
                                                               ("forward", "gradients", "merge", "keys")))
