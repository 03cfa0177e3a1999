"""The llm_compressor format: compressed-tensors checkpoints, as vLLM and transformers load them.

One config group per distinct layer scheme; each group's ``format`` follows its data type:
  * int weights: ``pack-quantized`` (``weight_packed`` int32 along the input dimension, signed
    values stored offset by 2**(bits-1), ``weight_scale``, ``weight_shape``, packed zero points
    along the output dimension for asymmetric schemes);
  * NVFP4: ``nvfp4-pack-quantized`` (two E2M1 codes per byte, low nibble first; FP8-E4M3
    ``weight_scale`` per 16; ``weight_global_scale``; dequantized ``code * scale / global_scale``);
  * MXFP4: ``mxfp4-pack-quantized`` (E2M1 bytes as above, ``weight_scale`` = biased E8M0 exponent);
  * MXFP8: ``mxfp8-quantized`` and FP8: ``float-quantized`` (``float8_e4m3fn`` weights);
  * W8A8: ``int-quantized`` (``weight`` int8, ``weight_scale``; activations int8 per token, dynamic).
Static activation ranges become ``input_scale`` (FP8) or ``input_global_scale`` (NVFP4).
compressed-tensors has no field for how MX activation scales round: engines use OCP's floor, and
so does a file's reader here unless ``observer_kwargs`` says ``scale_rounding: rceil`` (written for
``mx_fp_rceil`` activations, what signround tuned with).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from ..errors import ExportError
from ..model.kvcache import FP8_TENSOR_ARGS, attention_modules
from ..model.layers import get_module, get_weight
from ..plan import QuantPlan
from ..qdq import QParams
from ..qdq.elements import E2M1_MAX, E4M3_MAX
from ..qdq.fp import E8M0_BIAS
from ..schemes import QuantSpec
from .base import packed_size_estimate, quantized_params
from .packing import pack_cols, pack_rows

CT_FORMAT = {"int": "pack-quantized", "nv_fp": "nvfp4-pack-quantized", "fp": "float-quantized"}


def group_format(spec: QuantSpec) -> str:
    if spec.data_type == "int" and spec.act_quantized:
        return "int-quantized"
    if spec.data_type == "mx_fp":
        return "mxfp4-pack-quantized" if spec.bits == 4 else "mxfp8-quantized"
    return CT_FORMAT[spec.data_type]


def weight_args(spec: QuantSpec) -> dict[str, Any]:
    """compressed-tensors QuantizationArgs of the weights, as JSON."""
    a: dict[str, Any] = {"num_bits": spec.bits, "type": "int" if spec.data_type == "int" else "float",
                         "symmetric": spec.sym, "dynamic": False}
    if spec.data_type == "fp":
        a.update(group_size=None, strategy="channel" if spec.group_size == -1 else "tensor")
    elif spec.data_type == "int" and spec.group_size == -1:
        a.update(group_size=None, strategy="channel")
    else:
        a.update(group_size=spec.group_size, strategy="tensor_group" if spec.data_type == "nv_fp" else "group")
    if spec.data_type == "mx_fp":
        a["scale_dtype"] = "torch.uint8"
    elif spec.data_type == "nv_fp":
        a["scale_dtype"] = "torch.float8_e4m3fn"
    return a


def input_args(spec: QuantSpec) -> dict[str, Any] | None:
    if not spec.act_quantized:
        return None
    a: dict[str, Any] = {"num_bits": spec.act_bits, "type": "int" if spec.act_data_type == "int" else "float",
                         "symmetric": True}
    if spec.act_data_type.startswith("mx_fp"):
        a.update(group_size=spec.act_group_size, strategy="group", dynamic=True, scale_dtype="torch.uint8")
        if spec.act_data_type == "mx_fp_rceil":
            a["observer_kwargs"] = {"scale_rounding": "rceil"}
    elif spec.act_data_type == "nv_fp":
        a.update(group_size=spec.act_group_size, strategy="tensor_group", dynamic="local",
                 scale_dtype="torch.float8_e4m3fn", observer="static_minmax")
    elif spec.act_dynamic:
        a.update(group_size=None, strategy="token" if spec.act_group_size == -1 else "tensor", dynamic=True)
    else:
        a.update(group_size=None, strategy="tensor", dynamic=False, observer="static_minmax")
    return a


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """``[R, C]`` 4-bit codes (C even) -> uint8 ``[R, C/2]``; column 2j in the low nibble."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    p = packed.to(torch.uint8)
    return torch.stack((p & 0xF, p >> 4), dim=-1).reshape(p.shape[0], -1)


