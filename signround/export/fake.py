"""The `fake` format: qdq weights in the original dtype, an ordinary transformers checkpoint."""

from __future__ import annotations

import logging
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import ExportError
from ..model.moe import experts_fused_on_disk
from ..plan import QuantPlan
from ..qdq import QParams

logger = logging.getLogger(__name__)


class FakeExporter:
    name = "fake"
    reads_weights = True  # the only format that stores the in-memory qdq weights of quantized layers
    description = "qdq weights in the original dtype: an ordinary transformers checkpoint (any scheme)"

    def check(self, plan: QuantPlan, model: nn.Module) -> None:
        if experts_fused_on_disk(model):
            raise ExportError(
                f"fake writes a plain transformers checkpoint, but transformers reads this {model.config.model_type} "
                "model's experts fused while signround stores them per expert; use --format auto_round (which "
                "signround's load_quantized and upstream auto-round read)"
            )
        act = sorted({s.label() for s in plan.quantized.values() if s.act_quantized})
        if act:
            logger.warning(
                "the fake format stores qdq weights only: activation quantization of %s is not in the "
                "checkpoint (use --format llm_compressor to keep it)", ", ".join(act)
            )

    def estimate_bytes(self, model: nn.Module, plan: QuantPlan) -> int:
        return sum(p.numel() * p.element_size() for p in model.parameters())

    def quantization_config(self, plan: QuantPlan, extra: dict[str, Any], model: nn.Module | None = None) -> None:
        return None

    def convert(self, name: str, t: torch.Tensor, qparams: dict[str, QParams], plan: QuantPlan
                ) -> Iterator[tuple[str, torch.Tensor]]:
        yield name, t
