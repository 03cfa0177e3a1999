"""The auto_round format (and the `fake` format): what upstream AutoRound and transformers load.

Packing formats, chosen from the layers' specs:
  * ``auto_round:auto_gptq`` when every quantized layer is symmetric: GPTQ layout, zero stored minus one;
  * ``auto_round:auto_awq`` when every quantized layer is asymmetric 4-bit: AWQ layout, raw zeros;
  * ``auto_round`` otherwise: GPTQ layout, raw zeros (holds any mix of bits and sym).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import ExportError
from ..model.layers import get_module, get_weight
from ..plan import QuantPlan
from ..qdq import QParams
from ..schemes import QuantSpec
from .packing import pack_awq, pack_cols, pack_rows, packed_len


@dataclass(frozen=True)
class Packing:
    layout: str  # "gptq" or "awq"
    zero_offset: int  # added to the zero point before storing (-1: legacy GPTQ convention)


PACKINGS: dict[str, Packing] = {
    "auto_round:auto_gptq": Packing("gptq", -1),
    "auto_round": Packing("gptq", 0),
    "auto_round:auto_awq": Packing("awq", 0),
}


def choose_packing(specs: dict[str, QuantSpec]) -> str:
    q = [s for s in specs.values() if s.quantized]
    if all(s.sym for s in q):
        return "auto_round:auto_gptq"
    if all(not s.sym and s.bits == 4 for s in q):
        return "auto_round:auto_awq"
    return "auto_round"


def pack_layer(qp: QParams, packing: str) -> dict[str, torch.Tensor]:
    """QParams -> ``qweight`` / ``qzeros`` / ``scales`` tensors of the given packing format."""
    p = PACKINGS[packing]
    codes = qp.codes.to(torch.int64).t()  # [in, out]
    zeros = qp.zero.round().to(torch.int64).t() + p.zero_offset  # [n_groups, out]
    if int(zeros.min()) < 0:
        raise ExportError(
            f"a zero point of 0 cannot be stored with packing {packing!r} (zero minus one); "
            "this is a bug in packing selection, please report it"
        )
    if p.layout == "gptq":
        qweight, qzeros = pack_rows(codes, qp.bits), pack_cols(zeros, qp.bits)
    else:
        qweight, qzeros = pack_awq(codes), pack_awq(zeros)
    return {"qweight": qweight, "qzeros": qzeros, "scales": qp.scale.t().contiguous().to(torch.float16)}


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
    return extra


class AutoRoundExporter:
    name = "auto_round"
    description = "int 2/3/4/8-bit, any group size, sym or asym, mixed bits (auto_round / auto_gptq / auto_awq packing)"

    def check(self, plan: QuantPlan) -> None:
        for name, spec in plan.quantized.items():
            if spec.data_type != "int" or spec.bits not in (2, 3, 4, 8):
                raise ExportError(f"auto_round cannot hold {name} ({spec.label()}); use the fake format")

    def estimate_bytes(self, model: nn.Module, plan: QuantPlan) -> int:
        total = 0
        for name, p in model.named_parameters():
            layer = name.rsplit(".", 1)[0]
            spec = plan.specs.get(layer)
            if spec is not None and spec.quantized and name.endswith("weight"):
                total += p.numel() * spec.bits // 8 + p.numel() // max(spec.group_size, 1) * 4
            else:
                total += p.numel() * p.element_size()
        return total

    def quantization_config(self, plan: QuantPlan, extra: dict[str, Any]) -> dict[str, Any]:
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

    def tensors(self, model: nn.Module, plan: QuantPlan, qparams: dict[str, QParams]) -> Iterator[tuple[str, torch.Tensor]]:
        from .writer import unique_state_dict

        packing = choose_packing(plan.specs)
        for name, t in unique_state_dict(model):
            layer, _, leaf = name.rpartition(".")
            if layer in qparams and leaf == "weight":
                qp = qparams[layer]
                if tuple(qp.codes.shape) != tuple(get_weight(get_module(model, layer)).shape):
                    raise ExportError(f"QParams of {layer} do not match its weight shape")
                for key, packed in pack_layer(qp, packing).items():
                    yield f"{layer}.{key}", packed
            else:
                yield name, t


class FakeExporter:
    name = "fake"
    description = "qdq weights in the original dtype: an ordinary transformers checkpoint (any scheme)"

    def check(self, plan: QuantPlan) -> None:
        return None

    def estimate_bytes(self, model: nn.Module, plan: QuantPlan) -> int:
        return sum(p.numel() * p.element_size() for p in model.parameters())

    def quantization_config(self, plan: QuantPlan, extra: dict[str, Any]) -> None:
        return None

    def tensors(self, model: nn.Module, plan: QuantPlan, qparams: dict[str, QParams]) -> Iterator[tuple[str, torch.Tensor]]:
        from .writer import unique_state_dict

        yield from unique_state_dict(model)


def dir_size(path: str | os.PathLike) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


__all__ = ["AutoRoundExporter", "FakeExporter", "PACKINGS", "choose_packing", "pack_layer", "packed_len", "dir_size"]
