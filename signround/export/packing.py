"""Bit packing of integer codes into int32 words (GPTQ and AWQ layouts), and the inverse.

GPTQ packs along one dimension as a little-endian bitstream: value ``k`` of a run occupies bits
``[k*bits, (k+1)*bits)``, so 3-bit values straddle word boundaries (32 values in three words).
When the packed dimension is not a multiple of ``32/bits`` values, the last word is zero-padded.
AWQ packs 4-bit values along the output dimension, eight per word, in the order 0,2,4,6,1,3,5,7.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ExportError
from ..qdq import QParams

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds column AWQ_ORDER[i] of each run of eight
AWQ_REVERSE = tuple(AWQ_ORDER.index(c) for c in range(8))  # column c lives in nibble AWQ_REVERSE[c]
_MASK32 = 0xFFFFFFFF


def packed_len(n: int, bits: int) -> int:
    return math.ceil(n * bits / 32)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> the same bits as int32."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[R, C]`` codes in ``[0, 2**bits)`` along dim 0 into int32 ``[ceil(R*bits/32), C]``."""
    r, c = codes.shape
    codes = codes.contiguous()  # one pass over memory for the range check (transposed views are slow)
    if codes.numel():
        lo, hi = torch.aminmax(codes)
        if int(lo) < 0 or int(hi) >= 2**bits:
            raise ValueError(f"codes out of range for {bits}-bit packing")
    if 32 % bits == 0:  # 2/4/8 bits: whole values per word, one shift per position in the word
        per = 32 // bits
        rp = math.ceil(r / per) * per
        x = torch.zeros(rp, c, dtype=torch.int64, device=codes.device)
        x[:r] = codes.to(torch.int64)
        x = x.view(rp // per, per, c)
        out = x[:, 0].clone()
        for k in range(1, per):
            out |= x[:, k] << (k * bits)
        return _to_int32(out)
    rp = math.ceil(r / 32) * 32  # 32 values always fill a whole number of words
    x = torch.zeros(rp, c, dtype=torch.int64, device=codes.device)
    x[:r] = codes.to(torch.int64)
    x = x.view(rp // 32, 32, c)
    out = torch.zeros(rp // 32, bits, c, dtype=torch.int64, device=codes.device)
    for k in range(32):
        word, shift = divmod(k * bits, 32)
        out[:, word] |= (x[:, k] << shift) & _MASK32
        if shift + bits > 32:  # spill the high bits into the next word
            out[:, word + 1] |= x[:, k] >> (32 - shift)
    return _to_int32(out.reshape(-1, c)[: packed_len(r, bits)])


def unpack_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 ``[W, C]`` -> int32 codes ``[rows, C]``."""
    w, c = packed.shape
    if 32 % bits == 0:  # whole values per word
        per = 32 // bits
        x = packed.to(torch.int32)  # arithmetic shifts copy the sign bit; the mask drops those bits
        out = torch.stack([(x >> (k * bits)) & (2**bits - 1) for k in range(per)], dim=1)  # [w, per, c]
        return out.reshape(-1, c)[:rows]
    chunks = math.ceil(rows / 32)
    x = torch.zeros(chunks * bits, c, dtype=torch.int64, device=packed.device)
    x[:w] = packed.to(torch.int64) & _MASK32
    x = x.view(chunks, bits, c)
    mask = 2**bits - 1
    out = torch.empty(chunks, 32, c, dtype=torch.int64, device=packed.device)
    for k in range(32):
        word, shift = divmod(k * bits, 32)
        val = x[:, word] >> shift
        if shift + bits > 32:
            val = val | (x[:, word + 1] << (32 - shift))
        out[:, k] = val & mask
    return out.reshape(-1, c)[:rows].to(torch.int32)


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along dim 1 (GPTQ ``qzeros``): ``[R, C]`` -> ``[R, ceil(C*bits/32)]``."""
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    return unpack_rows(packed.t(), bits, cols).t().contiguous()


def _awq_permute(codes: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    r, c = codes.shape
    cp = math.ceil(c / 8) * 8
    x = torch.zeros(r, cp, dtype=codes.dtype, device=codes.device)
    x[:, :c] = codes
    return x.view(r, cp // 8, 8)[:, :, list(order)].reshape(r, cp)


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """AWQ 4-bit: ``[R, C]`` -> int32 ``[R, ceil(C/8)]``, interleaved nibble order."""
    return pack_cols(_awq_permute(codes, AWQ_ORDER), 4)


def unpack_awq(packed: torch.Tensor, cols: int) -> torch.Tensor:
    x = unpack_cols(packed, 4, packed.shape[1] * 8)
    return _awq_permute(x, AWQ_REVERSE)[:, :cols]


@dataclass(frozen=True)
class Packing:
    layout: str  # "gptq" or "awq"
    zero_offset: int  # added to the zero point before storing (-1: legacy GPTQ convention)


PACKINGS: dict[str, Packing] = {
    "auto_round:auto_gptq": Packing("gptq", -1),
    "auto_round": Packing("gptq", 0),
    "auto_round:auto_awq": Packing("awq", 0),
}


def pack_layer(qp: QParams, packing: str, scale_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """QParams -> ``qweight`` / ``qzeros`` / ``scales`` tensors of the given packing format (scales
    in ``scale_dtype``, the dtype the qdq rounded them to)."""
    p = PACKINGS[packing]
    codes = qp.codes.t()  # [in, out], in their small dtype (the packers widen them)
    zeros = qp.zero.round().to(torch.int64).t() + p.zero_offset  # [n_groups, out]
    if int(zeros.min()) < 0:
        raise ExportError(
            f"a zero point of 0 cannot be stored with packing {packing!r} (zero minus one); "
            "this is a bug in packing selection, please report it"
        )
    if p.layout == "gptq":
        qweight, qzeros = pack_rows(codes, qp.bits), pack_cols(zeros, qp.bits)
    else:
        qweight, qzeros = pack_awq(codes), pack_awq(zeros)
    return {"qweight": qweight, "qzeros": qzeros, "scales": qp.scale.t().contiguous().to(scale_dtype)}
