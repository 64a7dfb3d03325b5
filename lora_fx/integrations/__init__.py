"""Drop-in trainers for the tools people train with, each in its own module (imported only when used):

    lora_fx.integrations.transformers   Trainer: checkpoints and save_model() hold the adapter, never the frozen base
    lora_fx.integrations.trl            SFTTrainer and DPOTrainer: the same, with TRL's loss computed from the logits

accelerate needs nothing of its own: `accelerator.prepare(gm, optimizer, loader)` takes a captured graph as it takes a
model, and `accelerator.unwrap_model(gm).save_pretrained(path, is_main_process=accelerator.is_main_process)` writes
the adapter.
"""
