"""Floating-point element formats (FP4 E2M1, FP8 E4M3): round to the grid, encode to bits, decode.

Rounding is round-to-nearest-even on each format's grid, the same result as a hardware cast, and
uses a straight-through estimator so tuning gets gradients. Encodings are the bit patterns that
files store: E2M1 as a 4-bit code (sign bit 3, magnitude index in bits 0-2), E4M3 as the byte of
``torch.float8_e4m3fn``.
"""

from __future__ import annotations

import torch

E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MIN_SUBNORMAL = 2.0**-9
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring E2M1 magnitudes, and whether a tie rounds up (to the even code).
_E2M1_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))

# element max and the largest exponent (emax) of each element format, by bits
ELEMENT_MAX = {4: E2M1_MAX, 8: E4M3_MAX}
ELEMENT_EMAX = {4: 2, 8: 8}


def _e2m1_index(mag: torch.Tensor) -> torch.Tensor:
    idx = torch.zeros_like(mag, dtype=torch.uint8)
    for t, tie_up in _E2M1_MIDPOINTS:
        idx += (mag >= t if tie_up else mag > t).to(torch.uint8)
    return idx


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value (saturating at +-6), gradient passed straight through."""
    mag = x.detach().abs().clamp(max=E2M1_MAX)
    table = torch.tensor(E2M1_VALUES, device=x.device, dtype=torch.float32)
    r = table[_e2m1_index(mag).long()] * torch.sign(x.detach())
    return x + (r.to(x.dtype) - x).detach()


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Nearest FP8 E4M3 value (saturating at +-448), gradient passed straight through."""
    r = x.detach().float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    return x + (r.to(x.dtype) - x).detach()


def round_element(x: torch.Tensor, bits: int) -> torch.Tensor:
    return round_e2m1(x) if bits == 4 else round_e4m3(x)


def encode(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Grid values -> uint8 bit patterns (4-bit codes for E2M1, bytes for E4M3)."""
    v = values.detach().float()
    if bits == 4:
        return _e2m1_index(v.abs()) | ((v < 0) | ((v == 0) & torch.signbit(v))).to(torch.uint8) << 3
    return v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


def decode(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 bit patterns -> float32 grid values."""
    c = codes.to(torch.uint8)
    if bits == 4:
        table = torch.tensor(E2M1_VALUES, device=c.device, dtype=torch.float32)
        mag = table[(c & 7).long()]
        return torch.where((c & 8) != 0, -mag, mag)
    return c.view(torch.float8_e4m3fn).float()
