"""The auto_gptq format: GPTQ layout with the legacy zero-minus-one convention, as GPTQ loaders read it.

Mixed bits go into ``dynamic``: ``"+:^name$": {"bits": 8, ...}`` overrides a layer, ``"-:^name$": {}``
keeps it unquantized (GPTQModel's convention, which upstream auto-round and vLLM read too).
"""

from __future__ import annotations

import re
from typing import Any
from torch import nn

import torch

from ..errors import ExportError
from ..plan import QuantPlan
from ..qdq import QParams
from ..qdq.common import effective_group_size
from .auto_round import block_name_to_quantize
from .base import PackedExporter, refuse_nontext


class AutoGPTQExporter(PackedExporter):
    name = "auto_gptq"
    description = "symmetric int 2/3/4/8-bit, any group size, mixed bits through `dynamic`"

    def packing(self, plan: QuantPlan) -> str:
        return "auto_round:auto_gptq"

    def check(self, plan: QuantPlan, model) -> None:
        super().check(plan, model)
        refuse_nontext(self.name, plan)
        for name, spec in plan.quantized.items():
            if not spec.sym:
                raise ExportError(
                    f"auto_gptq stores zero points minus one and cannot hold a zero point of 0, which "
                    f"asymmetric layers such as {name} can have; use --format auto_round (exact for "
                    "asymmetric schemes), or auto_awq for 4-bit"
                )

    def extra_layer_tensors(self, qp: QParams) -> dict[str, torch.Tensor]:
        in_f = qp.shape[1]
        g = effective_group_size(qp.group_size, in_f)
        return {"g_idx": (torch.arange(in_f, dtype=torch.int32) // g)}

    def quantization_config(self, plan: QuantPlan, extra: dict[str, Any], model: nn.Module | None = None) -> dict[str, Any]:
        d = plan.default
        cfg: dict[str, Any] = {
            "quant_method": "gptq",
            "bits": d.bits,
            "group_size": d.group_size,
            "sym": d.sym,
            "desc_act": False,
            "static_groups": False,
            "true_sequential": False,
            "damp_percent": 0.01,
            # no "meta" entry: transformers' GPTQ->auto-round converter takes it as the GPTQModel v2 layout
            "checkpoint_format": "gptq",
            # where GPTQ loaders look for layers to convert (a VLM's vision tower is not among them)
            "block_name_to_quantize": block_name_to_quantize(plan.block_names),
        }
        inside = {n for names in plan.block_layers.values() for n in names}
        dynamic: dict[str, dict[str, Any]] = {}
        for name, spec in plan.specs.items():
            key = "^" + re.escape(name) + "$"
            if not spec.quantized:
                if name in inside:
                    dynamic["-:" + key] = {}
            elif spec != d or name not in inside:
                dynamic["+:" + key] = {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym}
        if dynamic:
            cfg["dynamic"] = dynamic
        if plan.lm_head and plan.specs[plan.lm_head].quantized:
            cfg["lm_head"] = True
        return cfg
