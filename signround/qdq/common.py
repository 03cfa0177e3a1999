"""Shared pieces of the qdq functions: grouping with a short last group, QParams, STE rounding."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

# Scales are stored as fp16 on disk; quantizing with the fp16-rounded scale makes the in-memory qdq
# weight equal to what a loader dequantizes from the file.
SCALE_DTYPE = torch.float16
MIN_SCALE_MAGNITUDE = 1e-5  # an all-zero group would otherwise give scale 0 and NaN codes


@dataclass
class QParams:
    """Quantization parameters of one weight ``[out, in]``.

    ``scale`` and ``zero`` are ``[out, n_groups]``; ``zero`` holds integers (as float). For int,
    ``codes`` are the unsigned integer weights ``[out, in]`` in ``[0, 2**bits)``; dequantized
    ``w = (codes - zero) * scale`` with the scale of the column's group. For floating-point data
    types ``codes`` are element bit patterns and ``w = value(code) * scale`` (``/ global_scale``).
    """

    scale: torch.Tensor
    zero: torch.Tensor
    codes: torch.Tensor
    bits: int
    group_size: int
    data_type: str = "int"
    global_scale: Optional[torch.Tensor] = None  # NVFP4: w = code * scale / global_scale
    input_amax: Optional[torch.Tensor] = None  # static activation range seen in calibration
    # ggml k-quants: fp16 super-block scale d (and min scale dmin) ``[out, n_super]``; ``scale`` /
    # ``zero`` then hold the effective d * sc and -(dmin * mn) of each sub-block
    super_scale: Optional[torch.Tensor] = None
    super_min: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        pass  # a hook for PackedQParams (dataclasses call it only when the base defines one)

    @property
    def shape(self) -> torch.Size:
        """The weight's shape ``[out, in]`` (without unpacking packed codes)."""
        return self.codes.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = self.codes
        out_features, in_features = codes.shape
        gs = effective_group_size(self.group_size, in_features)
        if self.data_type in ("int", "int_sym_dq", "int_min", "int_asym_dq") and in_features % gs == 0:
            # whole groups: broadcast per group instead of gathering [out, in] scale/zero copies
            c = codes.float().view(out_features, -1, gs)
            s, z = self.scale.float().unsqueeze(-1), self.zero.float().unsqueeze(-1)
            w = (c - z) * s if self.data_type in ("int", "int_sym_dq") else s * c + z
            return w.view(out_features, in_features).to(dtype)
        cols = torch.arange(in_features, device=codes.device) // gs
        if self.data_type in ("int", "int_sym_dq"):
            w = (codes.float() - self.zero.float()[:, cols]) * self.scale.float()[:, cols]
        elif self.data_type in ("int_min", "int_asym_dq"):
            w = self.scale.float()[:, cols] * codes.float() + self.zero.float()[:, cols]
        else:
            from .elements import decode

            scale = self.scale.float()
            if self.global_scale is not None:  # the same arithmetic as qdq_nv, for bit-equal weights
                scale = scale / self.global_scale.float()
            w = decode(codes, self.bits) * scale[:, cols]
        return w.to(dtype)


PACKABLE_BITS = (1, 2, 4)  # widths that fill a byte exactly


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[out, in]`` in ``[0, 2**bits)`` -> ``[out, ceil(in / (8 // bits))]`` bytes, code
    ``k`` of each run of ``8 // bits`` in bits ``[k * bits, (k + 1) * bits)``. No wider temporaries
    than the codes themselves (a 70B layer's int64 copy would be gigabytes)."""
    per = 8 // bits
    out_f, in_f = codes.shape
    pad = -in_f % per
    c = codes.to(torch.uint8)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.view(out_f, -1, per)
    packed = c[..., 0].clone()
    for k in range(1, per):
        packed |= c[..., k] << (k * bits)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes ``[out, in_features]``."""
    per, mask = 8 // bits, (1 << bits) - 1
    parts = [(packed >> (k * bits)) & mask for k in range(per)]
    return torch.stack(parts, dim=-1).view(packed.shape[0], -1)[:, :in_features].contiguous()


class PackedQParams(QParams):
    """QParams whose codes are held bit-packed (2 or 4 per byte for W4 / W2) and unpacked on read.

    Tuned layers keep their QParams until export: at one byte per weight the codes of a model's
    blocks add half (W2: three quarters) more than the packed file will hold. Reading ``codes``
    costs an unpack, so exporters read it once per layer and use ``shape`` for checks.
    """

    @property  # type: ignore[override]
    def codes(self) -> torch.Tensor:
        return unpack_codes(self._packed, self.bits, self._shape[1])

    @codes.setter
    def codes(self, value: torch.Tensor) -> None:
        self._raw = value  # packed in __post_init__, once ``bits`` is set

    def __post_init__(self) -> None:
        raw = self.__dict__.pop("_raw")
        if self.bits not in PACKABLE_BITS:
            raise ValueError(f"PackedQParams holds 1, 2 or 4-bit codes, not {self.bits}-bit")
        if raw.numel() and int(raw.max()) >= 1 << self.bits:
            raise ValueError(f"codes out of range for {self.bits}-bit packing")
        self._shape = raw.shape
        self._packed = pack_codes(raw, self.bits)

    @property
    def shape(self) -> torch.Size:
        return self._shape


def effective_group_size(group_size: int, in_features: int) -> int:
    # -1: one group per output channel; 0: per tensor, laid out per channel (FP8 weights)
    return in_features if group_size <= 0 else group_size


def n_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / effective_group_size(group_size, in_features))


def to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, in]`` -> ``[out, n_groups, G]``; the short last group is padded with zeros.

    Zero padding never changes a group's range because ranges always include 0.
    """
    out_f, in_f = w.shape
    g = effective_group_size(group_size, in_f)
    ng = math.ceil(in_f / g)
    pad = ng * g - in_f
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(out_f, ng, g)


def from_groups(wg: torch.Tensor, in_features: int) -> torch.Tensor:
    return wg.reshape(wg.shape[0], -1)[:, :in_features]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def to_scale_dtype(x: torch.Tensor, dtype: torch.dtype = SCALE_DTYPE) -> torch.Tensor:
    # The cast is differentiable; the value is the one that will be stored on disk.
    return x.to(dtype).to(torch.float32)


def grouped_range(
    wg: torch.Tensor,
    min_scale: Optional[torch.Tensor],
    max_scale: Optional[torch.Tensor],
) -> "tuple[torch.Tensor, torch.Tensor]":
    """Per-group (min <= 0, max >= 0), shrunk by the tunable clipping scales."""
    wmin = torch.clamp(wg.amin(dim=-1), max=0)
    wmax = torch.clamp(wg.amax(dim=-1), min=0)
    if min_scale is not None:
        wmin = wmin * min_scale
    if max_scale is not None:
        wmax = wmax * max_scale
    return wmin, wmax
