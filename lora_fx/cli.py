"""`lora-fx`: the command line.

    lora-fx demo [--save DIR]          train an all-linear adapter on a small Llama, loss and sites shown
    lora-fx inspect [--model M] [...]  the sites a spec would adapt, without changing anything
    lora-fx merge --adapter DIR --out F [--model M]   merged weights as a safetensors state dict
    lora-fx convert DIR                adapter_model.bin -> adapter_model.safetensors (weights-only unpickling)
    lora-fx export --adapter DIR [...] --out m.onnx [--unmerged]   ONNX (+ onnxruntime adapter files)
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch
from torch import nn

import lora_fx
from lora_fx.demo import counting_batch, demo_model, next_token_loss
from lora_fx.match import match
from lora_fx.spec import LoraSpec
from lora_fx.state import state_of


MODEL_HELP = "'demo', or 'module:factory' returning a model, or (model, example_args[, kwargs])"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lora-fx", description="LoRA as a graph-rewriting compiler pass.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train an all-linear adapter on a small Llama built from a config")
    demo.add_argument("--steps", type=int, default=60)
    demo.add_argument("--rank", type=int, default=8)
    demo.add_argument("--lr", type=float, default=1e-2)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--save", metavar="DIR", help="save the trained adapter there (PEFT format)")
    inspect = commands.add_parser("inspect", help="print the sites a spec would adapt, changing nothing")
    inspect.add_argument("--model", default="demo", help=MODEL_HELP)
    inspect.add_argument("--targets", nargs="+", default=["all-linear"],
                         help="'all-linear', one regex, or several module names")
    inspect.add_argument("--rank", type=int, default=8)
    inspect.add_argument("--alpha", type=float, default=16.0)
    inspect.add_argument("--exclude", nargs="+")
    inspect.add_argument("--layers", type=int, nargs="+")
    inspect.add_argument("--show-skipped", action="store_true", help="list every module not adapted, with why")
    merge = commands.add_parser("merge", help="fold an adapter directory into a model's weights")
    merge.add_argument("--model", default="demo", help=MODEL_HELP)
    merge.add_argument("--adapter", required=True, metavar="DIR", help="PEFT adapter directory")
    merge.add_argument("--out", required=True, metavar="FILE", help="merged state dict (.safetensors) to write")
    convert = commands.add_parser("convert", help="convert a pickled adapter_model.bin to safetensors")
    convert.add_argument("directory", metavar="DIR")
    export = commands.add_parser("export", help="export a model with adapters to ONNX")
    export.add_argument("--model", default="demo", help=MODEL_HELP)
    export.add_argument("--adapter", action="append", default=[], metavar="DIR",
                        help="PEFT adapter directory; repeat for several (named after their directories)")
    export.add_argument("--out", required=True, metavar="FILE", help="the .onnx file to write")
    export.add_argument("--unmerged", action="store_true", help="keep LoRA weights as swappable inputs, and write "
                        "an onnxruntime adapter file per adapter next to the model")
    export.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check of the written file")
    args = parser.parse_args(argv)
    run = {"demo": run_demo, "inspect": run_inspect, "merge": run_merge, "convert": run_convert,
           "export": run_export}[args.command]
    try:
        return run(args)
    except (ValueError, TypeError, ImportError, OSError) as err:
        print(f"lora-fx {args.command}: {err}", file=sys.stderr)
        return 2


def _table(headers: list[str], rows: list[list], out=print) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if isinstance(c, int) else str(c).ljust(w)
                                   for c, w in zip(cells, widths)).rstrip()
    out(line(headers))
    out("  ".join("-" * w for w in widths))
    for row in rows:
        out(line(row))


def _site_rows(found, spec: LoraSpec) -> list[list]:
    """One row per site a match adapts (including those a fused-op lowering will create)."""
    rows = []
    for site in found.sites + found.pending:
        rank = spec.rank_for(site.fqn)
        rows.append([site.fqn, f"{site.out_features}x{site.in_features}", site.op, rank,
                     rank * (site.in_features + site.out_features)])
    return rows


def run_demo(args) -> int:
    from tqdm import tqdm

    model, example_args, example_kwargs = demo_model(seed=args.seed)
    spec = LoraSpec(targets="all-linear", rank=args.rank, alpha=2.0 * args.rank)
    started = time.perf_counter()
    gm = lora_fx.capture(model, example_args, example_kwargs)
    rows = _site_rows(match(gm, spec, state_of(gm)), spec)
    lora_fx.apply(gm, spec)
    print(f"captured and adapted {type(model).__name__} in {time.perf_counter() - started:.1f}s\n")
    _table(["site", "out x in", "op", "rank", "LoRA params"], rows)
    trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    share = 100 * trainable / (total + trainable)
    print(f"\ntrainable: {trainable:,} of {total + trainable:,} parameters ({share:.1f}%) in {len(rows)} sites\n")

    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(args.seed + 1)
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=args.lr)
    losses = []
    with tqdm(range(args.steps), desc="training", unit="step") as progress:
        for _ in progress:
            ids = counting_batch(generator, vocab)
            loss = next_token_loss(gm(ids).logits, ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            progress.set_postfix(loss=f"{loss.item():.3f}")
    every = max(1, len(losses) // 6)
    print("\nloss: " + " -> ".join(f"{losses[i]:.2f}" for i in [*range(0, len(losses), every)][:6] + [len(losses) - 1]))
    held_out = counting_batch(torch.Generator().manual_seed(10_000), vocab)
    gm.eval()
    with torch.no_grad():
        adapted = next_token_loss(gm(held_out).logits, held_out).item()
        with lora_fx.disabled(gm):
            base = next_token_loss(gm(held_out).logits, held_out).item()
    print(f"held-out loss: base model {base:.3f}, with adapter {adapted:.3f}")
    if args.save:
        lora_fx.save_adapter(gm, args.save)
        print(f"adapter saved to {args.save} (loads with lora_fx.load_adapter or peft.PeftModel.from_pretrained)")
    return 0


def _load_factory(path: str):
    module_name, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"--model must be 'demo' or 'module:factory', got {path!r}")
    made = getattr(importlib.import_module(module_name), attr)()
    if isinstance(made, nn.Module):
        return made, None, None
    model, *example = made
    return model, example[0] if example else None, example[1] if len(example) > 1 else None


def _model_from(option: str):
    return demo_model() if option == "demo" else _load_factory(option)


def run_inspect(args) -> int:
    model, example_args, example_kwargs = _model_from(args.model)
    targets = args.targets[0] if len(args.targets) == 1 and not args.targets[0].isidentifier() else args.targets
    spec = LoraSpec(targets=targets, rank=args.rank, alpha=args.alpha, exclude=args.exclude, layers=args.layers)
    gm = lora_fx.capture(model, example_args, example_kwargs)
    found = match(gm, spec, state_of(gm))
    rows = _site_rows(found, spec) if not found.problems else []
    print(f"{type(model).__name__}: {spec}\n")
    if rows:
        _table(["site", "out x in", "op", "rank", "LoRA params"], rows)
        print(f"\n{len(rows)} sites, {sum(r[-1] for r in rows):,} LoRA parameters; {len(found.skipped)} modules "
              f"not adapted" + ("" if args.show_skipped else " (--show-skipped lists them)"))
    if args.show_skipped:
        _table(["module", "not adapted because"], [[s.fqn, s.reason] for s in found.skipped])
    found.raise_problems()
    return 0


def run_merge(args) -> int:
    from safetensors.torch import save_file

    model, example_args, example_kwargs = _model_from(args.model)
    gm = lora_fx.load_adapter(lora_fx.capture(model, example_args, example_kwargs), args.adapter)
    merged = lora_fx.merge(gm, progress=True)
    tensors, seen = {}, set()
    for name, tensor in merged.state_dict().items():
        shared = tensor.untyped_storage().data_ptr() in seen        # tied weights: safetensors wants copies
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[name] = (tensor.clone() if shared else tensor).contiguous()
    save_file(tensors, args.out, metadata={"format": "pt", "lora_fx_merged_from": str(args.adapter)})
    print(f"merged {len(state_of(gm).sites['default'])} sites into {len(tensors)} tensors -> {args.out}")
    return 0


def run_convert(args) -> int:
    from safetensors.torch import save_file

    from lora_fx.exporters.peft_dir import PICKLE_FILE, WEIGHTS_FILE

    directory = Path(args.directory)
    source = directory / PICKLE_FILE
    if not source.exists():
        raise ValueError(f"{source} does not exist")
    try:
        tensors = torch.load(source, map_location="cpu", weights_only=True)   # refuses anything but tensors
    except Exception as err:
        raise ValueError(f"{source} is not a plain tensor checkpoint, refusing to load it: "
                         f"{str(err).splitlines()[0]}") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError(f"{source} does not hold a dict of tensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    print(f"wrote {directory / WEIGHTS_FILE} ({len(tensors)} tensors)")
    return 0


def run_export(args) -> int:
    model, example_args, example_kwargs = _model_from(args.model)
    print("capturing ...", flush=True)
    gm = lora_fx.capture(model, example_args, example_kwargs)
    names = [Path(directory).resolve().name for directory in args.adapter]
    for name, directory in zip(names, args.adapter):
        print(f"loading adapter {name!r} from {directory} ...", flush=True)
        lora_fx.load_adapter(gm, directory, adapter=name)
    gm.eval()
    if args.unmerged and names:
        lora_fx.set_active(gm, names[0])
    print(f"exporting {'unmerged' if args.unmerged else 'merged'} ONNX"
          f"{'' if args.no_verify else ' and checking it in onnxruntime'} ...", flush=True)
    out = lora_fx.export_onnx(gm, args.out, merged=not args.unmerged, verify=not args.no_verify)
    print(f"wrote {out}")
    if args.unmerged:
        for name in names:
            adapter_file = lora_fx.export_onnx_adapter(gm, out.with_name(f"{out.stem}.{name}.onnx_adapter"), name)
            print(f"wrote {adapter_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
