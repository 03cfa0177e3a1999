"""Loading a model and tokenizer from a directory or an in-memory module, with clear errors."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from .moe import unfuse_experts
from .source import InMemorySource, SafetensorsSource, StreamingUnsupported, WeightSource
from .vlm import auto_class

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
    from .source import checkpoint_index

    checkpoint_index(p)  # every shard's header read and its size checked: truncated downloads, missing shards
    return p


def load_model_and_tokenizer(
    model: str | nn.Module,
    tokenizer: Any = None,
    dtype: str | torch.dtype | None = "auto",
    trust_remote_code: bool = False,
    low_cpu_mem_usage: bool = False,
    mllm: bool = False,
) -> tuple[nn.Module, Any, str | None, WeightSource]:
    """Return (model, tokenizer, source directory or None, weight source)."""
    if isinstance(model, nn.Module):
        unfuse_experts(model)
        src = getattr(getattr(model, "config", None), "_name_or_path", None)
        return model, tokenizer, src if src and os.path.isdir(src) else None, InMemorySource()
    path = check_model_path(str(model))
    if tokenizer is None:
        tokenizer = load_tokenizer(path, trust_remote_code)
    loaded, source = load_model(path, dtype, trust_remote_code, low_cpu_mem_usage, mllm)
    return loaded, tokenizer, str(path), source


def load_model(path: Path, dtype: Any = "auto", trust_remote_code: bool = False,
               low_cpu_mem_usage: bool = False, mllm: bool = False) -> tuple[nn.Module, WeightSource]:
    """The model of a checked directory, and where its weights come from.

    ``low_cpu_mem_usage``: build the model on the meta device and stream its tensors from the
    safetensors shards block by block (falls back to a whole load, logged, when the checkpoint's
    names need transformers' own conversion). The model is loaded on the CPU either way: blocks
    go to the tuning devices one at a time. Vision-language models (or ``mllm``) are built as
    image-text-to-text models.
    """
    source: WeightSource = InMemorySource()
    loaded = None
    if low_cpu_mem_usage:
        loaded, source = _skeleton(path, dtype, trust_remote_code, mllm)
    if loaded is None:
        loaded = _whole(path, dtype, trust_remote_code, mllm)
        unfuse_experts(loaded)
    loaded.eval()
    return loaded, source


def load_config(model: str | nn.Module, trust_remote_code: bool = False) -> Any:
    """The config alone (no weights): what the cheap checks before loading need."""
    if isinstance(model, nn.Module):
        return model.config
    from transformers import AutoConfig

    path = check_model_path(str(model))
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelError(f"{path} needs custom code; pass --trust_remote_code if you trust its author") from e
        raise ModelError(f"transformers cannot read the config of {path}: {e}") from e


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:  # a model without tokenizer files is still quantizable
        logger.warning("no tokenizer loaded from %s (%s); it will not be saved with the model", path, e)
        return None


def _whole(path: Path, dtype: Any, trust_remote_code: bool, mllm: bool = False) -> nn.Module:
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"dtype": parse_dtype(dtype), "trust_remote_code": trust_remote_code,
                              "use_safetensors": True}
    try:  # the directory was checked already (its shard headers read once)
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        return auto_class(config, mllm).from_pretrained(str(path), **kwargs)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelError(f"{path} needs custom code; pass --trust_remote_code if you trust its author") from e
        raise ModelError(f"transformers could not load {path}: {e}") from e


def skeleton_dtype(config: Any, path: Path, dtype: Any) -> torch.dtype:
    """The dtype from_pretrained(dtype=...) would give the weights: the requested one, or for
    "auto" the config's, else the checkpoint's first floating-point tensor's."""
    want = parse_dtype(dtype)
    if want != "auto":
        return want
    cfg = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(cfg, str):
        cfg = getattr(torch, cfg, None)
    if isinstance(cfg, torch.dtype):
        return cfg
    from .source import checkpoint_index

    st = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    for _, (_, entry) in checkpoint_index(path).items():
        if entry["dtype"] in st:
            return st[entry["dtype"]]
    return torch.float32


def _skeleton(path: Path, dtype: Any, trust_remote_code: bool, mllm: bool = False) -> tuple[nn.Module | None, WeightSource]:
    """The model on the meta device with a streaming source, or (None, in-memory) when the
    checkpoint does not map one to one onto it."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        with init_empty_weights(include_buffers=False):
            model = auto_class(config, mllm).from_config(
                config, dtype=skeleton_dtype(config, path, dtype), trust_remote_code=trust_remote_code
            )
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelError(f"{path} needs custom code; pass --trust_remote_code if you trust its author") from e
        raise ModelError(f"transformers could not build the model of {path}: {e}") from e
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    unfuse_experts(model)  # on the meta device: the experts' Linear layers are read per expert
    try:
        source = SafetensorsSource(path, model)
    except StreamingUnsupported as e:
        logger.info("loading %s whole: its checkpoint does not map one to one onto the model (%s)", path, e)
        return None, InMemorySource()
    model.config._name_or_path = str(path)
    logger.info("streaming weights block by block from %s (--disable_low_cpu_mem_usage loads the whole model)", path)
    return model, source
