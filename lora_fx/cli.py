"""`lora-fx`: the command line.

    lora-fx demo [--save DIR]          train an all-linear adapter on a small Llama, loss and sites shown
    lora-fx inspect [--model M] [...]  the sites a spec would adapt, without changing anything
    lora-fx merge --adapter DIR --out F [--model M]   merged weights as a safetensors state dict
    lora-fx convert DIR                adapter_model.bin -> adapter_model.safetensors (weights-only unpickling)
    lora-fx export --adapter DIR [...] --out m.onnx [--unmerged]   ONNX (+ onnxruntime adapter files)

Options are checked as they are parsed; any error is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import lora_fx
from lora_fx.demo import counting_batch, demo_model, next_token_loss
from lora_fx.match import match
from lora_fx.moe_all_linear import resolved
from lora_fx.sites import kind_of
from lora_fx.spec import LoraSpec
from lora_fx.state import state_of


MODEL_HELP = "'demo', or 'module:factory' returning a model, or (model, example_args[, kwargs])"


def positive_int(text: str) -> int:
    return _checked(int, text, lambda value: value > 0, "a positive int")


def non_negative_int(text: str) -> int:
    return _checked(int, text, lambda value: value >= 0, "an int >= 0")


def positive_float(text: str) -> float:
    return _checked(float, text, lambda value: math.isfinite(value) and value > 0, "a positive finite number")


def _checked(kind, text: str, valid, wanted: str):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
    return value


def existing_directory(text: str) -> str:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} does not exist or is not a directory")
    return text


def writable_file(text: str) -> str:
    """A file path whose directory exists and is writable (checked before any slow work starts)."""
    target = Path(text)
    if target.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file")
    if not target.parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: directory {str(target.parent)!r} does not exist")
    if not os.access(target.parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: directory {str(target.parent)!r} is not writable")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-fx", description="LoRA as a graph-rewriting compiler pass.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lora-fx {lora_fx.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = _command(commands, "demo", "train an all-linear adapter on a small Llama built from a config")
    demo.add_argument("--steps", type=positive_int, default=60, help="training steps")
    demo.add_argument("--rank", type=positive_int, default=8, help="LoRA rank (alpha is 2 * rank)")
    demo.add_argument("--lr", type=positive_float, default=1e-2, help="AdamW learning rate")
    demo.add_argument("--seed", type=int, default=0, help="seed of the model's init and of the batches")
    demo.add_argument("--save", metavar="DIR", help="save the trained adapter there (PEFT format)")
    inspect = _command(commands, "inspect", "print the sites a spec would adapt, changing nothing")
    inspect.add_argument("--model", default="demo", help=MODEL_HELP)
    inspect.add_argument("--targets", nargs="+", default=["all-linear"],
                         help="'all-linear', one regex, or several module names")
    inspect.add_argument("--rank", type=positive_int, default=8, help="LoRA rank")
    inspect.add_argument("--alpha", type=positive_float, default=16.0, help="LoRA alpha (scale = alpha / rank)")
    inspect.add_argument("--exclude", nargs="+", help="module names (or one regex) never to adapt")
    inspect.add_argument("--layers", type=non_negative_int, nargs="+", help="adapt only these layer indices")
    inspect.add_argument("--show-skipped", action="store_true", help="list every module not adapted, with why")
    merge = _command(commands, "merge", "fold an adapter directory into a model's weights")
    merge.add_argument("--model", default="demo", help=MODEL_HELP)
    merge.add_argument("--adapter", required=True, type=existing_directory, metavar="DIR",
                       help="PEFT adapter directory")
    merge.add_argument("--out", required=True, type=writable_file, metavar="FILE",
                       help="merged state dict (.safetensors) to write")
    convert = _command(commands, "convert", "convert a pickled adapter_model.bin to safetensors")
    convert.add_argument("directory", metavar="DIR", help="adapter directory holding adapter_model.bin")
    export = _command(commands, "export", "export a model with adapters to ONNX")
    export.add_argument("--model", default="demo", help=MODEL_HELP)
    export.add_argument("--adapter", action="append", default=[], type=existing_directory, metavar="DIR",
                        help="PEFT adapter directory; repeat for several (named after their directories)")
    export.add_argument("--out", required=True, type=writable_file, metavar="FILE", help="the .onnx file to write")
    export.add_argument("--unmerged", action="store_true", help="keep LoRA weights as swappable inputs, and write "
                        "an onnxruntime adapter file per adapter next to the model")
    export.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check of the written file")
    return parser


def _command(commands, name: str, summary: str) -> argparse.ArgumentParser:
    return commands.add_parser(name, help=summary, description=summary,
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def main(argv: list[str] | None = None) -> int:
    """Run one command; any error is one line on stderr and exit code 2 (130 on Ctrl-C)."""
    args = build_parser().parse_args(argv)
    run = {"demo": run_demo, "inspect": run_inspect, "merge": run_merge, "convert": run_convert,
           "export": run_export}[args.command]
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        ours = type(err).__module__.partition(".")[0] == "lora_fx"     # lora_fx's messages are written for users
        message = _one_line(err) if ours else _first_line(err)
        print(f"lora-fx {args.command}: {message}", file=sys.stderr)
        return 2


def _one_line(err: Exception) -> str:
    """A header line with "  - problem" lines below it, as one line: "header: problem; problem"."""
    head, *rest = [line.strip().removeprefix("- ") for line in str(err).splitlines() if line.strip()] or [
        type(err).__name__]
    return head + (" " if head.endswith(":") else "; ") + "; ".join(rest) if rest else head


def _first_line(err: Exception) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(err).__name__


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
        rank = spec.rank_for(site.key)
        parameters = sum(math.prod(shape) for shape in kind_of(site).factor_shapes(site, rank))
        rows.append([site.key, site.kind, f"{site.out_features}x{site.in_features}", site.op, rank, parameters])
    return rows


SITE_COLUMNS = ["site", "kind", "out x in", "op", "rank", "LoRA params"]


def run_demo(args) -> int:
    from tqdm import tqdm

    model, example_args, example_kwargs = demo_model(seed=args.seed)
    spec = LoraSpec(targets="all-linear", rank=args.rank, alpha=2.0 * args.rank)
    started = time.perf_counter()
    gm = lora_fx.capture(model, example_args, example_kwargs)
    rows = _site_rows(match(gm, spec, state_of(gm)), spec)
    lora_fx.apply(gm, spec)
    print(f"captured and adapted {type(model).__name__} in {time.perf_counter() - started:.1f}s\n")
    _table(SITE_COLUMNS, rows)
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
    _generate_side_by_side(gm, vocab)
    if args.save:
        lora_fx.save_adapter(gm, args.save)
        print(f"adapter saved to {args.save} (loads with lora_fx.load_adapter or peft.PeftModel.from_pretrained)")
    return 0


def _generate_side_by_side(gm, vocab: int, prompts: int = 3, length: int = 4, new_tokens: int = 8) -> None:
    """Greedy continuations of a few counting prompts, by the base model and with the trained adapter."""
    prompt = counting_batch(torch.Generator().manual_seed(20_000), vocab, batch=prompts, seq=length)
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)   # no early stop
    adapted = gm.generate(prompt, **settings)
    with lora_fx.disabled(gm):
        base = gm.generate(prompt, **settings)
    show = lambda row: " ".join(str(int(token)) for token in row)
    print(f"\ngenerated ({new_tokens} new tokens, greedy, KV cache):")
    _table(["prompt", "base model", "with adapter"],
           [[show(p), show(b[length:]), show(a[length:])] for p, b, a in zip(prompt, base, adapted)])


def _load_factory(path: str):
    """`module:factory` -> (model, example_args, example_kwargs); the module may live in the working directory."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--model must be 'demo' or 'module:factory', got {path!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not (module_name + ".").startswith(err.name + "."):
            raise                                   # a module that the user's module imports is missing
        raise ValueError(f"--model {path!r}: no module named {err.name!r} in the working directory or on "
                         f"sys.path") from None
    if not hasattr(module, attr):
        raise ValueError(f"--model {path!r}: module {module_name!r} has no attribute {attr!r}")
    factory = getattr(module, attr)
    if not callable(factory):
        raise ValueError(f"--model {path!r}: {module_name}.{attr} is not callable")
    made = factory()
    if isinstance(made, nn.Module):
        return made, None, None
    if not (isinstance(made, (tuple, list)) and 1 <= len(made) <= 3 and isinstance(made[0], nn.Module)):
        raise ValueError(f"--model {path!r}: {module_name}.{attr}() must return a model or (model, example_args"
                         f"[, kwargs]), got {type(made).__name__}")
    model, *example = made
    return model, example[0] if example else None, example[1] if len(example) > 1 else None


