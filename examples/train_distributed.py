"""Train a LoRA adapter on several processes with torch.distributed, then save it as a PEFT directory.

    torchrun --nproc_per_node 2 examples/train_distributed.py --strategy fsdp2     # or --strategy ddp

gloo on CPU, NCCL on GPU (one GPU per process). Each rank trains on its own batches; with DDP every rank holds the
whole model and only the LoRA gradients are all-reduced; with FSDP2 (`lora_fx.shard`) every block and the root are
sharded, so each rank holds about 1/N of every weight at rest, the frozen base's included. On GPU, --bf16 adds
FSDP2's mixed precision (bf16 parameters in compute, fp32 gradient reduction).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import transformers

import lora_fx
from lora_fx import LoraSpec


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)                        # the same base weights on every rank
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", choices=["ddp", "fsdp2"], default="fsdp2")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="out/distributed_adapter")
    parser.add_argument("--bf16", action="store_true", help="FSDP2 mixed precision (GPU)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    example = torch.randint(0, 1000, (2, 32))
    gm = lora_fx.apply(tiny_llama().to(device), LoraSpec(targets="all-linear", rank=8, alpha=16.0),
                       example_kwargs={"input_ids": example.to(device), "labels": example.to(device),
                                       "use_cache": False})
    if args.strategy == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(gm)
    else:
        policy = None
        if args.bf16:
            from torch.distributed.fsdp import MixedPrecisionPolicy
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        model = lora_fx.shard(gm, mp_policy=policy)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(1000 + rank)             # each rank its own data
    for step in range(args.steps):
        ids = torch.randint(0, 1000, (2, 32), generator=generator).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0 and step % 5 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")

    if args.strategy == "fsdp2" or rank == 0:     # sharded: every rank gathers, rank 0 writes; DDP: rank 0 writes
        lora_fx.save_adapter(gm, args.out)
    if rank == 0:
        print(f"saved {args.out} ({args.strategy}, {dist.get_world_size()} ranks)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
