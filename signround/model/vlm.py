"""Vision-language models: which class builds them, where their language model is, what stays exact.

An image-text-to-text checkpoint (LLaVA, Qwen2-VL / Qwen2.5-VL, Gemma 3, ...) holds a vision tower
and a projector beside a language model. transformers 5 builds them all the same way: the top-level
``...ForConditionalGeneration`` holds ``model`` (vision tower, projector, ``language_model``) and
``lm_head``, and ``get_decoder()`` returns the language model. signround quantizes the language
model's blocks, calibrated on text; the vision tower and projector are kept byte for byte unless
``quant_nontext_module`` asks for them too (then their Linear layers are rounded without data:
text-only calibration never reaches them).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ..errors import ConfigError

logger = logging.getLogger(__name__)

# Files of a VLM's processor that a tokenizer's save_pretrained does not write; copied from the
# source checkpoint so that AutoProcessor loads the quantized model as it loads the original.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja")


def _image_text_types() -> dict[str, str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return dict(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def is_multimodal(config: Any) -> bool:
    """An image-text-to-text architecture: a vision config beside the text one, and a model type
    transformers builds with ``AutoModelForImageTextToText``."""
    return getattr(config, "vision_config", None) is not None and getattr(config, "model_type", None) in _image_text_types()


def auto_class(config: Any, mllm: bool = False):
    """The transformers Auto class that builds ``config``: image-text-to-text for VLMs (or when
    ``mllm`` forces it), causal LM otherwise."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if is_multimodal(config):
        return AutoModelForImageTextToText
    if mllm:
        if getattr(config, "model_type", None) not in _image_text_types():
            raise ConfigError(
                f"--mllm: transformers has no image-text-to-text model for model type {config.model_type!r}; "
                "drop --mllm to quantize it as a language model"
            )
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def check_vlm_options(config: Any, mllm: bool, quant_nontext_module: bool) -> None:
    """``--mllm`` / ``--quant_nontext_module`` on a model they cannot apply to, named from the config alone."""
    cls = auto_class(config, mllm)
    if quant_nontext_module and cls.__name__ != "AutoModelForImageTextToText":
        raise ConfigError("quant_nontext_module: this model has no vision tower or projector (not an image-text "
                          "model); drop the option")


def text_model_name(model: nn.Module) -> str | None:
    """Module name of a VLM's language model (``model.language_model``), None for a text-only model."""
    config = getattr(model, "config", None)
    if config is None or not is_multimodal(config) or not hasattr(model, "get_decoder"):
        return None
    decoder = model.get_decoder()
    return next((n for n, m in model.named_modules() if m is decoder and n), None)


def nontext_module_names(model: nn.Module) -> list[str]:
    """The top modules that are neither the language model nor the output head (vision tower,
    projector): siblings of the language model."""
    text = text_model_name(model)
    if text is None:
        return []
    parent_name, _, own = text.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    prefix = parent_name + "." if parent_name else ""
    return [prefix + n for n, _ in parent.named_children() if n != own]


def nontext_linear_names(model: nn.Module) -> list[str]:
    """Linear layers of the vision tower and projector, in module order."""
    from .layers import QUANTIZABLE_TYPES

    out = []
    for top in nontext_module_names(model):
        for sub, mod in model.get_submodule(top).named_modules():
            if isinstance(mod, QUANTIZABLE_TYPES):
                out.append(f"{top}.{sub}" if sub else top)
    return out


def image_token_id(config: Any) -> int | None:
    """The id of the token an image's features replace (which image-text samples must keep whole)."""
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def load_processor(model_dir: str | None, trust_remote_code: bool = False) -> Any:
    """The model's processor (AutoProcessor), which image-text calibration samples are made with."""
    if model_dir is None:
        raise ConfigError("image-text calibration of an in-memory model needs its processor: pass processor=")
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ConfigError(
            f"image-text calibration needs the model's processor, and AutoProcessor could not load it from "
            f"{model_dir} ({type(e).__name__}: {str(e)[:300]}); install what it names (Qwen2-VL's video processor "
            "needs torchvision), pass processor= in the API, or calibrate on text") from e
