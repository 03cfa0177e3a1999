"""ggml k-quants: integer sub-blocks whose scales (and mins) are themselves quantized per
super-block of 256 weights ("double quantization"), as llama.cpp's q2_k ... q6_k store them.

Two data types, named as upstream AutoRound names them:

* ``int_asym_dq`` (q2_k: 2-bit, sub-blocks of 16, 4-bit scales and mins; q4_k / q5_k: 4/5-bit,
  sub-blocks of 32, 6-bit scales and mins): ``w = (d * sc) * q - (dmin * mn)`` with unsigned
  codes ``q``, fp16 super-block ``d`` / ``dmin`` and integer ``sc`` / ``mn``. The sub-block range
  always includes 0 (the min is <= 0), as llama.cpp's quantizer has it.
* ``int_sym_dq`` (q3_k: 3-bit, 6-bit signed scales; q6_k: 6-bit, int8 scales; sub-blocks of 16):
  ``w = (d * sc) * q`` with signed ``q`` in ``[-2**(b-1), 2**(b-1))``; per sub-block the full-range
  symmetric form of ``qdq_int``, and per super-block the sub-scale of largest magnitude maps to the
  most negative scale code (llama.cpp's ``iscale = -32 / max_scale``).

The products are evaluated in float32 in the order ggml and the ``gguf`` package dequantize in,
so the qdq weights equal what a loader reads back from the packed blocks, bit for bit.
QParams hold the effective per-sub-block scale ``d * sc`` in ``scale`` (and ``-(dmin * mn)`` in
``zero`` for the asymmetric type, so ``w = scale * q + zero`` as for ``int_min``), with ``d`` and
``dmin`` in ``super_scale`` / ``super_min`` for the packers.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..schemes import QuantSpec
from .common import QParams, from_groups, grouped_range, round_ste, to_groups, to_scale_dtype

SUPER_BLOCK = 256
# bits -> bits of the sub-block scale codes
ASYM_SCALE_BITS = {2: 4, 4: 6, 5: 6}
SYM_SCALE_BITS = {3: 6, 6: 8}


def _per_super(x: torch.Tensor, group_size: int) -> torch.Tensor:
    return x.reshape(x.shape[0], -1, SUPER_BLOCK // group_size)


def _safe(x: torch.Tensor) -> torch.Tensor:
    # A zero scale (all-zero sub-block or super-block) gives code 0, never NaN
    return torch.where(x == 0, torch.ones_like(x), x)


def _check(w: torch.Tensor) -> None:
    if w.shape[1] % SUPER_BLOCK:
        raise ValueError(
            f"k-quants pack rows in super-blocks of {SUPER_BLOCK}; this weight has {w.shape[1]} inputs "
            "(the plan falls such layers back to a 32-block type)"
        )


def _codes(x: torch.Tensor, es: torch.Tensor, v: Optional[torch.Tensor], gs: int, lo: int, hi: int) -> torch.Tensor:
    """Integer codes of grouped ``x`` under effective sub-block scales ``es``, with rounding offsets."""
    x = x / _safe(es).unsqueeze(-1)
    if v is not None:
        x = x + to_groups(v.float(), gs)
    q = torch.clamp(round_ste(x), lo, hi)
    return torch.where(es.unsqueeze(-1) == 0, torch.zeros_like(q), q)


def qdq_int_asym_dq(
    w: torch.Tensor,
    spec: QuantSpec,
    v: Optional[torch.Tensor] = None,
    min_scale: Optional[torch.Tensor] = None,
    max_scale: Optional[torch.Tensor] = None,
) -> "tuple[torch.Tensor, QParams]":
    _check(w)
    gs, maxq = spec.group_size, 2**spec.bits - 1
    smax = 2 ** ASYM_SCALE_BITS[spec.bits] - 1
    in_f = w.shape[1]
    wg = to_groups(w.float(), gs)
    wmin, wmax = grouped_range(wg, min_scale, max_scale)
    s = (wmax - wmin) / maxq  # >= 0
    m = -wmin  # >= 0
    s3, m3 = _per_super(s, gs), _per_super(m, gs)
    d = to_scale_dtype(s3.amax(dim=-1, keepdim=True) / smax)
    dmin = to_scale_dtype(m3.amax(dim=-1, keepdim=True) / smax)
    sc = torch.clamp(round_ste(s3 / _safe(d)), 0, smax)
    mn = torch.clamp(round_ste(m3 / _safe(dmin)), 0, smax)
    es = (d * sc).reshape_as(s)
    em = (dmin * mn).reshape_as(m)
    q = _codes(wg + em.unsqueeze(-1), es, v, gs, 0, maxq)
    dq = es.unsqueeze(-1) * q - em.unsqueeze(-1)
    qp = QParams(
        scale=es.detach(),
        zero=-em.detach(),
        codes=from_groups(q.detach(), in_f).to(torch.int32),
        bits=spec.bits,
        group_size=gs,
        data_type="int_asym_dq",
        super_scale=d.detach().squeeze(-1),
        super_min=dmin.detach().squeeze(-1),
    )
    return from_groups(dq, in_f).to(w.dtype), qp


def qdq_int_sym_dq(
    w: torch.Tensor,
    spec: QuantSpec,
    v: Optional[torch.Tensor] = None,
    min_scale: Optional[torch.Tensor] = None,
    max_scale: Optional[torch.Tensor] = None,
) -> "tuple[torch.Tensor, QParams]":
    _check(w)
    gs, half = spec.group_size, 2 ** (spec.bits - 1)
    shalf = 2 ** (SYM_SCALE_BITS[spec.bits] - 1)
    in_f = w.shape[1]
    wg = to_groups(w.float(), gs)
    wmin, wmax = grouped_range(wg, min_scale, max_scale)
    # full-range symmetric sub-scale: the larger-magnitude extreme maps to -half
    s = torch.where(wmax < -wmin, -wmin, -wmax) / half
    s3 = _per_super(s, gs)
    idx = s3.abs().argmax(dim=-1, keepdim=True)
    d = to_scale_dtype(torch.gather(s3, -1, idx) / -shalf)
    sc = torch.clamp(round_ste(s3 / _safe(d)), -shalf, shalf - 1)
    es = (d * sc).reshape_as(s)
    q = _codes(wg, es, v, gs, -half, half - 1)
    dq = es.unsqueeze(-1) * q
    qp = QParams(
        scale=es.detach(),
        zero=torch.full_like(es, float(half)).detach(),
        codes=from_groups((q + half).detach(), in_f).to(torch.int32),
        bits=spec.bits,
        group_size=gs,
        data_type="int_sym_dq",
        super_scale=d.detach().squeeze(-1),
    )
    return from_groups(dq, in_f).to(w.dtype), qp
