"""ggml block packers for the legacy 32-weight block types, from our QParams.

Layouts (llama.cpp ggml-common.h; little-endian):
  * q8_0: fp16 d, 32 x int8 q; w = d * q
  * q4_0: fp16 d, 16 bytes; w = d * (q - 8)
  * q4_1: fp16 d, fp16 m, 16 bytes; w = d * q + m
  * q5_0: fp16 d, uint32 qh (bit j: bit 4 of q[j]), 16 bytes; w = d * (q - 16)
  * q5_1: fp16 d, fp16 m, uint32 qh, 16 bytes; w = d * q + m
where a 16-byte nibble array holds q[j] in the low nibble of byte j and q[j + 16] in the high one.

k-quants, super-blocks of 256 weights, element e of a super-block (llama.cpp ggml-common.h):
  * q2_k: 16 bytes scales (sc | mn << 4, sub-blocks of 16), 64 bytes qs, fp16 d, fp16 dmin;
    qs byte 32h + l holds e = 128h + 32s + l in bits 2s..2s+1
  * q3_k: 32 bytes hmask (bit s of byte l: bit 2 of e = 32s + l), 64 bytes qs (low 2 bits, as
    q2_k), 12 bytes 6-bit scales (+32), fp16 d; w = d * sc * (code - 4)
  * q4_k: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins (sub-blocks of 32), 128 bytes qs:
    byte 32c + l holds e = 64c + l (low nibble) and 64c + 32 + l (high nibble)
  * q5_k: as q4_k with 32 bytes qh (bit s of byte l: bit 4 of e = 32s + l) before qs
  * q6_k: 128 bytes ql (byte 64h + i: e = 128h + i low nibble, 128h + 64 + i high nibble),
    64 bytes qh (byte 32h + l: bits 2j.. of e = 128h + 32j + l), 16 int8 scales, fp16 d;
    w = d * sc * (code - 32)
The codes and scales come straight from the qdq functions (int symmetric full-range for the
``_0`` types, int with a float minimum for the ``_1`` types), so the packed blocks dequantize to
exactly the tuned weights.
"""

from __future__ import annotations

from typing import Callable

import torch

from ...errors import ExportError
from ...qdq import QParams

