"""The auto_awq format (AutoAWQ GEMM layout): 4-bit codes packed along the output dimension."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ExportError
from ..model.layers import get_module, in_out_features
from ..plan import QuantPlan
from ..model.vlm import nontext_module_names
from .base import PackedExporter, refuse_nontext


class AutoAWQExporter(PackedExporter):
    name = "auto_awq"
    description = "int 4-bit only, one group size for all layers (in_features divisible by it, out_features by 8)"

    def packing(self, plan: QuantPlan) -> str:
        return "auto_round:auto_awq"

    def check(self, plan: QuantPlan, model) -> None:
        super().check(plan, model)
        refuse_nontext(self.name, plan)
        q = plan.quantized
        alt = "use --format auto_round (any bits and mixes) or auto_gptq"
        for name, spec in q.items():
            if spec.sym != plan.default.sym:
                raise ExportError(f"auto_awq needs all layers symmetric or all asymmetric; {name} differs; {alt}")
            if spec.bits != 4:
                raise ExportError(f"auto_awq holds 4-bit weights only, but {name} is {spec.label()}; {alt}")
            if spec.group_size != plan.default.group_size:
                raise ExportError(f"auto_awq needs one group size for all layers; {name} uses {spec.group_size}; {alt}")
        if plan.lm_head and plan.lm_head in q:
            raise ExportError(f"AWQ loaders do not quantize lm_head; drop --quant_lm_head or {alt}")
        for name, spec in q.items():
            in_f, out_f = in_out_features(get_module(model, name))
            g = in_f if spec.group_size == -1 else spec.group_size
            if in_f % g or out_f % 8:
                raise ExportError(
                    f"auto_awq needs in_features divisible by the group size and out_features by 8; "
                    f"{name} is {out_f}x{in_f} with group {spec.group_size}; use --format auto_round or auto_gptq"
                )

    def quantization_config(self, plan: QuantPlan, extra: dict[str, Any], model: nn.Module | None = None) -> dict[str, Any]:
        inside = {n for names in plan.block_layers.values() for n in names}
        not_converted = [n for n in plan.specs if n in inside and not plan.specs[n].quantized]
        if plan.lm_head:
            not_converted.append(plan.lm_head)
        if model is not None:  # a VLM's vision tower and projector (loaders match names as substrings)
            not_converted += nontext_module_names(model)
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": plan.default.group_size,
            "sym": plan.default.sym,
            "zero_point": not plan.default.sym,  # as upstream writes it; zeros are stored either way
            "version": "gemm",
            "modules_to_not_convert": not_converted or None,
        }
