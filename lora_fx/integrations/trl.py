"""TRL's trainers for captured graphs: `SFTTrainer` and `DPOTrainer`, with adapter checkpoints.

    from lora_fx.integrations.trl import SFTTrainer
    trainer = SFTTrainer(model=gm, args=SFTConfig(...), train_dataset=..., processing_class=tokenizer)

Each is TRL's trainer with `lora_fx.integrations.transformers.AdapterCheckpoints` (checkpoints and `save_model()`
hold the PEFT adapter directory; resuming restores it exactly) and one change to how the loss is computed. TRL
patches the model's Python `forward` with a fused LM head that calls the model's backbone module and its
`lm_head` separately (`trl.trainer.utils.add_fused_lm_head`); a captured graph runs the model as one graph, so here
`model(..., fused_lm_head=True)` runs the graph and computes the same per-token outputs from its logits
(`logits_head`, added where TRL adds its head). The logits of the whole batch are then held at once, as transformers' own loss holds them.

`DPOTrainer` without a `ref_model` takes the reference log-probabilities from the same graph with its adapters
disabled (`lora_fx.disabled`): the base model, as TRL's PEFT path does for a new adapter (`peft_config=`), with no
second copy of the weights, also with `precompute_ref_log_probs=True`. (For a model that already holds a trained
adapter TRL's PEFT path keeps a frozen copy of it as the reference; here pass `ref_model=` a graph holding it.) TRL turns dropout off for DPO in the
model's modules; a graph's LoRA dropout is its spec's, so use `dropout=0` there.

The graph must be captured with the inputs the trainers pass: `input_ids`, `attention_mask` and `use_cache=False`.
TRL's configs turn `bf16` on by default (autocast, see `lora_fx.passes.autocast_ready`) and SFT's turns gradient
checkpointing on (`lora_fx.checkpoint(gm, "selective")`).
"""

from __future__ import annotations

import contextlib
import types

import torch
import trl
import trl.trainer.dpo_trainer
import trl.trainer.sft_trainer
from torch import nn
from trl.trainer.utils import FusedCausalLMOutput

from lora_fx.adapters import disabled
from lora_fx.integrations.transformers import AdapterCheckpoints
from lora_fx.state import is_lora_graph


class SFTTrainer(AdapterCheckpoints, trl.SFTTrainer):
    """`trl.SFTTrainer` for a lora_fx graph (see the module docstring)."""

    def __init__(self, model=None, *args, **kwargs):
        with graphs_get_logits_heads(trl.trainer.sft_trainer):
            super().__init__(model, *args, **kwargs)


class DPOTrainer(AdapterCheckpoints, trl.DPOTrainer):
    """`trl.DPOTrainer` for a lora_fx graph; without `ref_model`, the reference is the graph with its adapters
    disabled (see the module docstring)."""

    def __init__(self, model=None, ref_model=None, *args, **kwargs):
        if is_lora_graph(model) and ref_model is None:
            ref_model = BaseModelOf(model)
        with graphs_get_logits_heads(trl.trainer.dpo_trainer):
            super().__init__(model, ref_model, *args, **kwargs)


@contextlib.contextmanager
def graphs_get_logits_heads(trainer_module):
    """While a TRL trainer is made, where it adds its fused LM head (`add_fused_lm_head`) to a lora_fx graph (or the
    base model of one), add `logits_head` instead (TRL may already run the model in its `__init__`, computing
    reference log-probabilities)."""
    fused = trainer_module.add_fused_lm_head

    def add_lm_head(model, *args, temperature: float = 1.0, **kwargs):
        if not (is_lora_graph(model) or isinstance(model, BaseModelOf)):
            return fused(model, *args, temperature=temperature, **kwargs)
        if temperature != 1.0:
            raise ValueError(f"lora_fx computes TRL's LM-head outputs at temperature 1, got {temperature}")
        logits_head(model)
    trainer_module.add_fused_lm_head = add_lm_head
    try:
        yield
    finally:
        trainer_module.add_fused_lm_head = fused


class BaseModelOf(nn.Module):
    """The base model of a lora_fx graph `gm` as a module of its own: `gm` called with its adapters disabled and no
    gradient. It holds `gm` without registering it, so preparing it (accelerate) and turning its dropout off (TRL)
    leave `gm` alone."""

    def __init__(self, gm):
        super().__init__()
        self.__dict__["gm"] = gm
        self.config, self.generation_config = gm.config, gm.generation_config

    def forward(self, **inputs):
        with torch.no_grad(), disabled(self.gm):
            return self.gm(**inputs)


def logits_head(model: nn.Module) -> None:
    """Make `model(..., labels=labels, fused_lm_head=True)` return TRL's `FusedCausalLMOutput`, computed from the
    logits the model returns (in place of TRL's patch, which calls the backbone and the LM head separately). With
    `output_router_logits=True` (TRL's MoE load balancing) the model's `aux_loss` is added as TRL adds it."""

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        call = type(self).forward           # the graph's own forward, of the current mode
        if not fused_lm_head:
            extra = {name: value for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                                     ("num_items_in_batch", num_items_in_batch)) if value is not None}
            return call(self, *args, **kwargs, **extra)
        outputs = call(self, *args, **kwargs)
        result = per_token_outputs(outputs.logits, labels, shift_labels, num_items_in_batch)
        if kwargs.get("output_router_logits"):
            coefficient = getattr(self.config.get_text_config(), "router_aux_loss_coef", 0.0)
            result.aux_loss = outputs.aux_loss
            result.loss = result.loss + coefficient * outputs.aux_loss
        return result
    model.forward = types.MethodType(forward, model)


def per_token_outputs(logits, labels, shift_labels=None, num_items_in_batch=None) -> FusedCausalLMOutput:
    """TRL's fused LM head outputs (at temperature 1) from full logits: per next-token label its log-probability,
    the distribution's entropy, log Σp², mean logit and whether the label is the top token, each 0 where the label
    is -100 (all but the log-probability without gradient); the loss is the summed negative log-likelihood over
    `num_items_in_batch` (default: the number of labels)."""
    if shift_labels is None:
        logits, labels = logits[:, :-1], labels[:, 1:]          # (batch, seq - 1, vocab), (batch, seq - 1)
    else:
        labels = shift_labels
    mask = labels != -100
    log_softmax = logits.float().log_softmax(-1)
    log_probs = log_softmax.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0)
    with torch.no_grad():
        entropy = -(log_softmax.exp() * log_softmax).sum(-1).masked_fill(~mask, 0)
        log_sum_sq_probs = (2 * log_softmax).logsumexp(-1).masked_fill(~mask, 0)
        mean_logits = logits.float().mean(-1).masked_fill(~mask, 0)
        is_top1 = (logits.argmax(-1) == labels) & mask
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs,
                               mean_logits=mean_logits, is_top1=is_top1, label_mask=mask)
