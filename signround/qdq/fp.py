"""Floating-point quantize-dequantize: MXFP4/MXFP8, NVFP4 and FP8 weights.

Same signature and tunable inputs as the int qdq. FP formats are symmetric, so only ``max_scale``
(shrinking each group's absolute maximum) is used; ``min_scale`` is ignored. Codes in the returned
QParams are the element bit patterns (see elements.py), scales are exactly what files store:
powers of two for MX (E8M0), FP8-E4M3 values for NVFP4 group scales (with a float32 per-tensor
global scale, dequantized ``w = code * scale / global_scale``), float32 for FP8.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..schemes import QuantSpec
from .common import QParams, from_groups, to_groups
from .elements import E2M1_MAX, E4M3_MAX, E4M3_MIN_SUBNORMAL, ELEMENT_EMAX, encode, round_e4m3, round_element

E8M0_BIAS = 127


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.floor(x) - x).detach()


def _finish(w, spec, wg, scale, v, stored_scale=None, global_scale=None) -> "tuple[torch.Tensor, QParams]":
    """Divide by the group scale, add the rounding offsets, round to the element grid."""
    in_f = w.shape[1]
    x = wg / scale.unsqueeze(-1)
    if v is not None:
        x = x + to_groups(v.float(), spec.group_size)
    q = round_element(x, spec.bits)
    dq = q * scale.unsqueeze(-1)
    stored_scale = scale if stored_scale is None else stored_scale
    qp = QParams(
        scale=stored_scale.detach(),
        zero=torch.zeros_like(scale.detach()),
        codes=encode(from_groups(q.detach(), in_f), spec.bits),
        bits=spec.bits,
        group_size=spec.group_size,
        data_type=spec.data_type,
        global_scale=None if global_scale is None else global_scale.detach().reshape(1),
    )
    return from_groups(dq, in_f).to(w.dtype), qp


def qdq_mx(
    w: torch.Tensor,
    spec: QuantSpec,
    v: Optional[torch.Tensor] = None,
    min_scale: Optional[torch.Tensor] = None,
    max_scale: Optional[torch.Tensor] = None,
) -> "tuple[torch.Tensor, QParams]":
    """OCP MX: one power-of-two scale per group, ``2**(floor(log2(amax)) - emax_element)``."""
    wg = to_groups(w.float(), spec.group_size)
    amax = wg.abs().amax(-1)
    if max_scale is not None:
        amax = amax * max_scale
    exp = floor_ste(torch.log2(amax.clamp_min(2.0**-126))) - ELEMENT_EMAX[spec.bits]
    scale = torch.exp2(exp.clamp(-E8M0_BIAS, E8M0_BIAS))
    return _finish(w, spec, wg, scale, v)


def qdq_nv(
    w: torch.Tensor,
    spec: QuantSpec,
    v: Optional[torch.Tensor] = None,
    min_scale: Optional[torch.Tensor] = None,
    max_scale: Optional[torch.Tensor] = None,
) -> "tuple[torch.Tensor, QParams]":
    """NVFP4: E2M1 elements, FP8-E4M3 scale per 16, float32 per-tensor global scale.

    The global scale maps the tensor's absolute maximum to 448 * 6 so that group scales use the
    whole FP8 range (the convention of compressed-tensors and vLLM).
    """
    wg = to_groups(w.float(), spec.group_size)
    tensor_amax = w.detach().float().abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
    global_scale = torch.nan_to_num(E4M3_MAX * E2M1_MAX / tensor_amax, nan=1.0, posinf=1.0)
    amax = wg.abs().amax(-1)
    if max_scale is not None:
        amax = amax * max_scale
    s8 = round_e4m3((amax / E2M1_MAX * global_scale).clamp_min(E4M3_MIN_SUBNORMAL))
    return _finish(w, spec, wg, s8 / global_scale, v, s8, global_scale)


def qdq_fp8(
    w: torch.Tensor,
    spec: QuantSpec,
    v: Optional[torch.Tensor] = None,
    min_scale: Optional[torch.Tensor] = None,
    max_scale: Optional[torch.Tensor] = None,
) -> "tuple[torch.Tensor, QParams]":
    """FP8-E4M3 weights with a float32 scale per output channel (group_size -1) or per tensor (0)."""
    wf = w.float()
    if spec.group_size == 0:
        amax = wf.abs().amax().expand(w.shape[0], 1)
        if max_scale is not None:
            amax = amax * max_scale.mean()
    else:
        amax = wf.abs().amax(1, keepdim=True)
        if max_scale is not None:
            amax = amax * max_scale
    scale = (amax / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return _finish(w, spec, to_groups(wf, -1), scale, v)
