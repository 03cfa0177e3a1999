"""signround: SignRound low-bit weight quantization for Hugging Face causal language models."""

from .api import AutoRound
from .autoscheme import AutoScheme
from .errors import ConfigError, ExportError, ModelError, SignRoundError
from .inference import QuantLinear, load_quantized
from .schemes import PRESETS, QuantSpec

__version__ = "0.1.0"

__all__ = [
    "AutoRound",
    "AutoScheme",
    "ConfigError",
    "ExportError",
    "ModelError",
    "PRESETS",
    "QuantLinear",
    "QuantSpec",
    "SignRoundError",
    "load_quantized",
]
