"""ONNX Runtime latency (CPU provider): plain export vs merged LoRA vs unmerged LoRA, in one process.

    python -m benchmarks.onnx_latency
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnxruntime as ort
import torch

import lora_fx
from benchmarks.common import median_seconds, write_results
from benchmarks.models import BATCH, SEQ, llama, token_batch
from lora_fx import LoraSpec
from lora_fx.exporters.onnx import export_onnx


def main() -> None:
    model = llama().eval()
    example = {"example_args": (token_batch(batch=2, seq=16),), "example_kwargs": {"use_cache": False}}
    plain = lora_fx.capture(model, **example).eval()
    adapted = lora_fx.apply(model, LoraSpec(targets="all-linear", rank=8), **example).eval()
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.01)
    feed = {"input_ids": token_batch().numpy()}
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        files = {"plain (no LoRA)": export_onnx(plain, Path(scratch) / "plain.onnx"),
                 "merged LoRA r=8": export_onnx(adapted, Path(scratch) / "merged.onnx"),
                 "unmerged LoRA r=8": export_onnx(adapted, Path(scratch) / "unmerged.onnx", merged=False)}
        sessions = {k: ort.InferenceSession(str(f), options, providers=["CPUExecutionProvider"])
                    for k, f in files.items()}
        for _ in range(2):    # interleaved rounds: drift on a shared machine hits every variant alike
            for label, session in sessions.items():
                seconds = median_seconds(lambda: session.run(None, feed), repeats=20)
                rows.append({"model": label, "ms": seconds * 1e3})
    best = {label: min(r["ms"] for r in rows if r["model"] == label) for label in sessions}
    table = [{"model": label, "ms (median, best of 2 rounds)": ms, "vs plain": ms / best["plain (no LoRA)"],
              "vs merged": ms / best["merged LoRA r=8"]} for label, ms in best.items()]
    path = write_results("onnx_latency", f"ONNX Runtime CPU latency, Llama hidden 512 x 4 layers, vocab 2000, "
                                         f"batch {BATCH} x {SEQ} tokens", table)
    print(path.read_text())


if __name__ == "__main__":
    main()
