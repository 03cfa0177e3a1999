"""qdq math against values computed by hand."""

import pytest
import torch

from signround.qdq import qdq
from signround.schemes import QuantSpec


def run(w, bits, gs, sym, **kw):
    return qdq(torch.tensor(w, dtype=torch.float32), QuantSpec(bits=bits, group_size=gs, sym=sym), **kw)


def test_sym_full_range_larger_max_maps_to_minus_half():
    # max 1.0 has the larger magnitude: scale = -1.0/8, so 1.0 -> -8 (the extra negative level).
    dq, qp = run([[0.3, -0.1, 1.0, 0.0]], 4, 4, True)
    assert qp.scale.tolist() == [[-0.125]]
    assert qp.codes.tolist() == [[6, 9, 0, 8]]  # q + 8 with q = [-2, 1, -8, 0]
    assert qp.zero.tolist() == [[8.0]]
    assert dq.tolist() == [[0.25, -0.125, 1.0, 0.0]]


def test_sym_full_range_larger_min():
    dq, qp = run([[-1.0, 0.5, 0.3, 0.0]], 4, 4, True)
    assert qp.scale.tolist() == [[0.125]]
    assert qp.codes.tolist() == [[0, 12, 10, 8]]  # q = [-8, 4, 2, 0]
    assert dq.tolist() == [[-1.0, 0.5, 0.25, 0.0]]


def test_sym_2bit_uses_all_four_levels():
    dq, qp = run([[-1.0, -0.5, 0.0, 0.5]], 2, 4, True)  # scale = 1.0/2 = 0.5
    assert qp.scale.tolist() == [[0.5]]
    assert sorted(set(qp.codes.flatten().tolist())) == [0, 1, 2, 3]
    assert dq.tolist() == [[-1.0, -0.5, 0.0, 0.5]]


def test_asym_zero_point():
    dq, qp = run([[-1.0, 0.4, 1.0, 2.0]], 2, 4, False)  # scale 3/3 = 1, zero = round(1/1) = 1
    assert qp.scale.tolist() == [[1.0]]
    assert qp.zero.tolist() == [[1.0]]
    assert qp.codes.tolist() == [[0, 1, 2, 3]]
    assert dq.tolist() == [[-1.0, 0.0, 1.0, 2.0]]


def test_asym_all_positive_group_keeps_zero_representable():
    dq, qp = run([[1.0, 2.0, 3.0]], 2, -1, False)  # range forced to include 0: [0, 3]
    assert qp.zero.tolist() == [[0.0]]
    assert dq.tolist() == [[1.0, 2.0, 3.0]]


def test_short_last_group_and_per_channel():
    w = [[1.0, -2.0, 4.0, 0.5, 0.25, -0.5]]
    dq, qp = run(w, 4, 4, True)
    assert qp.scale.shape == (1, 2)
    # group 0 = [1,-2,4,0.5] -> scale -4/8 = -0.5; group 1 = [0.25,-0.5] (short) -> scale 0.5/8
    assert qp.scale.tolist() == [[-0.5, 0.0625]]
    assert dq.tolist() == [[1.0, -2.0, 4.0, 0.5, 0.25, -0.5]]
    dq, qp = run(w, 4, -1, True)
    assert qp.scale.shape == (1, 1)


def test_rounding_offset_v_changes_rounding():
    w = [[0.4, 1.0]]  # asym 2-bit, range [0, 1] -> scale 1/3; 0.4*3 = 1.2
    _, qp = run(w, 2, -1, False)
    assert qp.codes.tolist() == [[1, 3]]
    _, qp = run(w, 2, -1, False, v=torch.tensor([[0.4, 0.0]]))  # 1.2 + 0.4 rounds up
    assert qp.codes.tolist() == [[2, 3]]


def test_max_scale_clips_range():
    w = [[-0.5, 0.25, 1.0, 0.0]]
    _, qp = run(w, 4, 4, True, min_scale=torch.tensor([[1.0]]), max_scale=torch.tensor([[0.5]]))
    # max shrinks to 0.5, min stays -0.5: tie goes to the max -> scale = -0.5/8; 1.0 clips to -8
    assert qp.scale.tolist() == [[-0.0625]]
    assert qp.codes[0, 2].item() == 0


def test_scale_is_fp16_representable_and_dequantize_matches():
    torch.manual_seed(0)
    w = torch.randn(16, 100)
    for bits in (2, 3, 4, 8):
        for sym in (True, False):
            dq, qp = qdq(w, QuantSpec(bits=bits, group_size=32, sym=sym))
            assert torch.equal(qp.scale, qp.scale.half().float())
            assert torch.equal(qp.dequantize(), dq)
            assert qp.codes.min() >= 0 and qp.codes.max() < 2**bits


def test_all_zero_group_is_finite():
    dq, qp = run([[0.0] * 8], 4, 4, True)
    assert torch.isfinite(qp.scale).all() and dq.abs().sum() == 0


def test_gradients_flow_to_tunables():
    torch.manual_seed(0)
    w = torch.randn(4, 64)
    v = torch.zeros_like(w, requires_grad=True)
    mn = torch.ones(4, 2, requires_grad=True)
    mx = torch.ones(4, 2, requires_grad=True)
    dq, _ = qdq(w, QuantSpec(bits=4, group_size=32, sym=False), v=v, min_scale=mn, max_scale=mx)
    ((dq - w) ** 2).sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert mn.grad.abs().sum() > 0 and mx.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_output_dtype_follows_weight(dtype):
    dq, _ = qdq(torch.randn(4, 32).to(dtype), QuantSpec(bits=4, group_size=32))
    assert dq.dtype == dtype


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, group_size=64), QuantSpec(bits=2, group_size=32, sym=False),
                                  QuantSpec(bits=3, group_size=48), "q4_k", "q6_k", "q4_1"])
def test_qdq_in_rows_equals_the_whole_weight(spec):
    """The end of a block quantizes each layer a few rows at a time (its float32 temporaries a
    chunk's, not a layer's): values, codes, scales and zero points bit-identical to one piece,
    including a short last chunk."""
    from signround.qdq import qdq_in_rows
    from signround.schemes import GGML_SPECS

    spec = GGML_SPECS[spec] if isinstance(spec, str) else spec
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1100, 512, generator=g).to(torch.bfloat16)
    v = torch.rand(w.shape, generator=g) - 0.5
    ng = -(-512 // spec.group_size)
    mn, mx = torch.rand(1100, ng, generator=g) * 0.5 + 0.5, torch.rand(1100, ng, generator=g) * 0.5 + 0.5
    a, qa = qdq(w, spec, v=v, min_scale=mn, max_scale=mx)
    b, qb = qdq_in_rows(w, spec, v=v, min_scale=mn, max_scale=mx, rows=256)
    assert torch.equal(a, b) and a.dtype == b.dtype
    assert torch.equal(qa.codes.to(torch.uint8), qb.codes) and torch.equal(qa.scale, qb.scale)
    assert torch.equal(qa.zero, qb.zero)
    assert (qa.super_scale is None) == (qb.super_scale is None)
    if qa.super_scale is not None:
        assert torch.equal(qa.super_scale, qb.super_scale)
