"""transformers' `Trainer` for captured graphs: checkpoints hold the adapter, never the frozen base.

    from lora_fx.integrations.transformers import Trainer
    trainer = Trainer(model=gm, args=TrainingArguments(...), train_dataset=...)     # as transformers.Trainer

The stock `Trainer` saves a model that is not a `PreTrainedModel` as its whole state dict (`model.safetensors`:
every frozen base weight, gigabytes a checkpoint). This `Trainer` saves a graph made by lora_fx the way it saves a
PEFT model: `save_model()` and every checkpoint write the PEFT adapter directory (`gm.save_pretrained`; it loads in
PEFT), beside the optimizer, scheduler and RNG state the Trainer writes itself; `resume_from_checkpoint` and
`load_best_model_at_end` write the saved LoRA weights back into the graph's adapters in place
(`lora_fx.exporters.peft_dir.restore_adapters`), so training continues exactly where the checkpoint was taken.
`gradient_checkpointing=True` is `lora_fx.checkpoint(gm, "selective")` (see `lora_fx.model_like`). Models that are
not lora_fx graphs are trained as the stock `Trainer` trains them.

`AdapterCheckpoints` is the behaviour on its own, to mix into another Trainer subclass (TRL's are, in
`lora_fx.integrations.trl`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers

from lora_fx.errors import AdapterError
from lora_fx.exporters.peft_dir import CONFIG_FILE, restore_adapters
from lora_fx.state import is_lora_graph

WHOLE_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class AdapterCheckpoints:
    """Adapter-only saving and exact resuming for a lora_fx graph, on top of any transformers Trainer class."""

    def __init__(self, model=None, *args, **kwargs):
        if is_lora_graph(model) and not any(param.requires_grad for param in model.parameters()):
            raise AdapterError(f"the {type(model).__name__} graph given to {type(self).__name__} has no trainable "
                               f"parameters (adapters: {list(model.meta['lora_fx'].specs) or 'none'}): add one with "
                               f"lora_fx.apply(gm, LoraSpec(...)) before training")
        super().__init__(model, *args, **kwargs)

    def _graph(self):
        """The lora_fx graph being trained, unwrapped from DDP and torch.compile; None for any other model."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if is_lora_graph(model) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        gm = self._graph()
        if gm is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        gm.save_pretrained(output_dir, is_main_process=self.args.should_save)
        if self.args.should_save:
            tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
            if tokenizer is not None:                       # as the stock Trainer saves them
                tokenizer.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        gm = model if model is not None else self._graph()
        if not is_lora_graph(gm):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        restore_checkpoint(gm, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        gm = self._graph()
        if gm is None:
            return super()._load_best_model()
        restore_checkpoint(gm, self.state.best_model_checkpoint)


class Trainer(AdapterCheckpoints, transformers.Trainer):
    """`transformers.Trainer` whose checkpoints of a lora_fx graph hold its adapters (see the module docstring)."""


def restore_checkpoint(gm, checkpoint) -> None:
    """Write the adapters saved in `checkpoint` back into `gm`'s, or raise naming what the directory holds instead;
    nothing is written unless every adapter fits exactly."""
    directory = Path(checkpoint)
    adapters = [directory if name == "default" else directory / name for name in gm.meta["lora_fx"].specs]
    whole = [name for name in WHOLE_MODEL_FILES if (directory / name).is_file()]
    if whole and not any((path / CONFIG_FILE).is_file() for path in adapters):
        raise AdapterError(f"cannot resume from {str(directory)!r}: it holds the whole model's state dict "
                           f"({', '.join(whole)}, frozen base included), as a Trainer without lora_fx.integrations "
                           f"saves a graph, not an adapter checkpoint; resume from a checkpoint written by "
                           f"lora_fx.integrations ({CONFIG_FILE} + adapter_model.safetensors), or load those LoRA "
                           f"weights yourself with gm.load_state_dict(..., strict=False) and start a new run")
    try:
        restore_adapters(gm, directory)
    except AdapterError as err:
        raise AdapterError(f"cannot resume: the checkpoint's adapter layout differs from the model's. {err}") from None
