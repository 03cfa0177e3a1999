"""The auto_round format: what upstream AutoRound (and transformers through it) loads.

Packing formats, chosen from the layers' specs:
  * ``auto_round:auto_gptq`` when every quantized layer is symmetric: GPTQ layout, zero stored minus one;
  * ``auto_round:auto_awq`` when every quantized layer is asymmetric 4-bit: AWQ layout, raw zeros;
  * ``auto_round`` otherwise: GPTQ layout, raw zeros (holds any mix of bits and sym).
"""

from __future__ import annotations

import os
from typing import Any
from torch import nn

from ..plan import QuantPlan
from ..schemes import QuantSpec
from .base import PackedExporter


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


def _spec_dict(spec: QuantSpec) -> dict[str, Any]:
    return {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym, "data_type": spec.data_type}


def extra_config(plan: QuantPlan) -> dict[str, dict[str, Any]]:
    """Per-layer entries for layers that differ from the global spec (and quantized layers outside blocks)."""
    default = _spec_dict(plan.default)
    inside = {n for names in plan.block_layers.values() for n in names}
    extra: dict[str, dict[str, Any]] = {}
    for name, spec in plan.specs.items():
        if not spec.quantized:
            if name in inside:
                extra[name] = {"bits": 16, "data_type": "float"}
            continue
        d = _spec_dict(spec)
        if name not in inside:
            extra[name] = d
        else:
            diff = {k: v for k, v in d.items() if default[k] != v}
            if diff:
                extra[name] = diff
    for name in plan.routers:  # kept; upstream's loader would take a router it is not told about for quantized
        extra[name] = {"bits": 16, "data_type": "float"}
    return extra


class AutoRoundExporter(PackedExporter):
    name = "auto_round"
    description = "int 2/3/4/8-bit, any group size, sym or asym, mixed bits (auto_round / auto_gptq / auto_awq packing)"

    def packing(self, plan: QuantPlan) -> str:
        return choose_packing(plan.specs)

    def quantization_config(self, plan: QuantPlan, extra: dict[str, Any], model: nn.Module | None = None) -> dict[str, Any]:
        d = plan.default
        cfg: dict[str, Any] = {
            "quant_method": "auto-round",
            "bits": d.bits,
            "group_size": d.group_size,
            "sym": d.sym,
            "data_type": d.data_type,
            "act_bits": d.act_bits,
            "packing_format": choose_packing(plan.specs),
            "block_name_to_quantize": block_name_to_quantize(plan.block_names),
            "quantizer": "signround",
        }
        cfg.update({k: v for k, v in extra.items() if v is not None})
        ec = extra_config(plan)
        if ec:
            cfg["extra_config"] = ec
        return cfg


def dir_size(path: str | os.PathLike) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


__all__ = ["AutoRoundExporter", "choose_packing", "dir_size"]
