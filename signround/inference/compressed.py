"""Loading compressed-tensors (llm_compressor) checkpoints: ours, or llm-compressor's.

Each quantized Linear is dequantized once into an ordinary Linear (float weights in memory, the
``dequant_once`` trade-off), and layers with quantized activations get the same activation
fake-quantization the tuner used, so evaluation measures what the checkpoint computes.
Needs neither compressed-tensors nor network.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from ..export.llm_compressor import unpack_fp4
from ..export.packing import unpack_cols, unpack_rows
from ..model.layers import attach_act_quant
from ..qdq.elements import E2M1_MAX, E4M3_MAX, decode
from ..qdq.fp import E8M0_BIAS
from ..schemes import QuantSpec

logger = logging.getLogger(__name__)

SUPPORTED = ("pack-quantized", "nvfp4-pack-quantized", "mxfp4-pack-quantized", "mxfp8-quantized", "float-quantized")


def _target_matches(target: str, name: str, module: nn.Module) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target == type(module).__name__


def _spec(args: dict[str, Any], acts: dict[str, Any] | None) -> QuantSpec:
    """Our QuantSpec for compressed-tensors weight / input activation args."""
    bits, gs = int(args["num_bits"]), args.get("group_size")
    strategy = args.get("strategy")
    if args.get("type", "int") == "int":
        spec = QuantSpec(bits, -1 if strategy == "channel" else int(gs), bool(args.get("symmetric", True)))
    elif bits == 4:
        spec = QuantSpec(4, int(gs), True, "nv_fp" if strategy == "tensor_group" else "mx_fp")
    elif strategy == "group":
        spec = QuantSpec(8, int(gs), True, "mx_fp")
    else:
        spec = QuantSpec(8, -1 if strategy == "channel" else 0, True, "fp")
    if acts:
        a_strategy = acts.get("strategy")
        kind = {"tensor_group": "nv_fp", "group": "mx_fp"}.get(a_strategy, "fp")
        spec = spec.with_overrides(
            act_bits=int(acts["num_bits"]), act_data_type=kind,
            act_group_size=int(acts.get("group_size") or (-1 if a_strategy == "token" else 0)),
            act_dynamic=acts.get("dynamic") is not False,
        )
    return spec


def _dequantize(t: dict[str, torch.Tensor], spec: QuantSpec, fmt: str, shape: tuple[int, int]) -> torch.Tensor:
    out_f, in_f = shape
    g = in_f if spec.group_size <= 0 else spec.group_size
    cols = torch.arange(in_f) // g
    if fmt == "pack-quantized":
        codes = unpack_cols(t["weight_packed"], spec.bits, in_f).float()
        scale = t["weight_scale"].float().reshape(out_f, -1)
        if "weight_zero_point" in t:
            zero = unpack_rows(t["weight_zero_point"], spec.bits, out_f).float()
        else:
            zero = torch.full_like(scale, float(2 ** (spec.bits - 1)))
        return (codes - zero[:, cols]) * scale[:, cols]
    if fmt in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        vals = decode(unpack_fp4(t["weight_packed"])[:, :in_f], 4)
    else:
        vals = t["weight"].float()
    scale = t["weight_scale"]
    if fmt in ("mxfp4-pack-quantized", "mxfp8-quantized"):
        scale = torch.exp2(scale.float() - E8M0_BIAS)
    else:
        scale = scale.float()
        if "weight_global_scale" in t:
            scale = scale / t["weight_global_scale"].float()
    scale = scale.reshape(out_f, -1) if scale.numel() > 1 else scale.reshape(1, 1).expand(out_f, 1)
    return vals * scale[:, cols]


def _input_amax(t: dict[str, torch.Tensor]) -> torch.Tensor | None:
    if "input_scale" in t:
        return t["input_scale"].float().reshape(()) * E4M3_MAX
    if "input_global_scale" in t:
        return E4M3_MAX * E2M1_MAX / t["input_global_scale"].float().reshape(())
    return None


def load_compressed(model: nn.Module, qc: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path,
                    dtype: torch.dtype) -> int:
    """Fill the (meta) ``model`` from compressed-tensors ``tensors``; returns the number of quantized layers."""
    if qc.get("quantization_status", "compressed") != "compressed":
        raise ModelError(f"{path}: quantization_status {qc.get('quantization_status')!r}: only compressed checkpoints load")
    groups = qc.get("config_groups") or {}
    ignore = qc.get("ignore") or []
    count = 0
    plain: dict[str, torch.Tensor] = {}
    layer_keys: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        layer, _, leaf = k.rpartition(".")
        if leaf.startswith(("weight_", "input_")) or (leaf == "weight" and v.dtype == torch.float8_e4m3fn):
            layer_keys.setdefault(layer, {})[leaf] = v
        else:
            plain[k] = v
    modules = dict(model.named_modules())
    for layer, t in layer_keys.items():
        mod = modules.get(layer)
        if not isinstance(mod, nn.Linear):
            raise ModelError(f"{path}: {layer} holds quantized tensors but is not a Linear in this architecture")
        if any(_target_matches(i, layer, mod) for i in ignore):
            raise ModelError(f"{path}: {layer} holds quantized tensors but is in the config's ignore list")
        group = next((g for g in groups.values() if any(_target_matches(x, layer, mod) for x in g.get("targets", []))), None)
        if group is None:
            raise ModelError(f"{path}: no config group targets {layer}")
        fmt = group.get("format") or qc.get("format")
        if fmt not in SUPPORTED:
            raise ModelError(f"{path}: compressed-tensors format {fmt!r} is not supported; supported: {', '.join(SUPPORTED)}")
        spec = _spec(group["weights"], group.get("input_activations"))
        w = _dequantize(t, spec, fmt, (mod.out_features, mod.in_features))
        plain[layer + ".weight"] = w.to(dtype)
        if spec.act_quantized:
            attach_act_quant(mod, spec, _input_amax(t))
        count += 1
    expected = set(model.state_dict())
    unknown = sorted(set(plain) - expected)
    if unknown:
        raise ModelError(f"{path} holds tensors this model has no place for: {unknown[:5]}")
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in plain.items()},
                          strict=False, assign=True)
    return count


__all__ = ["load_compressed", "SUPPORTED"]
