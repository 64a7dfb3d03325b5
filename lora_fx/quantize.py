"""Quantized base weights: the formats `lora_fx.quantize_base` stores frozen weights in, all from torchao.

    nf4    QLoRA's 4-bit NormalFloat (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314): blocks of 64 values
           with one absmax scale each, and the scales double-quantized to int8 in blocks of 256
           (`torchao.quantization.to_nf4`, torchtune's QLoRA format), so a weight's element count must divide by
           64·256. About 0.52 bytes per weight.
    int8   weight-only int8, one symmetric scale per output row (`torchao.quantization.Int8Tensor.from_hp` with
           `PerRow()`, what `Int8WeightOnlyConfig` does to a linear). About 1 byte per weight.

A quantized weight is the library's tensor subclass, kept as a frozen `nn.Parameter` under the weight's own name,
with the original shape and dtype (the compute dtype). Graphs never hand it to an op: every read goes through
`dequantize` (see `lora_fx.passes.quantize_base`), because ops do not all understand the subclass — `aten.linear`
on a raw NF4 tensor gives wrong numbers on CPU.

torchao is optional (`pip install "lora_fx[quant]"`) and imported only when a quantized weight is made.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from lora_fx.errors import QuantizeError

EXTRA = 'pip install "lora_fx[quant]"'


@dataclass(frozen=True)
class QuantFormat:
    """One storage format: how to make, check and read back a quantized weight."""

    name: str
    description: str
    quantize: Callable[[torch.Tensor], torch.Tensor]            # (rows, columns) dense -> the library's tensor
    dequantize: Callable[[torch.Tensor], torch.Tensor]          # the library's tensor -> dense, its dtype
    tensor_type: Callable[[], type]                             # the library's tensor class (imports torchao)
    shape_problem: Callable[[tuple[int, ...]], str | None]      # why a weight of that shape cannot be stored


def _nf4_quantize(weight: torch.Tensor) -> torch.Tensor:
    from torchao.quantization import to_nf4
    return to_nf4(weight.contiguous(), block_size=NF4_BLOCK, scaler_block_size=NF4_SCALER_BLOCK)


def _nf4_type() -> type:
    from torchao.quantization import NF4Tensor
    return NF4Tensor


def _nf4_shape_problem(shape) -> str | None:
    numel = shape[0] * shape[1]
    if numel % (NF4_BLOCK * NF4_SCALER_BLOCK):
        return (f"nf4 stores blocks of {NF4_BLOCK} values with their scales double-quantized in blocks of "
                f"{NF4_SCALER_BLOCK}, so the element count must divide by {NF4_BLOCK * NF4_SCALER_BLOCK}; "
                f"{shape[0]}x{shape[1]} = {numel} does not (use 'int8', or leave this module out)")
    return None


def _int8_quantize(weight: torch.Tensor) -> torch.Tensor:
    from torchao.quantization import Int8Tensor, PerRow
    return Int8Tensor.from_hp(weight, granularity=PerRow())


def _int8_type() -> type:
    from torchao.quantization import Int8Tensor
    return Int8Tensor


NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256
FORMATS: dict[str, QuantFormat] = {
    "nf4": QuantFormat("nf4", "4-bit NormalFloat, double-quantized scales (QLoRA)", _nf4_quantize,
                       lambda weight: weight.get_original_weight(), _nf4_type, _nf4_shape_problem),
    "int8": QuantFormat("int8", "int8 weight-only, one scale per output row", _int8_quantize,
                        lambda weight: weight.dequantize(), _int8_type, lambda shape: None),
}


def require_torchao() -> None:
    """Import torchao (quietly), or raise an ImportError that names the extra to install."""
    try:
        import torchao  # noqa: F401
    except ImportError as err:
        raise ImportError(f"quantized bases need torchao, which is not installed: {EXTRA}") from err


def format_of(name) -> QuantFormat:
    if name not in FORMATS:
        raise QuantizeError(f"unknown quantization format {name!r}; supported: {sorted(FORMATS)}")
    return FORMATS[name]


def is_quantized(tensor) -> bool:
    """Whether `tensor` is one of the formats' tensors (never imports torchao: without it, nothing is)."""
    if sys.modules.get("torchao") is None:          # not imported (or blocked)
        return False
    return isinstance(tensor, tuple(fmt.tensor_type() for fmt in FORMATS.values()))


def check_quantized(weight: torch.Tensor, fmt: str, name: str, compute_dtypes=None) -> None:
    """Raise unless the base weight `name` is still a `fmt` tensor, of one of `compute_dtypes` when given (a dtype
    conversion of the model converts nf4 tensors but leaves int8 ones in their dtype)."""
    if not isinstance(weight, FORMATS[fmt].tensor_type()):
        problem = f"should be a {fmt} tensor but is a {type(weight).__name__} {weight.dtype}"
    elif compute_dtypes and weight.dtype not in compute_dtypes:
        problem = (f"is a {fmt} tensor of dtype {weight.dtype}, but the graph's other weights are "
                   f"{sorted(str(d) for d in compute_dtypes)}")
    else:
        return
    raise QuantizeError(f"base weight {name!r} {problem}; quantized graphs keep their compute dtype (quantize a graph "
                        f"captured in the dtype you want instead of converting a quantized one)")


def dequantize(weight: torch.Tensor, fmt: str, name: str) -> torch.Tensor:
    """The dense value of the quantized base weight `name` (what graphs call before every read of it)."""
    check_quantized(weight, fmt, name)
    return FORMATS[fmt].dequantize(weight)


def dense(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` detached, dequantized if it is a quantized weight."""
    tensor = tensor.detach()
    if is_quantized(tensor):
        fmt = next(fmt for fmt in FORMATS.values() if isinstance(tensor, fmt.tensor_type()))
        return fmt.dequantize(tensor)
    return tensor


def logical_numel(tensor: torch.Tensor) -> int:
    """How many weights `tensor` holds: a bitsandbytes 4-bit weight packs two in a byte (its quant state knows the
    shape); torchao tensors report their logical shape already."""
    state = getattr(tensor, "quant_state", None)
    return state.shape.numel() if state is not None else tensor.numel()


def stand_in(tensor: torch.Tensor) -> torch.nn.Parameter:
    """What a quantized weight looks like to capture: its shape, dtype and device, no storage (stride 0)."""
    zeros = torch.zeros((), dtype=tensor.dtype, device=tensor.device).expand(tensor.shape)
    return torch.nn.Parameter(zeros, requires_grad=False)


class _KnownTorchaoNoise(logging.Filter):
    """On a machine without CUDA, importing torchao logs a warning per CUDA extension it cannot load ("Failed to
    load .../torchao/_C_mxfp8...so") and torch logs a deprecation per torchao enum it registers with pytree. Both
    are harmless there and not the user's to act on (transformers imports torchao whenever it is installed)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if record.name == "torchao":
            cuda_extension = message.startswith("Failed to load ") and "torchao/_C" in message
            return not (cuda_extension and not torch.cuda.is_available())
        if message.startswith("%s is an Enum subclass") and record.args:
            return not getattr(record.args[0], "__module__", "").startswith("torchao")
        return True


def silence_known_torchao_noise() -> None:
    noise = _KnownTorchaoNoise()
    for name in ("torchao", "torch.utils._pytree"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _KnownTorchaoNoise) for f in logger.filters):
            logger.addFilter(noise)


silence_known_torchao_noise()
