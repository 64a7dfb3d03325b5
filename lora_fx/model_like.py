"""`ModelLike`: a captured graph answers where users and libraries (transformers' Trainer, TRL, accelerate) look on
a model. `LoraGraphModule` mixes it in.

    gm.config, gm.generation_config, gm.name_or_path, gm.main_input_name    the captured model's
    gm.device, gm.dtype                                                     of the graph's base weights
    gm.get_input_embeddings()                                               the input embedding, on gm's own table
    gm.num_parameters(only_trainable=False, exclude_embeddings=False)      transformers' count
    gm.get_nb_trainable_parameters(), gm.print_trainable_parameters()      PEFT's counts and its one-line summary
    gm.save_pretrained(directory)                                           PEFT's adapter directory layout
    gm.activation_checkpointing_enable() / _disable()                       lora_fx.checkpoint(gm, "selective"/"none")

Everything is read from the *template* (lora_fx's copy of the model's module structure, see `lora_fx.graph_module`)
and the graph's own tensors: the user's model is never held or touched. `config` and `generation_config` are the
template's objects, so a library that edits them (Trainer aligns special tokens) edits gm's copy, and graphs
captured later (another mode, dtype or device) see the edit, as the model would. A model without one of these
(a plain `nn.Module` has no `config`) makes the attribute missing on gm too, so `hasattr` answers as for the model.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from lora_fx.errors import AdapterError
from lora_fx.quantize import logical_numel
from lora_fx.state import is_lora_state_name

CHECKPOINT_POLICY = "selective"      # what `activation_checkpointing_enable()` turns on, unless told otherwise


class ModelLike:
    """The model-like surface of a captured graph (see the module docstring)."""

    # ---- read from the captured model ----------------------------------------------------------------------------

    @property
    def config(self):
        return self._from_template("config")

    @property
    def generation_config(self):
        return self._from_template("generation_config")

    @property
    def name_or_path(self) -> str:
        return self._from_template("name_or_path")

    @property
    def main_input_name(self) -> str:
        return self._from_template("main_input_name")

    def _from_template(self, name: str):
        template = self.__dict__.get("_lora_fx_template")
        if template is None or not hasattr(template, name):
            raise AttributeError(f"the captured {type(self).__name__} has no {name!r}")
        return getattr(template, name)

    def add_model_tags(self, tags) -> None:
        """Tags for a model card, kept on the captured model's copy (TRL tags the models it trains)."""
        self._from_template("add_model_tags")(tags)

    def get_input_embeddings(self) -> nn.Module:
        """The model's input embedding module (its class and settings) on this graph's own table: it reads and
        computes like the model's, but the graph does not call it, so hooks registered on it never run in the
        graph."""
        template = self._lora_fx_template
        embedding = self._from_template("get_input_embeddings")()
        path = next(name for name, module in template.named_modules(remove_duplicate=False) if module is embedding)
        own = self.get_submodule(path)
        view = copy.copy(embedding)
        view.__dict__.update(_parameters=own._parameters, _buffers=own._buffers)
        for name, value in embedding.__dict__.items():
            if "hooks" in name and isinstance(value, dict):
                view.__dict__[name] = type(value)()
        return view

    # ---- placement and counts ------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """The device of the base weights (transformers: of the first parameter)."""
        return next(self._base_parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first floating-point base weight (transformers' rule)."""
        return next((p.dtype for p in self._base_parameters() if p.is_floating_point()), torch.get_default_dtype())

    def _base_parameters(self):
        return (param for name, param in self.named_parameters() if not is_lora_state_name(name))

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """The number of parameters (quantized weights count their logical elements), as transformers counts."""
        embeddings = {f"{fqn}.weight" for fqn, kind in self.meta["lora_fx"].module_kinds.items() if kind == "embedding"}
        return sum(logical_numel(param) for name, param in self.named_parameters()
                   if not (exclude_embeddings and name in embeddings) and (param.requires_grad or not only_trainable))

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameters, as PEFT's `get_nb_trainable_parameters` counts them."""
        return self.num_parameters(only_trainable=True), self.num_parameters()

    def print_trainable_parameters(self) -> None:
        """Print PEFT's one-line summary: trainable, all, and the trainable share."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: "
              f"{100 * trainable / total:.4f}")

    # ---- saving --------------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory, selected_adapters: list[str] | None = None,
                        is_main_process: bool = True) -> None:
        """Save adapters as PEFT's `save_pretrained` lays them out: "default" in `save_directory`, any other adapter
        in `save_directory/<name>` (each a PEFT adapter directory, see `lora_fx.save_adapter`). The frozen base is
        never written. On a model sharded by `lora_fx.shard` every rank must call it (the save is collective);
        otherwise only the process with `is_main_process` writes."""
        from lora_fx.distributed import is_sharded
        from lora_fx.exporters.peft_dir import save_adapter

        names = list(self.meta["lora_fx"].specs) if selected_adapters is None else list(selected_adapters)
        if not names:
            raise AdapterError("this graph has no adapter to save: apply one first (lora_fx.apply(gm, LoraSpec(...)))")
        if not (is_main_process or is_sharded(self)):
            return
        for name in names:
            save_adapter(self, save_directory if name == "default" else os.path.join(save_directory, name), name)

    # ---- activation checkpointing (transformers' Trainer and TRL switch it) ------------------------------------

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.meta["lora_fx"].checkpoint != "none"

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """`lora_fx.checkpoint(gm, "selective")`: each block's backward recomputes its cheap ops and keeps its
        matmul outputs; `activation_checkpointing_kwargs={"policy": "full"}` recomputes whole blocks. The
        checkpointing is part of the graph, so torch's `use_reentrant` choice does not apply and is ignored."""
        from lora_fx.apply import checkpoint

        options = dict(activation_checkpointing_kwargs or {})
        policy = options.pop("policy", CHECKPOINT_POLICY)
        options.pop("use_reentrant", None)
        unsupported = sorted(options) + (["every_n_layers"] if every_n_layers != 1 else []) + (
            ["offload"] if offload else [])
        if unsupported:
            raise ValueError(f"activation checkpointing options {unsupported} are not supported by lora_fx, which "
                             f"checkpoints every block inside the graph; it takes {{'policy': 'selective' | 'full'}}")
        checkpoint(self, policy)

    def activation_checkpointing_disable(self) -> None:
        from lora_fx.apply import checkpoint

        checkpoint(self, "none")

    is_gradient_checkpointing = is_activation_checkpointing          # transformers' older names, which TRL calls

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()
