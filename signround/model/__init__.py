"""Model loading, block discovery and weight access."""

from .layers import (
    QUANTIZABLE_TYPES,
    find_block_names,
    get_module,
    get_weight,
    lm_head_name,
    quantizable_layer_names,
    set_module,
    set_weight,
)
from .loading import load_model_and_tokenizer

__all__ = [
    "QUANTIZABLE_TYPES",
    "find_block_names",
    "get_module",
    "get_weight",
    "lm_head_name",
    "load_model_and_tokenizer",
    "quantizable_layer_names",
    "set_module",
    "set_weight",
]
