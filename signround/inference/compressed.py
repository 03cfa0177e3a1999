"""Loading compressed-tensors (llm_compressor) checkpoints, ours or llm-compressor's, and the
floating-point auto_round files (MXFP / NVFP4 / FP8: the same tensors under an auto-round config).

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
from ..model.kvcache import SCALE_NAMES, attach, route
from ..model.layers import attach_act_quant
from ..qdq.elements import E2M1_MAX, E4M3_MAX, decode
from ..qdq.fp import E8M0_BIAS
from ..schemes import FP_TYPES, QuantSpec

logger = logging.getLogger(__name__)

SUPPORTED = ("pack-quantized", "int-quantized", "nvfp4-pack-quantized", "mxfp4-pack-quantized", "mxfp8-quantized",
             "float-quantized")


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
        if acts.get("type") == "int":
            kind = "int"
        elif kind == "mx_fp" and (acts.get("observer_kwargs") or {}).get("scale_rounding") == "rceil":
            kind = "mx_fp_rceil"
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
    if fmt == "int-quantized":
        scale = t["weight_scale"].float().reshape(out_f, -1)
        return t["weight"].float() * scale[:, cols]
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


def is_dequantized_format(qc: dict[str, Any]) -> bool:
    """compressed-tensors, or auto-round with floating-point weights: both load through this module."""
    method = str(qc.get("quant_method", "")).replace("_", "-").lower()
    return method == "compressed-tensors" or (method == "auto-round" and autoround_spec(qc).data_type in FP_TYPES)


AUTOROUND_KEYS = ("bits", "group_size", "sym", "data_type", "act_bits", "act_group_size", "act_data_type", "act_dynamic")


def autoround_spec(entry: dict[str, Any], base: QuantSpec | None = None) -> QuantSpec:
    """An auto-round config (global or extra_config entry) -> QuantSpec; upstream's data type names
    (``nv_fp4_with_static_gs``) map to ours."""
    base = base or QuantSpec(bits=4, group_size=128)
    return base.with_overrides(**{k: entry[k] for k in AUTOROUND_KEYS if entry.get(k) is not None})


def fp_format(spec: QuantSpec) -> str:
    """The compressed-tensors format whose tensors an FP spec's auto_round layer holds."""
    if spec.data_type == "nv_fp":
        return "nvfp4-pack-quantized"
    if spec.data_type == "mx_fp":
        return "mxfp4-pack-quantized" if spec.bits == 4 else "mxfp8-quantized"
    return "float-quantized"


def _autoround_layer_spec(qc: dict[str, Any], path: Path):
    from .loader import layer_override

    default = autoround_spec(qc)

    def spec_of(layer: str, mod: nn.Module) -> tuple[QuantSpec, str]:
        spec = autoround_spec(layer_override(qc, layer) or {}, default)
        if spec.data_type not in FP_TYPES or not spec.quantized:
            raise ModelError(f"{path}: {layer} holds floating-point quantized tensors but its config says {spec.label()}")
        return spec, fp_format(spec)

    return spec_of


def _compressed_layer_spec(qc: dict[str, Any], path: Path):
    if qc.get("quantization_status", "compressed") != "compressed":
        raise ModelError(f"{path}: quantization_status {qc.get('quantization_status')!r}: only compressed checkpoints load")
    groups = qc.get("config_groups") or {}
    ignore = qc.get("ignore") or []

    def spec_of(layer: str, mod: nn.Module) -> tuple[QuantSpec, str]:
        if any(_target_matches(i, layer, mod) for i in ignore):
            raise ModelError(f"{path}: {layer} holds quantized tensors but is in the config's ignore list")
        group = next((g for g in groups.values() if any(_target_matches(x, layer, mod) for x in g.get("targets", []))), None)
        if group is None:
            raise ModelError(f"{path}: no config group targets {layer}")
        fmt = group.get("format") or qc.get("format")
        if fmt not in SUPPORTED:
            raise ModelError(f"{path}: compressed-tensors format {fmt!r} is not supported; supported: {', '.join(SUPPORTED)}")
        return _spec(group["weights"], group.get("input_activations")), fmt

    return spec_of


def load_compressed(model: nn.Module, qc: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path,
                    dtype: torch.dtype) -> int:
    """Fill the (meta) ``model`` from compressed-tensors ``tensors`` (or a floating-point auto_round
    file's); returns the number of quantized layers."""
    method = str(qc.get("quant_method", "")).replace("_", "-").lower()
    spec_of = (_autoround_layer_spec if method == "auto-round" else _compressed_layer_spec)(qc, path)
    count = 0
    plain: dict[str, torch.Tensor] = {}
    layer_keys: dict[str, dict[str, torch.Tensor]] = {}
    attn_scales: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        layer, _, leaf = k.rpartition(".")
        if leaf in SCALE_NAMES.values() and (qc.get("kv_cache_scheme") or qc.get("attention_input_activations")):
            attn_scales.setdefault(layer, {})[leaf] = v
        elif leaf.startswith(("weight_", "input_")) or (leaf == "weight" and v.dtype in (torch.float8_e4m3fn, torch.int8)):
            layer_keys.setdefault(layer, {})[leaf] = v
        else:
            plain[k] = v
    modules = dict(model.named_modules())
    for layer, t in layer_keys.items():
        mod = modules.get(layer)
        if not isinstance(mod, nn.Linear):
            raise ModelError(f"{path}: {layer} holds quantized tensors but is not a Linear in this architecture")
        spec, fmt = spec_of(layer, mod)
        w = _dequantize(t, spec, fmt, (mod.out_features, mod.in_features))
        plain[layer + ".weight"] = w.to(dtype)
        if spec.act_quantized:
            attach_act_quant(mod, spec, _input_amax(t))
        count += 1
    if attn_scales:  # static FP8 attention: the loaded model computes what the engine will
        route(model)
        for layer, scales in attn_scales.items():
            attach(model.get_submodule(layer), scales)
    expected = set(model.state_dict())
    unknown = sorted(set(plain) - expected)
    if unknown:
        raise ModelError(f"{path} holds tensors this model has no place for: {unknown[:5]}")
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in plain.items()},
                          strict=False, assign=True)
    return count


__all__ = ["autoround_spec", "fp_format", "is_dequantized_format", "load_compressed", "SUPPORTED"]
