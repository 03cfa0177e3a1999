"""The block loop: quantize blocks in order, then layers outside blocks (lm_head)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..model.layers import get_module
from ..plan import QuantPlan, untie_output_embedding
from ..qdq import QParams
from .rtn import rtn_layer

logger = logging.getLogger(__name__)


@dataclass
class QuantResult:
    """What export needs: QParams of every quantized layer, plus per-block statistics."""

    qparams: dict[str, QParams] = field(default_factory=dict)
    block_stats: dict[str, dict] = field(default_factory=dict)


@torch.no_grad()
def quantize_rtn(model: nn.Module, plan: QuantPlan, show_progress: bool = True) -> QuantResult:
    """Plain round-to-nearest over all blocks, block by block, on whatever device the weights are."""
    untie_output_embedding(model, plan)
    result = QuantResult()
    for block in tqdm(plan.block_names, desc="quantizing blocks", disable=not show_progress):
        for name in plan.layers_of(block):
            result.qparams[name] = rtn_layer(get_module(model, name), plan.specs[name])
    for name in plan.outside_blocks():
        result.qparams[name] = rtn_layer(get_module(model, name), plan.specs[name])
    return result
