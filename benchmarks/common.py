"""Shared by the benchmarks: the machine, repeated timing, and writing result tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {torch.get_num_threads()} torch threads ({os.cpu_count()} cores), {device}; "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def median_seconds(run, repeats: int = 30, warmup: int = 5, clock=time.perf_counter) -> float:
    """Median time of `run()` over `repeats` calls after `warmup` calls: wall time, or e.g. `time.process_time`
    (this process's CPU time, which does not grow when other jobs share the cores)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        started = clock()
        run()
        times.append(clock() - started)
    return statistics.median(times)


def loss_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy of `logits` on `ids`."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def training_step(module, call, ids):
    """`step()`: forward `call(ids)`, the loss's backward, and an AdamW step over `module`'s trainable parameters."""
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss_of(call(ids), ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def write_results(name: str, title: str, rows: list[dict], notes: str = "") -> Path:
    """benchmarks/results/<name>.json and .md: the rows as a table, with the machine named."""
    RESULTS.mkdir(exist_ok=True)
    described = machine()
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": described, "rows": rows}, indent=2) + "\n")
    headers = list(rows[0])
    lines = [f"# {title}", "", f"Machine: {described}", "", "| " + " | ".join(headers) + " |",
             "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(row[h]) for h in headers) + " |" for row in rows]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + ("\n\n" + notes if notes else "") + "\n")
    return RESULTS / f"{name}.md"


def _cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
