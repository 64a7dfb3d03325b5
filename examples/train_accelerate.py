"""Train a LoRA adapter with a plain loop under accelerate, then save it from the main process as a PEFT directory.

    accelerate launch --multi_gpu --num_processes 2 examples/train_accelerate.py --batch 2   # 2 processes
    python examples/train_accelerate.py --batch 4                                          # the same, in one

On a machine without a GPU the script asks accelerate for the CPU (`Accelerator(cpu=True)`), which makes the two
processes a gloo group (accelerate's launcher starts several processes only in its `--multi_gpu` mode; with `--cpu`
it starts one).

`accelerator.prepare(gm, optimizer, loader)` takes the captured graph as it takes a model (DDP over the LoRA
parameters, the only ones that require grad) and gives each process its share of every batch of the loader, so two
processes with --batch 2 train exactly what one process with --batch 4 trains. Only the main process writes.
"""

from __future__ import annotations

import argparse

import torch
import transformers
from accelerate import Accelerator

import lora_fx
from lora_fx import LoraSpec

VOCAB, LENGTH, SAMPLES = 97, 12, 16


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)                        # the same base weights and adapter on every process
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2, help="rows per process per step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="out/accelerate_adapter")
    args = parser.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    tokens = torch.randint(0, VOCAB, (SAMPLES, LENGTH), generator=torch.Generator().manual_seed(1))
    example = tokens[:2]
    gm = lora_fx.apply(tiny_llama(), LoraSpec(targets="all-linear", rank=4, alpha=8.0),
                       example_kwargs={"input_ids": example, "labels": example, "use_cache": False})
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    loader = torch.utils.data.DataLoader(tokens, batch_size=args.batch)
    model, optimizer, loader = accelerator.prepare(gm, optimizer, loader)

    model.train()
    for step, batch in zip(range(args.steps), loader):
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        accelerator.print(f"step {step}: loss {accelerator.reduce(loss.detach(), 'mean').item():.4f}")   # all rows

    accelerator.wait_for_everyone()
    accelerator.unwrap_model(model).save_pretrained(args.out, is_main_process=accelerator.is_main_process)


if __name__ == "__main__":
    main()