def _model_from(option: str):
    return demo_model() if option == "demo" else _load_factory(option)


def run_inspect(args) -> int:
    model, example_args, example_kwargs = _model_from(args.model)
    targets = args.targets[0] if len(args.targets) == 1 and not args.targets[0].isidentifier() else args.targets
    spec = LoraSpec(targets=targets, rank=args.rank, alpha=args.alpha, exclude=args.exclude, layers=args.layers)
    gm = lora_fx.capture(model, example_args, example_kwargs)
    spec = resolved(gm, spec)
    found = match(gm, spec, state_of(gm))
    rows = _site_rows(found, spec) if not found.problems else []
    print(f"{type(model).__name__}: {spec}\n")
    if rows:
        _table(SITE_COLUMNS, rows)
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
        with warnings.catch_warnings():         # it loads or it refuses; either way the warning adds nothing
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            tensors = torch.load(source, map_location="cpu", weights_only=True)   # refuses anything but tensors
    except Exception as err:
        raise ValueError(f"{source} is not a plain tensor checkpoint, refusing to load it: "
                         f"{_refusal_reason(err)}") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError(f"{source} does not hold a dict of tensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    print(f"wrote {directory / WEIGHTS_FILE} ({len(tensors)} tensors)")
    return 0


def _refusal_reason(err: Exception) -> str:
    """The why of torch's weights-only refusal: its first lines are advice about `torch.load` itself."""
    _, marker, reason = str(err).partition("WeightsUnpickler error:")
    if not marker:
        return f"{type(err).__name__}: {_first_line(err)}"
    lines = reason.strip().splitlines()
    return lines[0].split(". ")[0] if lines else _first_line(err)


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
