"""DoRA for the linear kind: LoRA with a learned magnitude per output feature, as PEFT computes it.

DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353) splits the adapted weight into magnitude and direction,

    W' = diag(g)·(W + s·B·A),      g = m / ‖W + s·B·A‖      (one norm per output feature, i.e. per row of the
                                                             (out, in) weight; per column of HF Conv1D's (in, out))

with the magnitude vector m (out,) trained and initialised to ‖W + s·B·A‖ (= ‖W‖ for a new adapter, B = 0). As the
paper (section 4.3) and PEFT do, the norm is a constant for autograd: no gradient flows through it. At a read
y = x·Wᵀ + b the adapter adds (PEFT's `DoraLinearLayer.forward`, peft/tuners/lora/dora.py)

    (g − 1)⊙(y − b) + g⊙(s·x·Aᵀ·Bᵀ)

and with dropout in training PEFT applies (g − 1) to the base read of dropout(x) instead of y − b; so does this.
Names are PEFT's: the parameter `<fqn>.lora_magnitude_vector.<adapter>.weight`, saved as
`base_model.model.<fqn>.lora_magnitude_vector`.

The norm is computed from the factors, never materialising W + s·B·A (PEFT builds B·A through an identity matrix
and adds it to W on every forward):

    ‖W_i + s·(B·A)_i‖² = ‖W_i‖² + 2s·Σ_k B_ik (W·Aᵀ)_ik + s²·Σ_kl B_ik (A·Aᵀ)_kl B_il

in fp32, costing one (out, in)·(in, r) product. An inactive adapter (s = 0) has g = 1, so it adds exactly nothing.
Each adapter's term is taken against the base read, so several DoRA adapters active at once sum their deltas
(PEFT chains them, each scaling the previous ones' output too); `merge` computes the same W' per adapter.

A read whose weight reaches the op with its output features contracted (y = x·W, W stored (out, in)), or on the
left (y = W·x), is refused: g would scale the input there, not the output.
"""

from __future__ import annotations

import torch
from torch import fx

from lora_fx.sites.base import PEFT_PREFIX, Read, Site
from lora_fx.sites.views import CASTS, is_transpose, output_dim

aten = torch.ops.aten
CONTAINER = "lora_magnitude_vector"


def magnitude_name(site: Site, adapter: str) -> str:
    return f"{site.fqn}.{CONTAINER}.{adapter}.weight"


def magnitude_key(site: Site) -> str:
    """The magnitude's key in a PEFT adapter file (no adapter name, no `.weight`, as PEFT saves it)."""
    return f"{PEFT_PREFIX}{site.fqn}.{CONTAINER}"


def _out_in(site: Site, weight: torch.Tensor) -> torch.Tensor:
    return weight.T if site.fan_in_fan_out else weight


