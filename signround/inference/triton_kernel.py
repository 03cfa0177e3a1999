"""A Triton kernel that fuses unpacking 2/4/8-bit codes with the matmul (CUDA; CPU in interpreter mode).

``y = x @ W^T`` with ``W[n, k] = q[k, n] * s[g(k), n] - zs[g(k), n]``, ``g(k) = k // group_size``:
codes stay packed in int32 words along the input dimension (the GPTQ row layout), so every word
is read once per output tile, and the per-group ``zs = zero * scale`` is precomputed so the inner
loop is one multiply-subtract. Any group size works (a short last group included) because the
scale row is gathered per input index. AWQ-packed layers are repacked into this layout once, at
preparation. With ``TRITON_INTERPRET=1`` Triton runs the same kernel on CPU tensors, which is how
the tests check its numerics on machines without a GPU.
"""

from __future__ import annotations

import os
from functools import lru_cache
import torch

from ..export.packing import pack_rows
from .packed import PackedLayer

BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 64  # tl.dot needs >= 16 in every dimension


def missing() -> str | None:
    """None when Triton can be imported, else what to install."""
    import importlib.util

    return None if importlib.util.find_spec("triton") else "triton (pip install 'signround[triton]')"


# The kernel body's names, bound on first use (importing triton costs time every CLI run would pay);
# the annotations stay strings (postponed evaluation), so defining the body needs no triton.
triton = tl = None


def _qmatmul(x_ptr, qw_ptr, s_ptr, zs_ptr, y_ptr, M, N, K, group_size, stride_xm, stride_ym,
             BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             IEEE: tl.constexpr):
    PER_WORD: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        kn_mask = kmask[:, None] & (rn[None, :] < N)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        words = tl.load(qw_ptr + (rk // PER_WORD)[:, None] * N + rn[None, :], mask=kn_mask, other=0)
        q = (words >> ((rk % PER_WORD) * BITS)[:, None]) & MASK  # the mask drops sign-extended bits
        g = rk // group_size
        s = tl.load(s_ptr + g[:, None] * N + rn[None, :], mask=kn_mask, other=0.0)
        zs = tl.load(zs_ptr + g[:, None] * N + rn[None, :], mask=kn_mask, other=0.0)
        w = q.to(tl.float32) * s - zs
        if IEEE:  # fp32 inputs: no TF32 rounding, so results match the reference
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@lru_cache(maxsize=2)
def _kernel(interpret: bool):
    # wrapped on first use, per mode: triton.jit reads TRITON_INTERPRET when it wraps
    global triton, tl
    import triton
    import triton.language as tl

    return triton.jit(_qmatmul)


def prepare(layer: PackedLayer, device: torch.device, dtype: torch.dtype) -> dict:
    """Codes repacked along the input dimension; scales and zero*scale in fp32 (the kernel
    dequantizes in fp32 and casts to the input dtype for the dot)."""
    codes, zeros = layer.unpack()  # [in, out], [groups, out]
    s = layer.scales.float()
    return {
        "qw": pack_rows(codes.to(torch.int32), layer.bits).to(device).contiguous(),
        "s": s.to(device).contiguous(),
        "zs": (zeros.float() * s).to(device).contiguous(),
    }


def matmul(layer: PackedLayer, state: dict, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    m, n = x2.shape[0], layer.out_features
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    kernel = _kernel(interpret)
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    kernel[grid](
        x2, state["qw"], state["s"], state["zs"], y, m, n, layer.in_features, layer.group_size,
        x2.stride(0), y.stride(0), BITS=layer.bits, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        # fp32 inputs: an exact fp32 dot (no TF32). Triton's interpreter computes bf16 dots wrongly
        # (numpy has no bf16), so interpreted bf16 runs the fp32 dot; fp16 tests the half-precision dot.
        IEEE=x.dtype == torch.float32 or (interpret and x.dtype == torch.bfloat16))
    y = y.reshape(*shape[:-1], n)
    return y if layer.bias is None else y + layer.bias.to(x.dtype)