BLOCK = 32


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """``[n, 32]`` codes -> ``[n, 16]`` bytes: low nibble q[j], high nibble q[j + 16]."""
    q = q.to(torch.uint8)
    return (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """Bit 4 of each of the 32 codes as one little-endian uint32 -> ``[n, 4]`` bytes."""
    bits = ((q.to(torch.int64) >> 4) & 1) << torch.arange(BLOCK, dtype=torch.int64)
    word = bits.sum(dim=1)
    return torch.stack([(word >> (8 * i)) & 0xFF for i in range(4)], dim=1).to(torch.uint8)


def _blocks(qp: QParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes ``[n_blocks, 32]`` and per-block scale and zero/min, rows first (ggml's order)."""
    out_f, in_f = qp.shape
    if in_f % BLOCK or qp.group_size != BLOCK:
        raise ExportError(
            f"ggml legacy blocks need group size 32 and in_features divisible by 32; got group size "
            f"{qp.group_size} and {in_f} inputs"
        )
    return qp.codes.reshape(-1, BLOCK), qp.scale.reshape(-1), qp.zero.reshape(-1)


def _pack_sym(qp: QParams, bits: int) -> torch.Tensor:
    q, d, _ = _blocks(qp)
    if bits == 8:
        body = (q.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)
        return torch.cat([_f16_bytes(d), body], dim=1)
    if bits == 4:
        return torch.cat([_f16_bytes(d), _nibbles(q)], dim=1)
    return torch.cat([_f16_bytes(d), _high_bits(q), _nibbles(q)], dim=1)


def _pack_min(qp: QParams, bits: int) -> torch.Tensor:
    q, d, m = _blocks(qp)
    parts = [_f16_bytes(d), _f16_bytes(m)]
    if bits == 5:
        parts.append(_high_bits(q))
    parts.append(_nibbles(q))
    return torch.cat(parts, dim=1)


SUPER = 256


def _super(qp: QParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes ``[n_super, 256]`` and integer sub-block scale / min codes ``[n_super, 256 / G]``,
    recovered from the effective scales (exact: ``scale == d * sc`` in float32)."""
    out_f, in_f = qp.shape
    if in_f % SUPER or qp.super_scale is None:
        raise ExportError(f"k-quant blocks need in_features divisible by {SUPER} and double-quantized QParams")
    per = SUPER // qp.group_size
    d = qp.super_scale.float().reshape(-1, 1)
    sc = _codes_of(qp.scale.float().reshape(-1, per), d)
    mn = None
    if qp.super_min is not None:
        mn = _codes_of(-qp.zero.float().reshape(-1, per), qp.super_min.float().reshape(-1, 1))
    return qp.codes.reshape(-1, SUPER).to(torch.int64), sc, mn


def _codes_of(eff: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    safe = torch.where(d == 0, torch.ones_like(d), d)
    c = torch.round(eff / safe)
    if not torch.equal(d * c, eff):
        raise ExportError("k-quant scales are not d * integer; these QParams did not come from the k-quant qdq")
    return c.to(torch.int64)


def _planes(q: torch.Tensor, rows: int, cols: int, width: int) -> torch.Tensor:
    """Spread small codes over bytes, chunk by chunk: each chunk of ``rows * cols`` codes becomes
    ``cols`` bytes, code ``r * cols + c`` of the chunk at bits ``width * r`` of byte ``c``."""
    q = q.reshape(q.shape[0], -1, rows, cols)
    packed = sum(((q[:, :, r] & ((1 << width) - 1)) << (width * r)) for r in range(rows))
    return packed.reshape(q.shape[0], -1).to(torch.uint8)


def _scales_k4(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins -> 12 bytes (q4_k / q5_k layout)."""
    lo = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    mid = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return torch.cat([lo, mid, hi], dim=1).to(torch.uint8)


def _pack_q2_k(qp: QParams) -> torch.Tensor:
    q, sc, mn = _super(qp)
    scales = (sc | (mn << 4)).to(torch.uint8)
    return torch.cat([scales, _planes(q, 4, 32, 2), _f16_bytes(qp.super_scale), _f16_bytes(qp.super_min)], dim=1)


def _pack_q3_k(qp: QParams) -> torch.Tensor:
    q, sc, _ = _super(qp)  # codes 0..7 = value + 4; the hmask bit is bit 2 of the code
    u = sc + 32  # 6-bit: low nibbles two to a byte, then the high 2 bits four to a byte
    scales = torch.cat([_planes(u, 2, 8, 4), _planes(u >> 4, 4, 4, 2)], dim=1)
    return torch.cat([_planes(q >> 2, 8, 32, 1), _planes(q, 4, 32, 2), scales, _f16_bytes(qp.super_scale)], dim=1)


def _pack_q45_k(qp: QParams, bits: int) -> torch.Tensor:
    q, sc, mn = _super(qp)
    parts = [_f16_bytes(qp.super_scale), _f16_bytes(qp.super_min), _scales_k4(sc, mn)]
    if bits == 5:
        parts.append(_planes(q >> 4, 8, 32, 1))
    parts.append(_planes(q, 2, 32, 4))
    return torch.cat(parts, dim=1)


def _pack_q6_k(qp: QParams) -> torch.Tensor:
    q, sc, _ = _super(qp)  # codes 0..63 = value + 32
    scales = sc.to(torch.int8).view(torch.uint8)
    return torch.cat([_planes(q, 2, 64, 4), _planes(q >> 4, 4, 32, 2), scales, _f16_bytes(qp.super_scale)], dim=1)


# ggml type -> (data_type, bits, symmetric, packer)
BLOCK_PACKERS: dict[str, tuple[str, int, bool, Callable[[QParams], torch.Tensor]]] = {
    "q8_0": ("int", 8, True, lambda qp: _pack_sym(qp, 8)),
    "q4_0": ("int", 4, True, lambda qp: _pack_sym(qp, 4)),
    "q5_0": ("int", 5, True, lambda qp: _pack_sym(qp, 5)),
    "q4_1": ("int_min", 4, False, lambda qp: _pack_min(qp, 4)),
    "q5_1": ("int_min", 5, False, lambda qp: _pack_min(qp, 5)),
    "q2_k": ("int_asym_dq", 2, False, _pack_q2_k),
    "q3_k": ("int_sym_dq", 3, True, _pack_q3_k),
    "q4_k": ("int_asym_dq", 4, False, lambda qp: _pack_q45_k(qp, 4)),
    "q5_k": ("int_asym_dq", 5, False, lambda qp: _pack_q45_k(qp, 5)),
    "q6_k": ("int_sym_dq", 6, True, _pack_q6_k),
}


def pack_blocks(qp: QParams, ggml_type: str) -> torch.Tensor:
    """QParams of an ``[out, in]`` weight -> uint8 ``[out, in / 32 * block_bytes]`` (ggml row layout)."""
    if ggml_type not in BLOCK_PACKERS:
        raise ExportError(f"unknown ggml block type {ggml_type!r}; known: {', '.join(BLOCK_PACKERS)}")
    data_type, bits, sym, packer = BLOCK_PACKERS[ggml_type]
    if qp.data_type != data_type or qp.bits != bits:
        raise ExportError(f"{ggml_type} holds {data_type} {bits}-bit codes; these QParams are {qp.data_type} {qp.bits}-bit")
    out_f = qp.shape[0]
    return packer(qp).reshape(out_f, -1).contiguous()
