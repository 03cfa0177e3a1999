"""``load_quantized``: build a model from a saved auto_round directory with QuantLinear layers."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import ModelError
from ..model.layers import QUANTIZABLE_TYPES, get_module, in_out_features, set_module
from ..model.loading import check_model_path
from ..schemes import QuantSpec
from .qlinear import QuantLinear

logger = logging.getLogger(__name__)


def _layer_specs(model: nn.Module, qc: dict[str, Any]) -> dict[str, QuantSpec]:
    """Per-layer specs from ``block_name_to_quantize`` + global settings + ``extra_config``."""
    default = QuantSpec(
        bits=int(qc["bits"]), group_size=int(qc["group_size"]), sym=bool(qc.get("sym", True)),
        data_type=qc.get("data_type", "int"),
    )
    blocks = qc.get("block_name_to_quantize") or qc.get("to_quant_block_names") or ""
    prefixes = [b.strip() for b in (blocks.split(",") if isinstance(blocks, str) else blocks) if b.strip()]
    extra: dict[str, dict] = qc.get("extra_config") or {}
    specs: dict[str, QuantSpec] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, QUANTIZABLE_TYPES):
            continue
        in_block = any(name == p or name.startswith(p + ".") for p in prefixes)
        override = extra.get(name)
        if override is None:
            override = next(
                (v for k, v in extra.items() if k not in specs and _regex_match(k, name)), None
            )
        if not in_block and override is None:
            continue
        spec = default.with_overrides(**{k: v for k, v in (override or {}).items() if k in ("bits", "group_size", "sym")})
        if spec.quantized:
            specs[name] = spec
    return specs


def _regex_match(key: str, name: str) -> bool:
    try:
        return re.fullmatch(key, name) is not None
    except re.error:
        return False


def _read_config(path: Path) -> dict[str, Any]:
    cfg = json.loads((path / "config.json").read_text())
    qc = cfg.get("quantization_config")
    if not qc:
        raise ModelError(
            f"{path} has no quantization_config; it is a full-precision model: load it with "
            "transformers.AutoModelForCausalLM.from_pretrained"
        )
    method = str(qc.get("quant_method", "")).replace("_", "-")
    if method != "auto-round":
        raise ModelError(f"{path}: quant_method {qc.get('quant_method')!r} is not supported yet; signround loads auto-round checkpoints")
    packing = qc.get("packing_format", "auto_round:auto_gptq")
    if packing not in ("auto_round", "auto_round:auto_gptq", "auto_round:gptq", "auto_round:auto_awq"):
        raise ModelError(f"{path}: packing_format {packing!r} is not supported")
    if qc.get("data_type", "int") != "int":
        raise ModelError(f"{path}: data_type {qc.get('data_type')!r} is not supported yet")
    return qc


BACKENDS = ("torch", "dequant_once")


def load_quantized(
    path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, backend: str = "torch"
) -> nn.Module:
    """Load a quantized auto_round checkpoint from a local directory; no network, no upstream package.

    Quantized layers become :class:`QuantLinear` modules holding the packed tensors. ``backend``:
    ``torch`` unpacks on every call (packed weights stay resident), ``dequant_once`` unpacks at the
    first call and keeps float weights (fastest on CPU, fp-sized memory).
    """
    if backend not in BACKENDS:
        raise ModelError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    p = check_model_path(path)
    qc = _read_config(p)
    packing = qc.get("packing_format", "auto_round:auto_gptq").replace("auto_round:gptq", "auto_round:auto_gptq")
    config = AutoConfig.from_pretrained(str(p))
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    specs = _layer_specs(model, qc)
    for name, spec in specs.items():
        mod = get_module(model, name)
        in_f, out_f = in_out_features(mod)
        set_module(
            model, name,
            QuantLinear(in_f, out_f, spec.bits, spec.group_size, packing, bias=mod.bias is not None, dtype=dtype, device="cpu"),
        )

    expected = set(model.state_dict().keys())
    loaded: set[str] = set()
    for shard in sorted(p.glob("*.safetensors")):
        sd = load_file(str(shard))
        unknown = set(sd) - expected
        if unknown:
            raise ModelError(f"{shard.name} holds tensors this model has no place for: {sorted(unknown)[:5]}")
        # assign=True keeps the file's dtype; float tensors (except fp16 scales) follow the requested dtype
        sd = {k: v.to(dtype) if v.is_floating_point() and not k.endswith(".scales") else v for k, v in sd.items()}
        model.load_state_dict(sd, strict=False, assign=True)
        loaded |= set(sd)
    model.tie_weights()
    missing = [n for n, t in model.state_dict().items() if t.is_meta]
    if missing:
        raise ModelError(f"{p} lacks tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}; the checkpoint is incomplete")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.backend = backend
    logger.info("loaded %d quantized layers from %s (%s, backend %s)", len(specs), p, packing, backend)
    model.config.quantization_config = qc
    return model.to(device).eval()
