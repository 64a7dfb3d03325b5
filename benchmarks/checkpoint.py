"""Activation checkpointing per block (`lora_fx.checkpoint`): peak memory and step time of a LoRA training step on
the benchmark Llama, for each policy, each in a fresh process (peak RSS counts what the step allocated).

    python -m benchmarks.checkpoint            # writes benchmarks/results/checkpoint.{json,md}
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

import lora_fx
from benchmarks.common import median_seconds, write_results
from benchmarks.models import llama, token_batch
from lora_fx import LoraSpec

BATCH, SEQ = 4, 256
POLICIES = ("none", "selective", "full")


def measure(policy: str) -> dict:
    gm = lora_fx.apply(llama(), LoraSpec(targets="all-linear", rank=8, alpha=16.0),
                       (token_batch(batch=2, seq=16),), {"use_cache": False})
    lora_fx.checkpoint(gm, policy)
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-4)
    ids = token_batch(batch=BATCH, seq=SEQ)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def step():
        gm(ids).logits.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = median_seconds(step, repeats=3, warmup=1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"policy": policy, "step s": seconds, "peak RSS MiB": peak, "peak - before step MiB": peak - before}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy", choices=POLICIES)
    args = parser.parse_args()
    if args.policy:
        print(json.dumps(measure(args.policy)))
        return
    rows = []
    for policy in POLICIES:
        run = subprocess.run([sys.executable, "-m", "benchmarks.checkpoint", "--policy", policy], check=True,
                             capture_output=True, text=True)
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
    base = rows[0]
    for row in rows:
        row["time / none"] = row["step s"] / base["step s"]
        row["step memory / none"] = row["peak - before step MiB"] / base["peak - before step MiB"]
    notes = (f"Eager, batch {BATCH}x{SEQ}, all-linear r=8, AdamW; each policy in a fresh process. 'peak - before "
             f"step' is the growth of peak RSS over the training steps (activations, gradients, optimizer state).")
    print(write_results("checkpoint", "Per-block activation checkpointing (lora_fx.checkpoint)", rows, notes))


if __name__ == "__main__":
    main()
