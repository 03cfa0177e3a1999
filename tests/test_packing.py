"""Bit packing: golden values and exact round trips."""

import pytest
import torch

from signround.export.packing import PACKINGS, pack_layer
from signround.export.packing import pack_awq, pack_cols, pack_rows, unpack_awq, unpack_cols, unpack_rows
from signround.inference.qlinear import QuantLinear
from signround.qdq import qdq
from signround.schemes import QuantSpec


def u32(x: int) -> int:
    return x & 0xFFFFFFFF


def test_golden_4bit_low_bits_first():
    codes = torch.arange(8).view(8, 1)  # values 0..7 down the input dimension
    assert u32(pack_rows(codes, 4)[0, 0].item()) == 0x76543210


def test_golden_2bit_and_8bit():
    assert u32(pack_rows(torch.tensor([[1], [2], [3]] + [[0]] * 13), 2)[0, 0].item()) == 0b111001
    assert u32(pack_rows(torch.tensor([[0xAB], [0xCD], [0x01], [0xFF]]), 8)[0, 0].item()) == 0xFF01CDAB


def test_golden_3bit_straddles_words():
    codes = torch.zeros(32, 1, dtype=torch.long)
    codes[10] = 0b111  # bits 30..32: two low bits end word 0, the high bit starts word 1
    codes[21] = 0b101  # bits 63..65: one low bit ends word 1, two high bits start word 2
    p = pack_rows(codes, 3)
    assert p.shape == (3, 1)
    assert [u32(x) for x in p[:, 0].tolist()] == [0xC0000000, 0x80000001, 0x2]


def test_golden_awq_order():
    codes = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]])
    # nibble i holds column (0,2,4,6,1,3,5,7)[i]
    assert u32(pack_awq(codes)[0, 0].item()) == 0x75316420


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows", [1, 31, 32, 80, 172, 576])
def test_round_trip_rows_and_cols(bits, rows):
    g = torch.Generator().manual_seed(rows * bits)
    codes = torch.randint(0, 2**bits, (rows, 5), generator=g)
    assert torch.equal(unpack_rows(pack_rows(codes, bits), bits, rows), codes.int())
    assert torch.equal(unpack_cols(pack_cols(codes.t(), bits), bits, rows), codes.t().int())


@pytest.mark.parametrize("cols", [8, 20, 64, 172])
def test_round_trip_awq(cols):
    codes = torch.randint(0, 16, (3, cols))
    assert torch.equal(unpack_awq(pack_awq(codes), cols), codes.int())


@pytest.mark.parametrize("packing", sorted(PACKINGS))
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_pack_then_quantlinear_dequantizes_to_qdq(packing, bits, sym):
    if PACKINGS[packing].layout == "awq" and bits != 4:
        pytest.skip("AWQ holds 4-bit only")
    if packing == "auto_round:auto_gptq" and not sym:
        pytest.skip("zero-minus-one packing is only chosen for symmetric layers")
    torch.manual_seed(bits)
    out_f, in_f, gs = 20, 172, 32  # short last group (172 = 5*32 + 12), odd output count
    w = torch.randn(out_f, in_f)
    dq, qp = qdq(w, QuantSpec(bits=bits, group_size=gs, sym=sym))
    ql = QuantLinear(in_f, out_f, bits, gs, packing, bias=False, dtype=torch.float32)
    for k, t in pack_layer(qp, packing).items():
        assert getattr(ql, k).shape == t.shape, k
        setattr(ql, k, t)
    assert torch.equal(ql.dequantize_weight(), dq)
    x = torch.randn(3, in_f)
    torch.testing.assert_close(ql(x), x @ dq.t())


# In-memory code packing (QParams of tuned layers until export)


def test_pack_codes_golden_low_bits_first():
    from signround.qdq.common import pack_codes

    assert pack_codes(torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8), 2).tolist() == [[0b00111001, 0b11]]
    assert pack_codes(torch.tensor([[0xA, 0x5]], dtype=torch.uint8), 4).tolist() == [[0x5A]]


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("in_f", [8, 13, 64])
def test_pack_codes_round_trip(bits, in_f):
    from signround.qdq.common import pack_codes, unpack_codes

    codes = torch.randint(0, 2**bits, (5, in_f), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-in_f * bits // 8))
    assert torch.equal(unpack_codes(packed, bits, in_f), codes)


@pytest.mark.parametrize("bits,packed", [(2, True), (4, True), (3, False), (8, False)])
def test_compact_qparams_pack_codes_and_keep_every_value(bits, packed):
    """Tuned layers hold compact QParams until export: same codes, scales and dequantized weight
    as the qdq function's, in a quarter (W2) or half (W4) of the bytes, and export sees no difference."""
    from signround.qdq.common import PackedQParams
    from signround.tune.rtn import compact

    w = torch.randn(48, 200, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits=bits, group_size=64, sym=False)
    w_qdq, qp = qdq(w, spec)
    c = compact(qp)
    assert isinstance(c, PackedQParams) is packed
    assert c.shape == qp.codes.shape
    assert torch.equal(c.codes, qp.codes.to(torch.uint8))
    assert torch.equal(c.dequantize(), qp.dequantize())
    assert torch.allclose(c.dequantize(), w_qdq)
    if packed:
        assert c._packed.numel() == 48 * -(-200 * bits // 8)
    for name in ("auto_round", "auto_round:auto_awq"):
        if bits == 4 or "awq" not in name:
            ref, got = pack_layer(qp, name), pack_layer(c, name)
            assert all(torch.equal(ref[k], got[k]) for k in ref)
