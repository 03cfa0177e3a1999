"""Activation fake-quantization (the A of W4A4 / W8A8 schemes), applied to a Linear's input.

Pure function of the input and the spec's ``act_*`` fields; ``amax`` is the static per-tensor range
measured on calibration data (static FP8 scales, NVFP4's global scale). Rounding passes gradients
straight through so tuning sees the activation error without losing the signal.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..schemes import QuantSpec
from .common import round_ste
from .elements import E2M1_MAX, E4M3_MAX, E4M3_MIN_SUBNORMAL, ELEMENT_EMAX, ELEMENT_MAX, round_e4m3, round_element
from .fp import E8M0_BIAS

_TINY = torch.finfo(torch.float32).tiny


def _grouped(x: torch.Tensor, g: int) -> "tuple[torch.Tensor, int]":
    """``[..., k]`` -> ``[..., ceil(k/g), g]`` with zero padding (padding never changes a max)."""
    k = x.shape[-1]
    pad = (-k) % g
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, g), k


def qdq_act(x: torch.Tensor, spec: QuantSpec, amax: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Quantize-dequantize activations ``x`` as ``spec.act_*`` says; returns ``x`` unchanged for A16."""
    if not spec.act_quantized:
        return x
    xf = x.float()
    kind, bits = spec.act_data_type, spec.act_bits
    if kind == "fp":
        if spec.act_dynamic:
            dims = -1 if spec.act_group_size == -1 else tuple(range(xf.dim()))
            a = xf.detach().abs().amax(dim=dims, keepdim=True)
        else:
            a = amax.to(xf.device).float()
        scale = (a / E4M3_MAX).clamp_min(_TINY)
        return (round_e4m3(xf / scale) * scale).to(x.dtype)
    if kind == "int":  # symmetric int8 per token: scale = amax / 127
        scale = (xf.detach().abs().amax(-1, keepdim=True) / 127).clamp_min(_TINY)
        return (torch.clamp(round_ste(xf / scale), -128, 127) * scale).to(x.dtype)
    xg, k = _grouped(xf, spec.act_group_size)
    gmax = xg.detach().abs().amax(-1, keepdim=True)
    if kind == "mx_fp":
        exp = torch.floor(torch.log2(gmax.clamp_min(2.0**-126))) - ELEMENT_EMAX[bits]
        scale = torch.exp2(exp.clamp(-E8M0_BIAS, E8M0_BIAS))
    elif kind == "mx_fp_rceil":
        exp = torch.ceil(torch.log2((gmax / ELEMENT_MAX[bits]).clamp_min(2.0**-127)))
        scale = torch.exp2(exp.clamp(-E8M0_BIAS, E8M0_BIAS))
    else:  # nv_fp: FP8 group scales under a per-tensor global scale
        t = (amax.to(xf.device).float() if amax is not None else xf.detach().abs().amax()).clamp_min(_TINY)
        global_scale = E4M3_MAX * E2M1_MAX / t
        s8 = round_e4m3((gmax / E2M1_MAX * global_scale).clamp_min(E4M3_MIN_SUBNORMAL))
        scale = s8 / global_scale
    dq = round_element(xg / scale, bits) * scale
    return dq.reshape(*xf.shape[:-1], -1)[..., :k].to(x.dtype)
