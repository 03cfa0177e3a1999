"""The auto_round format: what upstream AutoRound (and transformers through it) loads.

Packing formats, chosen from the layers' specs:
  * ``auto_round:auto_gptq`` when every quantized layer is symmetric: GPTQ layout, zero stored minus one;
  * ``auto_round:auto_awq`` when every quantized layer is asymmetric 4-bit: AWQ layout, raw zeros;
  * ``auto_round`` otherwise: GPTQ layout, raw zeros (holds any mix of bits and sym);
  * ``auto_round:llm_compressor`` for MXFP4 / MXFP8 / NVFP4 and ``auto_round:fp8_static`` for FP8 with
    static activations (no packing_format for weight-only FP8), as upstream writes them: the
    compressed-tensors tensors of each layer (``weight_packed`` / ``weight``, ``weight_scale``,
    NVFP4's global scales, FP8's ``input_scale``) under an auto-round config that names the data
    types (``act_data_type`` ``mx_fp_rceil``, ``nv_fp4_with_static_gs``, ...). One file holds either
    integer or floating-point layers.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import ExportError
from ..plan import QuantPlan
from ..qdq import QParams
from ..schemes import FP_TYPES, QuantSpec
from .base import PackedExporter, quantized_params
from .llm_compressor import LLMCompressorExporter, layer_tensors

# our activation data types -> upstream's names in an auto-round config
UPSTREAM_ACT_NAMES = {"nv_fp": "nv_fp4_with_static_gs"}


def choose_packing(specs: dict[str, QuantSpec]) -> str:
    q = [s for s in specs.values() if s.quantized]
    if all(s.sym for s in q):
        return "auto_round:auto_gptq"
    if all(not s.sym and s.bits == 4 for s in q):
        return "auto_round:auto_awq"
    return "auto_round"


def block_name_to_quantize(block_names: list[str]) -> str:
    """``model.layers.0..N`` -> ``model.layers`` (the ModuleList names, comma-separated)."""
    prefixes: list[str] = []
    for b in block_names:
        parent, _, idx = b.rpartition(".")
        name = parent if idx.isdigit() and parent else b
        if name not in prefixes:
            prefixes.append(name)
    return ",".join(prefixes)


def is_fp_plan(plan: QuantPlan) -> bool:
    q = plan.quantized.values()
    return bool(q) and all(s.data_type in FP_TYPES for s in q)


def _spec_dict(spec: QuantSpec, acts: bool = False) -> dict[str, Any]:
    d: dict[str, Any] = {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym, "data_type": spec.data_type}
    if spec.scale_dtype != "float16":
        d["scale_dtype"] = f"torch.{spec.scale_dtype}"
    if acts:  # floating-point files: upstream's loader picks its kernel by the activation settings too
        d.update(act_bits=spec.act_bits, act_group_size=spec.act_group_size, act_sym=True,
                 act_data_type=UPSTREAM_ACT_NAMES.get(spec.act_data_type, spec.act_data_type),
                 act_dynamic=spec.act_dynamic)
    return d


def extra_config(plan: QuantPlan) -> dict[str, dict[str, Any]]:
    """Per-layer entries for layers that differ from the global spec (and quantized layers outside blocks)."""
    acts = is_fp_plan(plan)
    default = _spec_dict(plan.default, acts)
    inside = {n for names in plan.block_layers.values() for n in names}
    extra: dict[str, dict[str, Any]] = {}
    for name, spec in plan.specs.items():
        if not spec.quantized:
            if name in inside:
                extra[name] = {"bits": 16, "data_type": "float"}
            continue
        d = _spec_dict(spec, acts)
        if name not in inside:
            extra[name] = d
        else:
            diff = {k: v for k, v in d.items() if default.get(k) != v}
            if diff:
                extra[name] = diff
    for name in plan.routers:  # kept; upstream's loader would take a router it is not told about for quantized
        extra[name] = {"bits": 16, "data_type": "float"}
    return extra


class AutoRoundExporter(PackedExporter):
    name = "auto_round"

    description = (
        "int 2/3/4/8-bit, any group size, sym or asym, mixed bits (auto_round / auto_gptq / auto_awq packing); "
        "MXFP4 / MXFP8 / NVFP4 / FP8 (auto_round:llm_compressor, auto_round:fp8_static)"
    )

    def packing(self, plan: QuantPlan) -> str:
        return choose_packing(plan.specs)

    def check(self, plan: QuantPlan, model: nn.Module) -> None:
        fp = [s for s in plan.quantized.values() if s.data_type in FP_TYPES]
        if not fp:
            return super().check(plan, model)
        if len(fp) != len(plan.quantized):
            raise ExportError(
                "auto_round holds either integer or floating-point (MXFP / NVFP4 / FP8) layers in one file; "
                "this plan mixes them: use --format llm_compressor, which holds both"
            )
        if len({s.data_type == "fp" for s in fp}) > 1:
            raise ExportError(
                "auto_round holds MX/NVFP4 layers (auto_round:llm_compressor) or FP8 layers (auto_round:fp8_static), "
                "not both in one file; use --format llm_compressor, which holds both"
            )
        LLMCompressorExporter().check(plan, model)  # same tensors: groups must divide in_features

    def fp_packing(self, plan: QuantPlan) -> str | None:
        if plan.default.data_type != "fp":
            return "auto_round:llm_compressor"
        return "auto_round:fp8_static" if plan.default.act_quantized else None

    def quantization_config(self, plan: QuantPlan, extra: dict[str, Any], model: nn.Module | None = None) -> dict[str, Any]:
        d = plan.default
        fp = is_fp_plan(plan)
        cfg: dict[str, Any] = {
            "quant_method": "auto-round",
            **_spec_dict(d, acts=fp),
            "act_bits": d.act_bits,
            "packing_format": self.fp_packing(plan) if fp else choose_packing(plan.specs),
            "block_name_to_quantize": block_name_to_quantize(plan.block_names),
            "quantizer": "signround",
        }
        if fp and d.data_type == "fp":
            cfg.update(fmt="e4m3", activation_scheme="dynamic" if d.act_dynamic else "static")
        cfg = {k: v for k, v in cfg.items() if v is not None}
        cfg.update({k: v for k, v in extra.items() if v is not None})
        ec = extra_config(plan)
        if ec:
            cfg["extra_config"] = ec
        return cfg

    def convert(self, name: str, t: torch.Tensor, qparams: dict[str, QParams], plan: QuantPlan
                ) -> Iterator[tuple[str, torch.Tensor]]:
        if not is_fp_plan(plan):
            yield from super().convert(name, t, qparams, plan)
            return
        layer, _, leaf = name.rpartition(".")
        if leaf == "weight" and layer in plan.quantized:
            spec = plan.specs[layer]
            for key, value in layer_tensors(quantized_params(qparams, layer, t), spec, t.dtype).items():
                if spec.data_type == "fp" and key == "weight_scale":
                    value = value.reshape(-1)  # upstream's FP8 layers hold [out] (or [1] per tensor)
                yield f"{layer}.{key}", value
        else:
            yield name, t


def dir_size(path: str | os.PathLike) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


__all__ = ["AutoRoundExporter", "choose_packing", "dir_size", "is_fp_plan"]
