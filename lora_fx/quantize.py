"""Quantized base weights: the formats lora_fx reads frozen weights in.

Made by `lora_fx.quantize_base`, from torchao:

    nf4    QLoRA's 4-bit NormalFloat (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314): blocks of 64 values
           with one absmax scale each, and the scales double-quantized to int8 in blocks of 256
           (`torchao.quantization.to_nf4`, torchtune's QLoRA format), so a weight's element count must divide by
           64·256. About 0.52 bytes per weight.
    int8   weight-only int8, one symmetric scale per output row (`torchao.quantization.Int8Tensor.from_hp` with
           `PerRow()`, what `Int8WeightOnlyConfig` does to a linear). About 1 byte per weight.

Found in models loaded quantized by transformers (`lora_fx.capture` keeps them as they are, see
`quantized_weights`): `int8` from `TorchAoConfig(Int8WeightOnlyConfig())`, and from bitsandbytes

    bnb-nf4, bnb-fp4   `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=...)`: bitsandbytes' `Params4bit`,
           two 4-bit codes a byte, one absmax per block (itself 8-bit quantized with `bnb_4bit_use_double_quant`),
           the shape and dtype in its quant state. Its linear reads run bitsandbytes' own `matmul_4bit`, as
           `Linear4bit` does (the same kernel and numbers as the model and PEFT on it).

A quantized weight stays the library's tensor, kept as a frozen `nn.Parameter` under the weight's own name. A torchao
tensor has the weight's shape and dtype; a bitsandbytes one is packed, so lora_fx looks at every quantized weight
through `stand_in` (its logical shape, compute dtype and device). Graphs never hand it to an op that may not know
it: every read goes through `dequantize`, or the format's own linear (see `lora_fx.passes.dequantize_reads`) —
`aten.linear` on a raw NF4 tensor gives wrong numbers on CPU.

torchao and bitsandbytes are optional (`pip install "lora_fx[quant]"`, bitsandbytes for models loaded with it) and
imported only where a weight of theirs is made or read.
"""

from __future__ import annotations

import copy as copying
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
    quantize: Callable[..., torch.Tensor]           # ((rows, columns) dense, like=None) -> the library's tensor,
                                                    #   with the settings of the tensor `like` where given
    dequantize: Callable[[torch.Tensor], torch.Tensor]          # the library's tensor -> dense, its dtype
    tensor_type: Callable[[], type]                             # the library's tensor class (imports the library)
    shape_problem: Callable[[tuple[int, ...]], str | None]      # why a weight of that shape cannot be stored
    library: str = "torchao"                                    # the module to install and import
    linear: Callable | None = None          # (x, weight, bias) -> y: the library's own x·Wᵀ + b, where it has one
    weight_only: Callable[[torch.Tensor], bool] = lambda tensor: True   # False: its linear quantizes activations
                                                                        #   too, which a dequantized read would not


def _nf4_quantize(weight: torch.Tensor, like=None) -> torch.Tensor:
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


def _int8_quantize(weight: torch.Tensor, like=None) -> torch.Tensor:
    from torchao.quantization import Int8Tensor, PerRow
    return Int8Tensor.from_hp(weight, granularity=PerRow())


def _int8_type() -> type:
    from torchao.quantization import Int8Tensor
    return Int8Tensor


def _bnb_quantizer(quant_type: str):
    def quantize(weight: torch.Tensor, like=None) -> torch.Tensor:
        """bitsandbytes' 4-bit weight of `weight`: with `like`'s block size and double quantization, else
        `BitsAndBytesConfig`'s defaults (blocks of 64, no double quantization)."""
        from bitsandbytes.nn import Params4bit
        settings = dict(blocksize=like.blocksize, compress_statistics=like.compress_statistics,
                        quant_storage=like.quant_storage) if like is not None else dict(
                        blocksize=64, compress_statistics=False)
        packed = Params4bit(weight.detach().contiguous().cpu(), requires_grad=False, quant_type=quant_type,
                            **settings)
        return packed.to(weight.device)                         # bitsandbytes quantizes when it places the weight
    return quantize


def _bnb_dequantize(weight: torch.Tensor) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_4bit
    return dequantize_4bit(weight.data, weight.quant_state)


def _bnb_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    import bitsandbytes
    return bitsandbytes.matmul_4bit(x, weight, bias=bias, quant_state=weight.quant_state)


def _bnb_type() -> type:
    from bitsandbytes.nn import Params4bit
    return Params4bit


NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256
FORMATS: dict[str, QuantFormat] = {
    "nf4": QuantFormat("nf4", "4-bit NormalFloat, double-quantized scales (QLoRA)", _nf4_quantize,
                       lambda weight: weight.get_original_weight(), _nf4_type, _nf4_shape_problem),
    "int8": QuantFormat("int8", "int8 weight-only, one scale per output row", _int8_quantize,
                        lambda weight: weight.dequantize(), _int8_type, lambda shape: None,
                        weight_only=lambda weight: getattr(weight, "act_quant_kwargs", None) is None),
    **{f"bnb-{kind}": QuantFormat(f"bnb-{kind}", f"bitsandbytes 4-bit {kind} (Params4bit)", _bnb_quantizer(kind),
                                  _bnb_dequantize, _bnb_type, lambda shape: None, "bitsandbytes", _bnb_linear)
       for kind in ("nf4", "fp4")},
}


