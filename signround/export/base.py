"""What packed-integer exporters share: the integer check, the size estimate and the tensor stream."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from ..errors import ExportError
from ..model.layers import get_module, get_weight
from ..plan import QuantPlan
from ..qdq import QParams
from .packing import pack_layer
from .writer import unique_state_dict


def packed_size_estimate(model: nn.Module, plan: QuantPlan) -> int:
    """Bytes a packed checkpoint of ``plan`` takes, roughly (codes plus a 4-byte scale per group)."""
    total = 0
    for name, p in model.named_parameters():
        spec = plan.specs.get(name.rsplit(".", 1)[0])
        if spec is not None and spec.quantized and name.endswith("weight"):
            total += p.numel() * spec.bits // 8 + p.numel() // max(spec.group_size, 1) * 4
        else:
            total += p.numel() * p.element_size()
    return total


class PackedExporter:
    """Base of formats that store int codes packed in int32 words; subclasses pick the packing."""

    name = ""
    description = ""

    def packing(self, plan: QuantPlan) -> str:
        raise NotImplementedError

    def check(self, plan: QuantPlan, model: nn.Module) -> None:
        for name, spec in plan.quantized.items():
            if spec.data_type != "int" or spec.bits not in (2, 3, 4, 8):
                fix = (f"--format gguf:{plan.ggml_ftype}" if plan.ggml_ftype
                       else "--format llm_compressor (compressed-tensors, what vLLM loads)")
                raise ExportError(
                    f"{self.name} holds 2/3/4/8-bit integer weights with zero points and cannot hold {name} "
                    f"({spec.label()}); use {fix} or fake"
                )

    def quantization_config(self, plan: QuantPlan, extra: dict[str, Any], model: nn.Module | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def extra_layer_tensors(self, qp: QParams) -> dict[str, torch.Tensor]:
        return {}

    def estimate_bytes(self, model: nn.Module, plan: QuantPlan) -> int:
        return packed_size_estimate(model, plan)

    def tensors(self, model: nn.Module, plan: QuantPlan, qparams: dict[str, QParams]) -> Iterator[tuple[str, torch.Tensor]]:
        packing = self.packing(plan)
        for name, t in unique_state_dict(model, qparams):
            layer, _, leaf = name.rpartition(".")
            if layer in qparams and leaf == "weight":
                qp = qparams[layer]
                if tuple(qp.shape) != tuple(get_weight(get_module(model, layer)).shape):
                    raise ExportError(f"QParams of {layer} do not match its weight shape")
                packed = {**pack_layer(qp, packing), **self.extra_layer_tensors(qp)}
                for key, value in packed.items():
                    yield f"{layer}.{key}", value
            else:
                yield name, t
