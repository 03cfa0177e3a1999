"""Round-to-nearest: quantize a layer's weight in place with no calibration data."""

from __future__ import annotations

import torch
from torch import nn

from ..model.layers import get_weight, set_weight
from ..qdq import QParams, qdq
from ..schemes import QuantSpec


def rtn_layer(module: nn.Module, spec: QuantSpec) -> QParams:
    """Replace the module's weight by its qdq value; return the QParams on CPU with uint8 codes."""
    w_qdq, qp = qdq(get_weight(module).detach(), spec)
    set_weight(module, w_qdq)
    return compact(qp)


def compact(qp: QParams) -> QParams:
    """Keep QParams off the accelerator and codes as uint8 (1 byte per weight until export)."""
    return QParams(
        scale=qp.scale.cpu(),
        zero=qp.zero.cpu(),
        codes=qp.codes.to("cpu", dtype=torch.uint8),
        bits=qp.bits,
        group_size=qp.group_size,
    )