def require_library(fmt: QuantFormat) -> None:
    """Import the library of `fmt` (quietly), or raise an ImportError that names what to install."""
    try:
        __import__(fmt.library)
    except ImportError as err:
        install = EXTRA if fmt.library == "torchao" else f"pip install {fmt.library}"
        raise ImportError(f"{fmt.name} weights need {fmt.library}, which is not installed: {install}") from err


def format_of(name) -> QuantFormat:
    if name not in FORMATS:
        raise QuantizeError(f"unknown quantization format {name!r}; supported: {sorted(FORMATS)}")
    return FORMATS[name]


def format_name(tensor) -> str | None:
    """The name of the format `tensor` is stored in, or None (never imports a library: a tensor of one that is not
    imported is none of its formats)."""
    for fmt in FORMATS.values():
        if (sys.modules.get(fmt.library) is not None and isinstance(tensor, fmt.tensor_type())
                and fmt.weight_only(tensor)):
            state = getattr(tensor, "quant_state", None)
            return fmt.name if state is None else f"bnb-{state.quant_type}"
    return None


def is_quantized(tensor) -> bool:
    """Whether `tensor` is one of the formats' tensors."""
    return format_name(tensor) is not None


def check_quantized(weight: torch.Tensor, fmt: str, name: str, compute_dtypes=None) -> None:
    """Raise unless the base weight `name` is still a `fmt` tensor, of one of `compute_dtypes` when given (a dtype
    conversion of the model converts nf4 tensors but leaves int8 ones in their dtype)."""
    if format_name(weight) != fmt:
        problem = f"should be a {fmt} tensor but is a {type(weight).__name__} {weight.dtype}"
    elif compute_dtypes and stand_in(weight).dtype not in compute_dtypes:
        problem = (f"is a {fmt} tensor of dtype {stand_in(weight).dtype}, but the graph's other weights are "
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
    fmt = format_name(tensor)
    return tensor.detach() if fmt is None else FORMATS[fmt].dequantize(tensor)


def frozen(param: torch.Tensor, copy: bool = False) -> torch.nn.Parameter:
    """A new frozen Parameter sharing `param`'s storage (its own copy with `copy`), so that flags set on one never
    reach the other; a bitsandbytes weight keeps its quant state."""
    if format_name(param) in ("bnb-nf4", "bnb-fp4"):
        state = copying.deepcopy(param.quant_state) if copy else param.quant_state
        return type(param)(param.data.clone() if copy else param.data, requires_grad=False, quant_state=state,
                           blocksize=param.blocksize, compress_statistics=param.compress_statistics,
                           quant_type=param.quant_type, quant_storage=param.quant_storage, bnb_quantized=True)
    return torch.nn.Parameter(param.detach().clone() if copy else param.detach(), requires_grad=False)


def as_seen(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as graphs see it: a quantized weight's `stand_in` (its logical shape, compute dtype and device),
    any other tensor itself."""
    return stand_in(tensor) if is_quantized(tensor) else tensor


def logical_numel(tensor: torch.Tensor) -> int:
    """How many weights `tensor` holds (a bitsandbytes 4-bit weight packs two in a byte)."""
    return stand_in(tensor).numel() if is_quantized(tensor) else tensor.numel()


def quantized_weights(model: torch.nn.Module) -> dict[str, str]:
    """{parameter name: format} of the weights `model` holds quantized (a model transformers loaded quantized).
    Raises naming any quantized weight whose format lora_fx does not read."""
    found, unknown = {}, []
    for name, param in model.named_parameters():
        fmt = format_name(param)
        if fmt is not None:
            found[name] = fmt
        elif type(param.data).__module__.split(".")[0] in ("torchao", "bitsandbytes") or (
                type(param).__module__.split(".")[0] == "bitsandbytes"):
            unknown.append(f"{name!r} ({type(param.data).__name__}"
                           + (", activations quantized too" if getattr(param, "act_quant_kwargs", None) else "")
                           + ")")
    if unknown:
        raise QuantizeError(f"{type(model).__name__} holds quantized weights in a format lora_fx does not read: "
                            f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}; it reads weight-only "
                            f"{', '.join(FORMATS)} (torchao's Int8WeightOnlyConfig, bitsandbytes' load_in_4bit)")
    return found


class QuantizedLinear(torch.nn.Linear):
    """What capture traces in place of bitsandbytes' `Linear4bit` (lora_fx's copy of the model only): its forward
    with the weight read by a plain linear, which the graph then runs with `matmul_4bit` (see
    `lora_fx.passes.dequantize_reads`): the input cast to the compute dtype, the output cast back to the input's."""

    def __init__(self, module: torch.nn.Linear):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = module.in_features, module.out_features
        self.compute_dtype = module.compute_dtype
        self.weight, self.bias = module.weight, module.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.weight, bias).to(dtype)


def plain_quantized_linears(model: torch.nn.Module) -> None:
    """Swap every bitsandbytes `Linear4bit` of `model` (lora_fx's own copy) for a `QuantizedLinear` with the same
    parameters."""
    for name, module in list(model.named_modules()):
        if type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes"):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, QuantizedLinear(module))


def stand_in(tensor: torch.Tensor) -> torch.nn.Parameter:
    """What a quantized weight looks like to capture: its logical shape, compute dtype and device, no storage
    (stride 0). A bitsandbytes weight's quant state holds its shape and dtype; a torchao tensor reports them."""
    state = getattr(tensor, "quant_state", None)
    shape, dtype = (state.shape, state.dtype) if state is not None else (tensor.shape, tensor.dtype)
    zeros = torch.zeros((), dtype=dtype, device=tensor.device).expand(shape)
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
