"""Loading quantized checkpoints and the QuantLinear modules that compute from packed weights."""

from .loader import load_quantized
from .qlinear import QuantLinear

__all__ = ["QuantLinear", "load_quantized"]