def layer_tensors(qp: QParams, spec: QuantSpec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """QParams -> the compressed-tensors tensors of one layer (names relative to the layer)."""
    out_f, in_f = qp.shape
    t: dict[str, torch.Tensor] = {}
    if spec.data_type == "int" and spec.act_quantized:  # int-quantized: signed int8 codes
        t["weight"] = (qp.codes.to(torch.int16) - 2 ** (qp.bits - 1)).to(torch.int8)
        t["weight_scale"] = qp.scale.to(dtype).contiguous()
    elif spec.data_type == "int":
        t["weight_packed"] = pack_cols(qp.codes.to(torch.int64), qp.bits)
        # float32 scales (--scale_dtype fp32) keep their precision; others go in the model's dtype
        t["weight_scale"] = qp.scale.to(torch.float32 if spec.scale_dtype == "float32" else dtype).contiguous()
        t["weight_shape"] = torch.tensor([out_f, in_f], dtype=torch.int64)
        if not spec.sym:
            t["weight_zero_point"] = pack_rows(qp.zero.round().to(torch.int64), qp.bits)
    elif spec.data_type in ("nv_fp", "mx_fp") and spec.bits == 4:
        t["weight_packed"] = pack_fp4(qp.codes)
        if spec.data_type == "nv_fp":
            t["weight_scale"] = qp.scale.to(torch.float8_e4m3fn)
            t["weight_global_scale"] = qp.global_scale.float().reshape(1)
        else:
            t["weight_scale"] = _e8m0(qp.scale)
    else:  # FP8 elements: MXFP8 or FP8 per channel / per tensor
        t["weight"] = qp.codes.to(torch.uint8).view(torch.float8_e4m3fn)
        if spec.data_type == "mx_fp":
            t["weight_scale"] = _e8m0(qp.scale)
        else:
            scale = qp.scale.float()
            t["weight_scale"] = scale[:1, 0].contiguous() if spec.group_size == 0 else scale.contiguous()
    if spec.needs_act_range:
        if qp.input_amax is None:
            raise ExportError("a static activation range is missing; quantize with calibration data")
        amax = qp.input_amax.float().reshape(1).clamp_min(torch.finfo(torch.float32).tiny)
        if spec.act_data_type == "nv_fp":
            t["input_global_scale"] = E4M3_MAX * E2M1_MAX / amax
        else:
            t["input_scale"] = amax / E4M3_MAX
    return t


def _e8m0(scale: torch.Tensor) -> torch.Tensor:
    return (torch.log2(scale.float()).round() + E8M0_BIAS).to(torch.uint8)


class LLMCompressorExporter:
    name = "llm_compressor"
    description = (
        "compressed-tensors for vLLM / transformers: int W2-W8 (pack-quantized), W8A8 (int-quantized), NVFP4, "
        "MXFP4, MXFP8, FP8; "
        "group size must divide every in_features"
    )

    def check(self, plan: QuantPlan, model: nn.Module) -> None:
        for name, spec in plan.quantized.items():
            mod = get_module(model, name)
            if not isinstance(mod, nn.Linear):
                raise ExportError(
                    f"llm_compressor holds nn.Linear layers; {name} is a {type(mod).__name__}; "
                    "use --format auto_round"
                )
            in_f = mod.in_features
            if spec.group_size > 0 and in_f % spec.group_size:
                raise ExportError(
                    f"llm_compressor (compressed-tensors, vLLM) needs group_size to divide in_features; "
                    f"{name} has {in_f} inputs and group size {spec.group_size}: choose a group size that "
                    "divides it, keep the layer in fp with --ignore_layers, or use --format auto_round"
                )

    def estimate_bytes(self, model: nn.Module, plan: QuantPlan) -> int:
        return packed_size_estimate(model, plan)

    def quantization_config(self, plan: QuantPlan, extra: dict[str, Any], model: nn.Module | None = None) -> dict[str, Any]:
        groups: dict[QuantSpec, list[str]] = {}
        for name, spec in plan.quantized.items():
            groups.setdefault(spec, []).append(name)
        config_groups: dict[str, Any] = {}
        for i, (spec, names) in enumerate(groups.items()):
            config_groups[f"group_{i}"] = {
                "targets": ["Linear"] if len(groups) == 1 else names,
                "weights": weight_args(spec),
                "input_activations": input_args(spec),
                "output_activations": None,
                "format": group_format(spec),
            }
        formats = {g["format"] for g in config_groups.values()}
        return {
            "quant_method": "compressed-tensors",
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed",
            "config_groups": config_groups,
            # every other Linear is ignored so that a ["Linear"] target never reaches it
            "ignore": [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in plan.quantized],
            "kv_cache_scheme": dict(FP8_TENSOR_ARGS) if plan.static_attention else None,
            **({"attention_input_activations": {"targets": sorted({type(m).__name__ for _, m in attention_modules(model)}),
                                                "input_activations": dict(FP8_TENSOR_ARGS)}}
               if "q" in plan.static_attention else {}),
        }

    def convert(self, name: str, t: torch.Tensor, qparams: dict[str, QParams], plan: QuantPlan
                ) -> Iterator[tuple[str, torch.Tensor]]:
        layer, _, leaf = name.rpartition(".")
        if leaf == "weight" and layer in plan.quantized:
            qp = quantized_params(qparams, layer, t)
            for key, value in layer_tensors(qp, plan.specs[layer], t.dtype).items():
                yield f"{layer}.{key}", value
        else:
            yield name, t
