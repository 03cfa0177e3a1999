"""Every QuantLinear backend computes what dequantize-then-matmul computes, and the choice is right."""

import os

import pytest
import torch

from signround.export.packing import PACKINGS, pack_layer
from signround.inference.backends import BACKENDS, candidates, choose
from signround.inference.qlinear import QuantLinear
from signround.inference.qlinear import assign_backends as assign
from signround.qdq import qdq
from signround.schemes import QuantSpec


def make_layer(bits, gs, sym, packing, out_f, in_f, bias=False, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(out_f, in_f)
    dq, qp = qdq(w, QuantSpec(bits=bits, group_size=gs, sym=sym))
    ql = QuantLinear(in_f, out_f, bits, gs, packing, bias=bias, dtype=torch.float32)
    for k, t in pack_layer(qp, packing).items():
        setattr(ql, k, t)
    if bias:
        ql.bias = torch.randn(out_f)
    return ql, dq


CASES = [  # (bits, group_size, sym, packing, out, in)
    *[(b, 32, s, "auto_round", 24, 172) for b in (2, 3, 4, 8) for s in (True, False)],  # short last group
    *[(b, 64, True, "auto_round:auto_gptq", 32, 256) for b in (2, 3, 4, 8)],
    (4, 64, False, "auto_round:auto_awq", 32, 256),
    (4, 32, True, "auto_round", 48, 128),
    (4, 128, False, "auto_round", 64, 256),
    (8, -1, True, "auto_round", 40, 96),  # per channel
    (8, -1, False, "auto_round", 40, 96),
]


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "W{}G{}{}-{}-{}x{}".format(c[0], c[1], "" if c[2] else "A", *c[3:]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_matches_dequantize_then_matmul(backend, case, dtype):
    bits, gs, sym, packing, out_f, in_f = case
    ql, dq = make_layer(bits, gs, sym, packing, out_f, in_f, bias=True)
    b = BACKENDS[backend]
    if b not in candidates(ql, "cpu"):
        pytest.skip(f"{backend} does not hold this layer")
    ql.set_backend(b)
    x = torch.randn(2, 5, in_f)
    ref = x.double() @ dq.double().t() + ql.bias.double()
    got = ql(x.to(dtype)).double()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= tol * scale, backend


@pytest.mark.parametrize("case", [c for c in CASES if c[0] != 3],
                         ids=lambda c: "W{}G{}{}-{}-{}x{}".format(c[0], c[1], "" if c[2] else "A", *c[3:]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_kernel_matches_dequantize_then_matmul(case, dtype):
    """The CUDA kernel's numerics; without a GPU, run on CPU by Triton's interpreter (conftest sets
    TRITON_INTERPRET=1 before triton is imported)."""
    pytest.importorskip("triton", reason="pip install triton (the triton extra)")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    bits, gs, sym, packing, out_f, in_f = case
    ql, dq = make_layer(bits, gs, sym, packing, out_f, in_f, bias=True)
    ql.to(dev)
    b = BACKENDS["triton"]
    assert b.requires() is None and b.supports(ql)
    x = torch.randn(3, 7, in_f, device=dev)  # 21 rows: a partial 16-row tile
    got = b.compute(ql, b.prepare(ql, dev, dtype), x.to(dtype)).double().cpu()
    ref = x.to(dtype).double().cpu() @ dq.double().t() + ql.bias.double().cpu()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.shape == ref.shape and (got - ref).abs().max().item() <= tol * ref.abs().max().item()


def test_triton_is_for_cuda_and_a_missing_better_backend_is_named(monkeypatch, caplog):
    from dataclasses import replace

    ql, _ = make_layer(4, 64, True, "auto_round:auto_gptq", 32, 256)
    assert BACKENDS["triton"] not in candidates(ql, "cpu")  # compiled kernels need a GPU
    assert BACKENDS["triton"].bits == (2, 4, 8)  # 3-bit codes straddle words
    # a better backend whose package is absent: the one log line says what to install
    fast = replace(BACKENDS["torch"], name="fast", devices=("cpu",), priority=99,
                   requires=lambda: "fastpkg (pip install fastpkg)")
    monkeypatch.setitem(BACKENDS, "fast", fast)
    assign(torch.nn.Sequential(ql), "cpu")
    assert ql.backend != "fast" and "backend fast needs fastpkg (pip install fastpkg)" in caplog.text


def test_kernel_backends_take_the_layers_they_are_for():
    if BACKENDS["int4_cpu"].requires() is None:
        ql, _ = make_layer(4, 64, False, "auto_round", 32, 256)
        assert BACKENDS["int4_cpu"] in candidates(ql, "cpu")
        short, _ = make_layer(4, 32, True, "auto_round", 24, 172)  # short last group: not for the kernel
        assert BACKENDS["int4_cpu"] not in candidates(short, "cpu")
    if BACKENDS["int8_cpu"].requires() is None:
        per_channel, _ = make_layer(8, -1, True, "auto_round", 40, 96)
        assert BACKENDS["int8_cpu"] in candidates(per_channel, "cpu")
        grouped, _ = make_layer(8, 32, True, "auto_round", 40, 96)
        assert BACKENDS["int8_cpu"] not in candidates(grouped, "cpu")
        odd, _ = make_layer(8, -1, True, "auto_round", 40, 172)  # the kernel crashes on bf16 when K % 8
        assert BACKENDS["int8_cpu"] not in candidates(odd, "cpu")


def test_choice_auto_packed_and_forced():
    ql, _ = make_layer(3, 32, True, "auto_round", 24, 172)
    assert choose(ql, "cpu").name == "dequant_once"
    assert BACKENDS[choose(ql, "cpu", "packed").name].memory == "packed"
    with pytest.raises(ValueError, match="unknown backend"):
        choose(ql, "cpu", "nope")
    with pytest.raises(ValueError, match="int4_cpu"):
        choose(ql, "cpu", "int4_cpu")  # 3-bit


def test_assign_counts_and_state_follows_dtype():
    model = torch.nn.Sequential(make_layer(4, 64, True, "auto_round", 32, 256)[0],
                                make_layer(2, 32, False, "auto_round", 256, 32)[0])
    counts = assign(model, "cpu", "packed")
    assert sum(counts.values()) == 2
    x = torch.randn(3, 256)
    y32 = model(x)
    y16 = model(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert (y16.float() - y32).abs().max() <= 2e-2 * y32.abs().max()  # bf16 rounding, not a wrong weight


def test_backend_table_does_not_import_the_module_class():
    """The table and the kernels are written against the PackedLayer protocol; none of them imports
    the QuantLinear module (at the top or inside a function): no import circle in inference/."""
    import ast
    from pathlib import Path

    import signround.inference as inf

    root = Path(inf.__file__).parent
    for mod in ("backends.py", "triton_kernel.py", "packed.py"):
        tree = ast.parse((root / mod).read_text())
        imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {m for m in imported if m.endswith(("qlinear", "loader"))}, (mod, imported)
