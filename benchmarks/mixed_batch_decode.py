"""Many adapters in one batch at decode shape (16 rows x 1 token), where per-adapter Python overhead is not hidden
behind large matmuls: lora_fx mixed_batch (eager, compiled) vs the single-adapter graph vs PEFT's `adapter_names`
loop, K = 1, 4, 8, 16, side by side in one process (same models and helpers as `benchmarks.mixed_batch`).

    python -m benchmarks.mixed_batch_decode     # writes benchmarks/results/mixed_batch_decode.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import lora_fx
from benchmarks.common import RESULTS, machine
from benchmarks.mixed_batch import COUNTS, RANK, ROWS, lora_fx_graph, names, peft_with, row_ids, table, timed_rows
from benchmarks.models import llama, token_batch

SEQ = 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = llama()
    ids = token_batch(batch=ROWS, seq=SEQ)
    load_before = os.getloadavg()[0]
    with torch.no_grad():
        single, every = lora_fx_graph(model, 1), lora_fx_graph(model, max(COUNTS))
        reference = peft_with(model, max(COUNTS))
        compiled_single = torch.compile(single)
        calls = {"single-adapter graph, eager": lambda: single(ids),
                 "single-adapter graph, compiled": lambda: compiled_single(ids)}
        for count in COUNTS:
            mixed = lora_fx.mixed_batch(every, names(count)).eval()
            compiled = torch.compile(mixed)
            rows = row_ids(count)
            peft_names = [f"a{k}" for k in rows.tolist()]
            calls[f"K={count} lora_fx mixed, eager"] = lambda m=mixed, r=rows: m(ids, adapter_ids=r)
            calls[f"K={count} lora_fx mixed, compiled"] = lambda m=compiled, r=rows: m(ids, adapter_ids=r)
            calls[f"K={count} PEFT adapter_names loop, eager"] = (
                lambda n=peft_names: reference(input_ids=ids, adapter_names=n, use_cache=False))
        seconds = timed_rows(calls, args.repeats)
    load_after = os.getloadavg()[0]
    rows = []
    for name, s in seconds.items():
        mode = name.rsplit(", ", 1)[-1]
        count = name.split(" ", 1)[0][2:] if name.startswith("K=") else None
        loop = seconds.get(f"K={count} PEFT adapter_names loop, eager")
        rows.append({"variant": name, "ms": s * 1e3, "tokens/s": ROWS * SEQ / s,
                     "throughput vs single-adapter (same mode)": seconds[f"single-adapter graph, {mode}"] / s,
                     "throughput vs PEFT loop (same K)": loop / s if loop else "-"})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mixed_batch_decode.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")
    lines = [f"# Mixed-adapter batches at decode shape: Llama hidden 512 x 4 layers, {ROWS} rows x {SEQ} token, "
             f"all-linear r={RANK} per adapter, inference", "", f"Machine: {machine()}", "",
             f"CPU time of this process, one torch thread, median of {args.repeats} (best of 2 interleaved rounds); "
             f"load average {load_before:.1f} before, {load_after:.1f} after (shared machine).", "", *table(rows), ""]
    (RESULTS / "mixed_batch_decode.md").write_text("\n".join(lines))
    print((RESULTS / "mixed_batch_decode.md").read_text())


if __name__ == "__main__":
    main()
