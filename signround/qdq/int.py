"""Integer quantize-dequantize: full-range symmetric and asymmetric (zero point)."""

from __future__ import annotations

from typing import Optional

import torch

from ..schemes import QuantSpec
from .common import (
    MIN_SCALE_MAGNITUDE,
    QParams,
    from_groups,
    grouped_range,
    round_ste,
    to_groups,
    to_scale_dtype,
)


def qdq_int(
    w: torch.Tensor,
    spec: QuantSpec,
    v: Optional[torch.Tensor] = None,
    min_scale: Optional[torch.Tensor] = None,
    max_scale: Optional[torch.Tensor] = None,
) -> "tuple[torch.Tensor, QParams]":
    """Quantize-dequantize an ``[out, in]`` weight to ``spec.bits`` integers per group.

    ``v``: rounding offsets, shape of ``w``, added before rounding (SignRound keeps them in
    [-0.5, 0.5]). ``min_scale`` / ``max_scale``: ``[out, n_groups]`` factors in [0, 1] that shrink
    each group's range (clipping).

    Symmetric is the full-range form: all ``2**bits`` levels are used, and the extreme with the
    larger magnitude maps to ``-2**(bits-1)``; the scale therefore carries a sign. Codes are stored
    offset by ``2**(bits-1)``, which is the zero point. Asymmetric uses ``scale = (max-min)/(2**bits-1)``
    and an integer zero point ``round(-min/scale)``.
    """
    bits, gs = spec.bits, spec.group_size
    in_f = w.shape[1]
    wg = to_groups(w.float(), gs)
    vg = to_groups(v.float(), gs) if v is not None else None
    wmin, wmax = grouped_range(wg, min_scale, max_scale)

    if spec.sym:
        half = 2 ** (bits - 1)
        neg = -wmin
        # Larger-magnitude extreme -> -half; ties go to the max, as upstream AutoRound does.
        max_v = torch.where(wmax < neg, neg, -wmax)
        scale = to_scale_dtype(max_v / half, spec.scale_torch_dtype)
        scale = torch.where(
            scale < 0,
            torch.clamp(scale, max=-MIN_SCALE_MAGNITUDE),
            torch.clamp(scale, min=MIN_SCALE_MAGNITUDE),
        )
        x = wg / scale.unsqueeze(-1)
        if vg is not None:
            x = x + vg
        q = torch.clamp(round_ste(x), -half, half - 1)
        dq = q * scale.unsqueeze(-1)
        zero = torch.full_like(scale, float(half))
        codes = q.detach() + half
    else:
        maxq = 2**bits - 1
        scale = to_scale_dtype(torch.clamp((wmax - wmin) / maxq, min=MIN_SCALE_MAGNITUDE), spec.scale_torch_dtype)
        zero = torch.clamp(round_ste(-wmin / scale), 0, maxq)
        x = wg / scale.unsqueeze(-1)
        if vg is not None:
            x = x + vg
        q = torch.clamp(round_ste(x) + zero.unsqueeze(-1), 0, maxq)
        dq = (q - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
        codes = q.detach()

    w_qdq = from_groups(dq, in_f).to(w.dtype)
    qp = QParams(
        scale=scale.detach(),
        zero=zero.detach(),
        codes=from_groups(codes, in_f).to(torch.int32),
        bits=bits,
        group_size=gs,
    )
    return w_qdq, qp


def qdq_int_min(
    w: torch.Tensor,
    spec: QuantSpec,
    v: Optional[torch.Tensor] = None,
    min_scale: Optional[torch.Tensor] = None,
    max_scale: Optional[torch.Tensor] = None,
) -> "tuple[torch.Tensor, QParams]":
    """Asymmetric with a floating-point minimum instead of an integer zero point (GGUF Q4_1 / Q5_1):
    ``w = d * q + m`` with ``d = (max - min) / (2**bits - 1)`` and ``m = min``, both fp16.

    The group's true range is used (0 need not be representable). QParams hold ``d`` in ``scale``
    and ``m`` in ``zero``.
    """
    maxq = 2**spec.bits - 1
    in_f = w.shape[1]
    wg = to_groups(w.float(), spec.group_size)
    wmin, wmax = wg.amin(dim=-1), wg.amax(dim=-1)
    if min_scale is not None:
        wmin = wmin * min_scale
    if max_scale is not None:
        wmax = wmax * max_scale
    d = to_scale_dtype(torch.clamp((wmax - wmin) / maxq, min=MIN_SCALE_MAGNITUDE))
    m = to_scale_dtype(wmin)
    x = (wg - m.unsqueeze(-1)) / d.unsqueeze(-1)
    if v is not None:
        x = x + to_groups(v.float(), spec.group_size)
    q = torch.clamp(round_ste(x), 0, maxq)
    dq = d.unsqueeze(-1) * q + m.unsqueeze(-1)  # the order GGUF dequantizes in, for bit-equal weights
    qp = QParams(
        scale=d.detach(),
        zero=m.detach(),
        codes=from_groups(q.detach(), in_f).to(torch.int32),
        bits=spec.bits,
        group_size=spec.group_size,
        data_type="int_min",
    )
    return from_groups(dq, in_f).to(w.dtype), qp
