"""torch.distributed figures on the benchmark Llama (CPU, gloo): per-rank parameter memory and training step time
for 1 and 2 ranks, DDP and FSDP2 (`lora_fx.shard`); and the compile time of the whole graph vs block by block.

    python -m benchmarks.distributed          # writes benchmarks/results/distributed.{json,md}

Each rank runs the same per-rank batch (weak scaling): with 2 ranks twice the tokens are trained per step.
"""

from __future__ import annotations

import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lora_fx
from benchmarks.common import median_seconds, write_results
from benchmarks.models import llama, token_batch
from lora_fx import LoraSpec

SPEC = LoraSpec(targets="all-linear", rank=8, alpha=16.0)
BATCH, SEQ = 2, 128
EXAMPLE = {"example_args": (token_batch(batch=2, seq=16),), "example_kwargs": {"use_cache": False}}


def local_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters this process holds (its shards, for FSDP2)."""
    total = 0
    for param in module.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        total += local.numel() * local.element_size()
    return total


def rank_worker(rank: int, world: int, port: int, strategy: str, out: str) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    gm = lora_fx.apply(llama(), SPEC, **EXAMPLE)
    model = torch.nn.parallel.DistributedDataParallel(gm) if strategy == "DDP" else lora_fx.shard(gm)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = token_batch(batch=BATCH, seq=SEQ, seed=rank)

    def step():
        model(ids).logits.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = median_seconds(step, repeats=5, warmup=2)
    if rank == 0:
        torch.save({"seconds": seconds, "bytes": local_bytes(gm)}, out)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scaling_rows() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for strategy in ("DDP", "FSDP2"):
            for world in (1, 2):
                out = str(Path(folder) / f"{strategy}{world}.pt")
                mp.spawn(rank_worker, args=(world, free_port(), strategy, out), nprocs=world)
                result = torch.load(out)
                rows.append({"strategy": strategy, "ranks": world, "parameter MiB per rank": result["bytes"] / 2**20,
                             "step s": result["seconds"], "tokens/s (all ranks)": world * BATCH * SEQ / result["seconds"]})
    return rows


def compile_seconds(blocks: bool) -> float:
    """Time to the first compiled training step: the whole graph at once, or each block compiled on its own."""
    torch._dynamo.reset()
    gm = lora_fx.apply(llama(), SPEC, **EXAMPLE, blocks=blocks)
    ids = token_batch(batch=BATCH, seq=SEQ)
    started = time.perf_counter()
    if blocks:
        for block in lora_fx.blocks(gm):
            block.compile()
        run = gm
    else:
        run = torch.compile(gm)
    run(ids).logits.float().pow(2).mean().backward()
    return time.perf_counter() - started


def main() -> None:
    rows = scaling_rows()
    flat, per_block = compile_seconds(blocks=False), compile_seconds(blocks=True)
    notes = (f"Compile time to the first training step (torch.compile, CPU): whole flat graph {flat:.1f} s; "
             f"block by block (`block.compile()` on each of `lora_fx.blocks(gm)`) {per_block:.1f} s.\n\n"
             f"Per-rank batch {BATCH}x{SEQ} (weak scaling). FSDP2 shards the frozen base too, so parameter memory per "
             f"rank halves with 2 ranks; on 2 CPU cores the ranks share the cores, so step time shows the "
             f"communication overhead, not a speed-up.")
    print(write_results("distributed", "DDP and FSDP2 on torch.distributed (gloo), benchmark Llama", rows, notes))


if __name__ == "__main__":
    main()