def initial_magnitude(site: Site, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """m = ‖W + s·B·A‖ per output feature (PEFT's `DoraLinearLayer.update_layer`), in W's dtype."""
    combined = _out_in(site, weight.float()) + scale * (lora_B.float() @ lora_A.float())        # (out, in)
    return torch.linalg.vector_norm(combined, dim=1).to(weight.dtype)


def merged_delta(site: Site, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                 magnitude: torch.Tensor) -> torch.Tensor:
    """W' − W = g·(W + s·B·A) − W in W's own layout (PEFT's `DoraLinearVariant.merge_safe`)."""
    combined = _out_in(site, weight) + scale * (lora_B @ lora_A)                                 # (out, in)
    merged = (magnitude / torch.linalg.vector_norm(combined, dim=1)).unsqueeze(1) * combined
    return _out_in(site, merged) - weight


def read_problems(site: Site) -> list[str]:
    """Why a read of `site` cannot carry DoRA (see the module docstring)."""
    problems = []
    for read in site.reads:
        if _output_dim(read, site) is None:
            problems.append(f"module {site.fqn!r} is read by {read.node.target} with its output features "
                            f"{'on the left' if read.detail.weight_first else 'contracted'}; DoRA scales output "
                            f"features, so it supports reads y = x·Wᵀ (nn.Linear) and y = x·W (HF Conv1D)")
    return problems


def _output_dim(read: Read, site: Site) -> int | None:
    """Where the weight's output-feature dim is after the read's views, if the read's output features are it."""
    out_dim = output_dim(read.chain, 1 if site.fan_in_fan_out else 0)
    form = read.detail
    produced = 1 if form.weight_transposed else 0                  # y = x·V: V's columns; y = x·Vᵀ: its rows
    return out_dim if not form.weight_first and out_dim == produced else None


def insert(read: Read, site: Site, factors, adapter: str, branch: fx.Node, dropped: fx.Node | None) -> fx.Node:
    """DoRA's term at one read: (g − 1)⊙(base read) + g⊙branch, with `branch` = s·x·ΔWᵀ from the linear kind
    and `dropped` the dropout of x where the graph has one."""
    masked_A, masked_B, scale, add = factors
    form = read.detail
    weight = read.chain[0].args[0] if read.chain else read.node.args[form.weight_index]
    gain = _gain(site, weight, masked_A, masked_B, scale, add("magnitude", magnitude_name(site, adapter),
                                                               op="get_attr"), add)
    out_dim = 1 if site.fan_in_fan_out else 0
    for view in read.chain:                                        # g follows the weight's views: slices, casts
        if is_transpose(view):
            out_dim = 1 - out_dim
        elif view.target is aten.slice.Tensor:
            if view.args[1] % 2 == out_dim:
                gain = add("dora_slice", aten.slice.Tensor, (gain, 0, *view.args[2:]))
        elif view.target in CASTS:
            gain = add("dora_cast", view.target, (gain, *view.args[1:]), dict(view.kwargs))
    if dropped is None:
        base = read.node                                           # y, and y − b where the read adds a bias
        bias = _bias(read)
        if bias is not None:
            base = add("dora_unbiased", aten.sub.Tensor, (base, bias))
    else:
        view = read.node.args[form.weight_index]
        op = aten.matmul.default if form.weight_transposed else aten.linear.default
        base = add("dora_base", op, (dropped, view))               # the base read of dropout(x), no bias
    gain_minus_one = add("dora_gain_minus_one", aten.sub.Tensor, (gain, 1))
    rescaled = add("dora_rescaled", aten.mul.Tensor, (gain_minus_one, base))
    directed = add("dora_directed", aten.mul.Tensor, (gain, branch))
    return add("dora_out", aten.add.Tensor, (rescaled, directed))


def _bias(read: Read) -> fx.Node | None:
    node = read.node
    if node.target is aten.addmm.default:
        return node.args[0]
    if node.target in (aten.linear.default, torch._C._nn.linear):
        return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return None


def _gain(site: Site, weight: fx.Node, masked_A: fx.Node, masked_B: fx.Node, scale: fx.Node, magnitude: fx.Node,
          add) -> fx.Node:
    """g = m / ‖W + s·B·A‖ (out,), the norm detached and computed from the factors; 1 where s = 0."""
    fp32 = torch.float32
    detached_A = add("dora_detach_A", aten.detach.default, (masked_A,))
    detached_B = add("dora_detach_B", aten.detach.default, (masked_B,))
    lora_A = add("dora_A", aten.to.dtype, (detached_A, fp32))
    lora_B = add("dora_B", aten.to.dtype, (detached_B, fp32))
    if site.fan_in_fan_out:                                        # W (in, out): W·Aᵀ in (out, in) terms is (A·W)ᵀ
        projected = add("dora_WA", aten.permute.default, (add("dora_AW", aten.mm.default, (detached_A, weight)),
                                                          [1, 0]))
        row_norms = add("dora_W_norm", aten.linalg_vector_norm.default, (weight, 2, [0]), {"dtype": fp32})
    else:
        projected = add("dora_WA", aten.linear.default, (weight, detached_A))                     # (out, r)
        row_norms = add("dora_W_norm", aten.linalg_vector_norm.default, (weight, 2, [1]), {"dtype": fp32})
    projected = add("dora_WA_fp32", aten.to.dtype, (projected, fp32))
    cross = add("dora_cross", aten.sum.dim_IntList, (add("dora_BWA", aten.mul.Tensor, (lora_B, projected)), [1]))
    gram = add("dora_AAt", aten.linear.default, (lora_A, lora_A))                                 # (r, r)
    quadratic = add("dora_quadratic", aten.sum.dim_IntList,
                    (add("dora_BAAtB", aten.mul.Tensor, (add("dora_BAAt", aten.linear.default, (lora_B, gram)),
                                                         lora_B)), [1]))
    squared = add("dora_W_norm_sq", aten.mul.Tensor, (row_norms, row_norms))
    twice_scale = add("dora_2s", aten.mul.Tensor, (scale, 2))
    squared = add("dora_norm_sq_cross", aten.add.Tensor, (squared, add("dora_cross_term", aten.mul.Tensor,
                                                                         (cross, twice_scale))))
    scale_sq = add("dora_s_sq", aten.mul.Tensor, (scale, scale))
    squared = add("dora_norm_sq", aten.add.Tensor, (squared, add("dora_quadratic_term", aten.mul.Tensor,
                                                                   (quadratic, scale_sq))))
    norm = add("dora_norm", aten.sqrt.default, (add("dora_clamp", aten.clamp_min.default, (squared, 0.0)),))
    norm = add("dora_norm_cast", aten.type_as.default, (norm, magnitude))
    ratio = add("dora_ratio", aten.div.Tensor, (magnitude, norm))
    active = add("dora_active", aten.ne.Scalar, (scale, 0))
    return add("dora_gain", aten.where.ScalarOther, (active, ratio, 1.0))
