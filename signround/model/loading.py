"""Loading a model and tokenizer from a directory or an in-memory module, with clear errors."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError

logger = logging.getLogger(__name__)

_DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None) -> Any:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or "auto"
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def check_model_path(path: str) -> Path:
    """A local model directory must exist and hold config.json and safetensors weights."""
    p = Path(path).expanduser()
    if not p.exists():
        if "/" in path and not path.startswith((".", "/", "~")) and path.count("/") == 1:
            raise ModelError(
                f"model {path!r} is not a local directory and looks like a Hugging Face Hub id; "
                "this machine may have no network: download it first and pass the local directory"
            )
        raise ModelError(f"model path {path!r} does not exist; pass a directory with config.json and *.safetensors")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ModelError(f"{path!r} is not a model directory (no config.json); pass the directory that save_pretrained wrote")
    if not any(p.glob("*.safetensors")):
        raise ModelError(
            f"{path!r} has no *.safetensors weights; signround loads safetensors only (no pickle). "
            "Convert the checkpoint with save_pretrained(..., safe_serialization=True)"
        )
    return p


def load_model_and_tokenizer(
    model: str | nn.Module,
    tokenizer: Any = None,
    device_map: str | dict | None = None,
    dtype: str | torch.dtype | None = "auto",
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Any, str | None]:
    """Return (model, tokenizer, source directory or None)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(model, nn.Module):
        src = getattr(getattr(model, "config", None), "_name_or_path", None)
        return model, tokenizer, src if src and os.path.isdir(src) else None
    if not isinstance(model, (str, os.PathLike)):
        raise ModelError(f"model must be a path or a torch module, got {type(model).__name__}")
    path = check_model_path(str(model))
    kwargs: dict[str, Any] = {"dtype": parse_dtype(dtype), "trust_remote_code": trust_remote_code,
                              "use_safetensors": True}
    if device_map not in (None, "cpu"):
        kwargs["device_map"] = device_map
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelError(f"{path} needs custom code; pass --trust_remote_code if you trust its author") from e
        raise ModelError(f"transformers could not load {path}: {e}") from e
    loaded.eval()
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except Exception as e:  # a model without tokenizer files is still quantizable
            logger.warning("no tokenizer loaded from %s (%s); it will not be saved with the model", path, e)
            tokenizer = None
    return loaded, tokenizer, str(path)
