"""ggml block packers (legacy 32-blocks and k-quant 256-super-blocks): our packed blocks, dequantized
by the gguf package, equal our qdq weights."""

import numpy as np
import pytest
import torch

from signround.errors import ExportError
from signround.export.gguf import BLOCK_PACKERS, pack_blocks
from signround.qdq import qdq
from signround.schemes import GGML_SPECS, QuantSpec

gguf = pytest.importorskip("gguf", reason="pip install gguf (the gguf extra)")


def weights() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 512, generator=g)
    w[0, :256] = 0.0  # an all-zero (super-)block
    w[5, 272:288] = 0.0  # an all-zero sub-block inside a non-zero super-block
    w[1, 32:64] = 0.01 * torch.randn(32, generator=g)
    w[1, 40] = 25.0  # one outlier
    w[2, :32] = -torch.rand(32, generator=g) - 0.1  # negative only
    w[3, 64:96] = torch.rand(32, generator=g) + 2.0  # positive only, away from 0
    w[4] = w[4] * 1e-3  # small magnitudes: fp16 scales near their lower range
    return w


@pytest.mark.parametrize("ggml_type", sorted(BLOCK_PACKERS))
def test_blocks_dequantize_in_gguf_to_our_qdq(ggml_type):
    w = weights()
    dq, qp = qdq(w, GGML_SPECS[ggml_type])
    packed = pack_blocks(qp, ggml_type).numpy()
    qtype = getattr(gguf.GGMLQuantizationType, ggml_type.upper())
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    assert packed.shape == (6, 512 // block * nbytes)
    theirs = gguf.quants.dequantize(packed, qtype)
    np.testing.assert_array_equal(theirs, dq.numpy())
    assert torch.equal(qp.dequantize(), dq)
    assert np.all(theirs[0, :256] == 0)
    assert (dq - w).abs().max() < 0.7 * (w.abs().max())  # a sanity bound: codes are not garbage


def test_q4_k_double_quantization_by_hand():
    # sub-block j holds 0 .. j+1: min 0 (dmin 0), scale (j+1)/15; d = max scale / 63 in fp16 and
    # each sub-scale code is round(scale / d)
    w = torch.cat([torch.linspace(0, j + 1, 32) for j in range(8)]).reshape(1, 256)
    dq, qp = qdq(w, GGML_SPECS["q4_k"])
    d = torch.tensor(8 / 15 / 63).half().float()
    assert qp.super_scale.item() == d.item() and qp.super_min.item() == 0.0
    sc = torch.round(torch.arange(1, 9) / 15 / d)
    assert torch.equal(qp.scale.reshape(-1), d * sc)
    b = pack_blocks(qp, "q4_k")[0, 4:16].to(torch.int64)  # after fp16 d and dmin: the 12 scale bytes
    sc = sc.to(torch.int64)
    assert torch.equal(b[:4] & 63, sc[:4]) and torch.equal(b[:4] >> 6, sc[4:] >> 4)  # codes 0..3 (+ 4..7 high)
    assert torch.equal(b[8:] & 0xF, sc[4:] & 0xF) and torch.equal(b[4:8], torch.zeros(4, dtype=torch.int64))


def test_q6_k_largest_sub_scale_maps_to_minus_128():
    w = torch.randn(1, 256, generator=torch.Generator().manual_seed(1))
    w[0, 100] = -20.0  # sub-block 6 owns the largest magnitude, negative: its scale is positive
    _, qp = qdq(w, GGML_SPECS["q6_k"])
    scales = pack_blocks(qp, "q6_k")[0, 192:208].view(torch.int8)
    assert scales[6].item() == -128 and qp.scale[0, 6].item() == pytest.approx(20.0 / 32, rel=1e-3)


def test_q4_0_block_by_hand():
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1], w[0, 16] = -8.0, 3.0, 1.0  # larger magnitude -8 -> d = 1, q = x + 8
    _, qp = qdq(w, QuantSpec(4, 32, True, "int"))
    b = pack_blocks(qp, "q4_0")[0]
    assert b[:2].view(torch.float16).item() == 1.0
    assert b[2].item() == 0x90  # q[0] = 0 low, q[16] = 9 high
    assert b[3].item() == 0x8B  # q[1] = 11 low, q[17] = 8 high


def test_int_min_uses_the_true_range():
    w = torch.linspace(2.0, 5.0, 32).reshape(1, 32)
    dq, qp = qdq(w, QuantSpec(4, 32, False, "int_min"))
    assert qp.zero.item() == 2.0 and qp.scale.item() == pytest.approx(0.2, abs=1e-3)
    assert (dq - w).abs().max() <= qp.scale.item() / 2 + 1e-6


def test_packer_refuses_what_it_cannot_hold():
    _, qp = qdq(torch.randn(2, 48), QuantSpec(4, 32, True, "int"))
    with pytest.raises(ExportError, match="divisible by 32"):
        pack_blocks(qp, "q4_0")
    _, qp = qdq(torch.randn(2, 64), QuantSpec(4, 32, True, "int"))
    with pytest.raises(ExportError, match="q4_1 holds int_min"):
        pack_blocks(qp, "q4_1")
