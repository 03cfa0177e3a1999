"""ggml block packers for the legacy 32-weight block types, from our QParams.

Layouts (llama.cpp ggml-common.h; little-endian):
  * q8_0: fp16 d, 32 x int8 q; w = d * q
  * q4_0: fp16 d, 16 bytes; w = d * (q - 8)
  * q4_1: fp16 d, fp16 m, 16 bytes; w = d * q + m
  * q5_0: fp16 d, uint32 qh (bit j: bit 4 of q[j]), 16 bytes; w = d * (q - 16)
  * q5_1: fp16 d, fp16 m, uint32 qh, 16 bytes; w = d * q + m
where a 16-byte nibble array holds q[j] in the low nibble of byte j and q[j + 16] in the high one.
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
    out_f, in_f = qp.codes.shape
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


# ggml type -> (data_type, bits, symmetric, packer)
BLOCK_PACKERS: dict[str, tuple[str, int, bool, Callable[[QParams], torch.Tensor]]] = {
    "q8_0": ("int", 8, True, lambda qp: _pack_sym(qp, 8)),
    "q4_0": ("int", 4, True, lambda qp: _pack_sym(qp, 4)),
    "q5_0": ("int", 5, True, lambda qp: _pack_sym(qp, 5)),
    "q4_1": ("int_min", 4, False, lambda qp: _pack_min(qp, 4)),
    "q5_1": ("int_min", 5, False, lambda qp: _pack_min(qp, 5)),
}


def pack_blocks(qp: QParams, ggml_type: str) -> torch.Tensor:
    """QParams of an ``[out, in]`` weight -> uint8 ``[out, in / 32 * block_bytes]`` (ggml row layout)."""
    if ggml_type not in BLOCK_PACKERS:
        raise ExportError(f"unknown ggml block type {ggml_type!r}; known: {', '.join(BLOCK_PACKERS)}")
    data_type, bits, sym, packer = BLOCK_PACKERS[ggml_type]
    if qp.data_type != data_type or qp.bits != bits:
        raise ExportError(f"{ggml_type} holds {data_type} {bits}-bit codes; these QParams are {qp.data_type} {qp.bits}-bit")
    out_f = qp.codes.shape[0]
    return packer(qp).reshape(out_f, -1).contiguous()
