"""Errors lora_fx raises. Each names the field or module at fault and what would be valid.

They subclass `ValueError` (and `TypeError` where a wrong type is one of the causes), so callers may catch the
builtin they expect.
"""


class LoraSpecError(ValueError, TypeError):
    """A `LoraSpec` field is invalid. The message lists every invalid field, not only the first."""


class TargetError(ValueError):
    """The spec's targets select nothing, or select a module whose weight lora_fx cannot rewrite."""


class AdapterError(ValueError):
    """An adapter name is unknown, or already used with a different spec."""


class CaptureError(ValueError):
    """The model could not be captured as a graph. The message names the model class and a hint."""


class ExportError(ValueError):
    """A graph cannot be exported as asked (unwritable path, missing adapter, outputs that do not match)."""


class CallError(TypeError, ValueError):
    """A graph was called with inputs it was not captured with. The message names them and how to capture them."""


class CaptureWarning(UserWarning):
    """A capture worked but fixed something the user asked to keep free (a dim torch.export specialized)."""


class QuantizeError(ValueError):
    """A base cannot be quantized as asked (already quantized, a shape the format cannot block, an unknown format)."""
