"""What packed-integer exporters share: the integer check, the size estimate and the tensor stream."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from ..errors import ExportError
from ..plan import QuantPlan
from ..qdq import QParams
from .packing import pack_layer


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
            if spec.act_quantized and spec.data_type == "int":
                raise ExportError(
                    f"{self.name} holds weight-only integer layers and cannot keep {name}'s int8 activations "
                    f"({spec.label()}); use --format llm_compressor (compressed-tensors int-quantized, what "
                    "vLLM runs as W8A8) or fake"
                )
            if spec.scale_dtype != "float16" and self.name != "auto_round":
                raise ExportError(
                    f"{self.name}'s kernels read float16 scales; {name} has {spec.scale_dtype} scales "
                    "(--scale_dtype): use --format auto_round or llm_compressor, or drop --scale_dtype"
                )
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

    def convert(self, name: str, t: torch.Tensor, qparams: dict[str, QParams], plan: QuantPlan
                ) -> Iterator[tuple[str, torch.Tensor]]:
        """The output tensors for one state-dict entry: a quantized layer's weight becomes its
        packed tensors, everything else passes through."""
        layer, _, leaf = name.rpartition(".")
        if leaf == "weight" and layer in plan.quantized:
            qp = quantized_params(qparams, layer, t)
            scales = plan.specs[layer].scale_torch_dtype
            packed = {**pack_layer(qp, self.packing(plan), scales), **self.extra_layer_tensors(qp)}
            for key, value in packed.items():
                yield f"{layer}.{key}", value
        else:
            yield name, t


def quantized_params(qparams: dict[str, QParams], layer: str, weight: torch.Tensor) -> QParams:
    """The QParams of ``layer``, checked against its weight's shape ([out, in], or Conv1D's [in, out])."""
    qp = qparams.get(layer)
    if qp is None:
        raise ExportError(f"no quantization parameters for {layer}; it was not quantized in this run")
    if tuple(qp.shape) not in (tuple(weight.shape), tuple(weight.shape)[::-1]):
        raise ExportError(f"QParams of {layer} {tuple(qp.shape)} do not match its weight shape {tuple(weight.shape)}")
    return qp


def refuse_nontext(format_name: str, plan: QuantPlan) -> None:
    """Formats whose loaders convert only the decoder blocks' layers cannot hold a quantized vision tower."""
    if plan.nontext:
        raise ExportError(
            f"{format_name} loaders quantize the language model's blocks only, so they cannot hold the quantized "
            f"vision tower / projector ({plan.nontext[0]}, ...) that --quant_nontext_module asks for; use --format "
            "auto_round or llm_compressor, or drop --quant_nontext_module"
        )
