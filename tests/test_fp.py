"""Floating-point data types (MXFP4/MXFP8, NVFP4, FP8), activation quantization, and the
llm_compressor (compressed-tensors) format, checked by hand and against compressed-tensors."""

import json

import pytest
import torch

from signround import AutoRound
from signround.errors import ConfigError, ExportError
from signround.export.llm_compressor import pack_fp4, unpack_fp4
from signround.qdq import qdq
from signround.qdq.act import qdq_act
from signround.qdq.elements import decode, encode, round_e2m1, round_e4m3
from signround.schemes import QuantSpec, resolve_scheme

MX4 = QuantSpec(4, 32, True, "mx_fp")
NV4 = QuantSpec(4, 16, True, "nv_fp")
FP8 = QuantSpec(8, -1, True, "fp")


def test_e2m1_rounding_ties_to_even_and_saturates():
    x = torch.tensor([0.25, 0.3, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 7.0, -0.3, -100.0])
    want = torch.tensor([0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -0.5, -6.0])
    assert torch.equal(round_e2m1(x), want)


def test_element_encodings_round_trip():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = decode(codes, 4)
    assert vals[:8].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert vals[9:].tolist() == [-0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    assert torch.equal(encode(vals, 4)[1:], codes[1:])  # -0 and +0 are one value
    b = torch.arange(256, dtype=torch.uint8)
    v = decode(b, 8)
    finite = ~torch.isnan(v)
    assert torch.equal(encode(v[finite], 8), b[finite])
    assert round_e4m3(torch.tensor([1000.0, 0.3])).tolist() == [448.0, 0.3125]


def test_mxfp4_qdq_by_hand():
    w = torch.zeros(1, 64)
    w[0, 0], w[0, 1], w[0, 2] = 5.0, 1.3, -2.6  # group 0: amax 5 -> 2**(2-2) = 1
    w[0, 32], w[0, 33] = 0.7, 0.2  # group 1: amax 0.7 -> 2**(-1-2) = 1/8
    dq, qp = qdq(w, MX4)
    assert qp.scale.tolist() == [[1.0, 0.125]]
    assert dq[0, :3].tolist() == [4.0, 1.5, -3.0]
    assert dq[0, 32:34].tolist() == [0.75, 0.1875]  # 0.2 / (1/8) = 1.6 -> 1.5
    assert torch.equal(qp.dequantize(), dq)


def test_nvfp4_qdq_by_hand():
    w = torch.zeros(1, 32)
    w[0, 0] = 6.0  # tensor amax 6 -> global scale 448 * 6 / 6 = 448
    w[0, 16], w[0, 17] = 3.0, 1.1  # group 1: 3 / 6 * 448 = 224 (an E4M3 value) -> scale 0.5
    dq, qp = qdq(w, NV4)
    assert qp.global_scale.item() == 448.0
    assert qp.scale[0, 1].item() == 224.0
    assert dq[0, 16:18].tolist() == [3.0, 1.0]
    assert dq[0, 0].item() == 6.0
    assert torch.equal(qp.dequantize(), dq)


def test_fp8_per_channel_and_per_tensor():
    w = torch.tensor([[448.0, 1.1, -3.3], [4.48, 0.011, 0.0]])
    dq, qp = qdq(w, FP8)
    assert qp.scale[:, 0].tolist() == [1.0, pytest.approx(0.01)]
    assert dq[0].tolist() == [448.0, 1.125, -3.25]
    dq_t, qp_t = qdq(w, QuantSpec(8, 0, True, "fp"))
    assert torch.all(qp_t.scale == 1.0)
    assert dq_t[1, 0].item() == 4.5  # 4.48 on the per-tensor grid
    for dqx, qpx in ((dq, qp), (dq_t, qp_t)):
        assert torch.equal(qpx.dequantize(), dqx)


@pytest.mark.parametrize("name", ["MXFP4", "MXFP8", "NVFP4", "FPW8A16"])
def test_fp_qdq_short_last_group_and_tunable_max_scale(name):
    spec = resolve_scheme(name)
    torch.manual_seed(0)
    w = torch.randn(6, 72)
    dq, qp = qdq(w, spec)
    assert torch.equal(qp.dequantize(), dq)
    mx = torch.full(qp.scale.shape, 0.9, requires_grad=True)
    v = torch.zeros_like(w, requires_grad=True)
    dq2, _ = qdq(w, spec, v=v, max_scale=mx)
    ((dq2 - w) ** 2).sum().backward()
    assert v.grad.abs().sum() > 0 and mx.grad.abs().sum() > 0


def test_activation_qdq():
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1] = 6.0, 1.3
    assert qdq_act(x, resolve_scheme("MXFP4"))[0, :2].tolist() == [6.0, 1.5]
    spec = resolve_scheme("FP8_STATIC")
    y = qdq_act(torch.tensor([[2.0, 0.33]]), spec, amax=torch.tensor(448.0))
    assert y.tolist() == [[2.0, 0.34375]]  # E4M3 steps of 1/32 between 0.25 and 0.5
    assert qdq_act(x, resolve_scheme("FPW8A16")) is x


def test_rceil_and_int8_activations_by_hand():
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1] = 7.0, 1.3
    # OCP floor: scale 2**(floor(log2 7) - 2) = 1, so 7 saturates at 6; rceil: 2**ceil(log2(7/6)) = 2
    assert qdq_act(x, resolve_scheme("MXFP4"))[0, :2].tolist() == [6.0, 1.5]
    assert qdq_act(x, resolve_scheme("MXFP4_RCEIL"))[0, :2].tolist() == [8.0, 1.0]
    x8 = torch.zeros(1, 32)
    x8[0, 0] = 500.0  # rceil: scale 2**ceil(log2(500 / 448)) = 2, 250 -> 256 on the E4M3 grid
    assert qdq_act(x8, resolve_scheme("MXFP8"))[0, 0].item() == 512.0
    x8[0, 0] = 480.0  # floor: scale 2**(floor(log2 480) - 8) = 1, so 480 saturates at 448; rceil keeps it
    assert qdq_act(x8, resolve_scheme("MXFP8A16").with_overrides(
        act_bits=8, act_data_type="mx_fp", act_group_size=32))[0, 0].item() == 448.0
    assert qdq_act(x8, resolve_scheme("MXFP8"))[0, 0].item() == 480.0
    assert resolve_scheme("MXFP8").act_data_type == "mx_fp_rceil"  # as upstream's guide gives MXFP8
    assert resolve_scheme("MXFP8_RCEIL") == resolve_scheme("MXFP8")
    w8a8 = resolve_scheme("W8A8")
    t = torch.tensor([[127.0, 1.4, -0.6], [0.254, 0.0, -0.127]])
    y = qdq_act(t, w8a8)  # per token: scale = amax / 127
    assert y.tolist() == [[127.0, 1.0, -1.0], [pytest.approx(0.254), 0.0, pytest.approx(-0.128)]]


def test_scheme_spellings_from_upstream():
    assert resolve_scheme("INT8") == resolve_scheme("INT8_W8A8") == resolve_scheme("W8A8")
    assert resolve_scheme("W8A16", group_size=-1, act_bits=8) == resolve_scheme("W8A8")  # --act_bits 8: int8 per token
    assert resolve_scheme("FPW8A16").group_size == 0  # per tensor, as upstream's guide says
    assert resolve_scheme("NVFP4", act_data_type="nv_fp4_with_static_gs") == resolve_scheme("NVFP4")
    assert resolve_scheme("MXFP4", act_data_type="mx_fp_rceil") == resolve_scheme("MXFP4_RCEIL")


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"scheme": "MXFP4", "group_size": 64}, "group_size [32]"),
        ({"scheme": "NVFP4", "bits": 8}, "NVFP4"),
        ({"scheme": "MXFP4", "sym": False}, "symmetric"),
        ({"scheme": "FP8_STATIC", "act_group_size": 32}, "act_group_size"),
        ({"scheme": "W4A16", "act_bits": 8}, "W8A8"),
        ({"scheme": "W8A8", "act_group_size": 0}, "per-token"),
        ({"scheme": "MXFP8", "act_data_type": "int"}, "W8A8"),
        ({"scheme": "W4A16", "data_type": "float"}, "mx_fp"),
    ],
)
def test_fp_scheme_errors(kw, needle):
    with pytest.raises(ConfigError, match=None) as e:
        resolve_scheme(kw.pop("scheme"), **kw)
    assert needle in str(e.value)


def _ar(stories_dir, scheme, **kw):
    # float32 activations cache: activation quantization (NVFP4, MX) rounds at grid boundaries, where
    # last-bit differences between two float32 computations can flip a code; exact runs compare exactly
    base = dict(nsamples=8, seqlen=64, batch_size=4, enable_torch_compile=False, cache_dtype="float32")
    base.update(kw)
    return AutoRound(str(stories_dir), scheme=scheme, **base)


@pytest.mark.parametrize("scheme", ["MXFP4", "NVFP4"])
def test_signround_beats_rtn_block_loss(stories_dir, scheme):
    # NVFP4 with its automatic step sizes (a quarter of 1/iters, minmax a fifth of that)
    ar = _ar(stories_dir, scheme, iters=20, **({"lr": 5e-3} if scheme == "MXFP4" else {}))
    ar.quantize()
    stats = ar.result.block_stats
    assert len(stats) == 5
    for name, s in stats.items():
        assert s["loss_final"] < s["loss_rtn"], (name, s)


def test_static_activation_range_and_in_memory_hook(stories_dir):
    ar = _ar(stories_dir, "FP8_STATIC", iters=0, disable_opt_rtn=True)
    model, _ = ar.quantize()
    qp = ar.result.qparams["model.layers.0.self_attn.q_proj"]
    assert qp.input_amax is not None and qp.input_amax.item() > 0
    lin = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 64) * 3
    want = torch.nn.functional.linear(qdq_act(x, ar.spec, qp.input_amax), lin.weight)
    assert torch.allclose(lin(x), want)


def test_integer_formats_refuse_fp_schemes(stories_dir, tmp_path):
    ar = _ar(stories_dir, "MXFP4", iters=0, ignore_layers="down_proj")
    for fmt in ("auto_gptq", "auto_awq"):
        with pytest.raises(ExportError, match="llm_compressor"):
            ar.quantize_and_save(tmp_path / fmt, format=fmt)
        assert ar.result is None and not (tmp_path / fmt).exists()  # refused before quantizing
    mixed = _ar(stories_dir, "MXFP4", iters=0, layer_config={"down_proj": "W4A16G32"})
    with pytest.raises(ExportError, match="integer or floating-point"):
        mixed.quantize_and_save(tmp_path / "mixed", format="auto_round")
    w8a8 = _ar(stories_dir, "W8A8", iters=0)
    for fmt in ("auto_round", "auto_gptq"):
        with pytest.raises(ExportError, match="int8 activations.*llm_compressor"):
            w8a8.quantize_and_save(tmp_path / fmt, format=fmt)
    assert w8a8.result is None


@pytest.mark.parametrize("scheme,packing,act_type", [
    ("MXFP4", "auto_round:llm_compressor", "mx_fp"),
    ("MXFP8", "auto_round:llm_compressor", "mx_fp_rceil"),
    ("NVFP4", "auto_round:llm_compressor", "nv_fp4_with_static_gs"),
    ("FP8_STATIC", "auto_round:fp8_static", "fp"),
    ("FPW8A16", None, "fp"),
])
def test_auto_round_holds_fp_schemes_and_loads_back(stories_dir, tmp_path, scheme, packing, act_type):
    from safetensors.torch import load_file

    from signround import load_quantized

    ar = _ar(stories_dir, scheme, iters=0, ignore_layers="down_proj")
    model, _ = ar.quantize()
    out = ar.save_quantized(tmp_path / "o", format="auto_round", inplace=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "auto-round" and qc.get("packing_format") == packing
    assert qc["act_data_type"] == act_type and qc["data_type"] == ar.spec.data_type
    sd = load_file(str(next(out.glob("*.safetensors"))))
    q = "model.layers.0.self_attn.q_proj"
    # the compressed-tensors tensors of each layer, under the checkpoint's names
    assert {k[len(q) + 1:] for k in sd if k.startswith(q + ".")} >= {"weight_scale"}
    if scheme == "FPW8A16":
        assert sd[q + ".weight"].dtype == torch.float8_e4m3fn and sd[q + ".weight_scale"].shape == (1,)
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        got = load_quantized(str(out))(ids).logits
    assert torch.allclose(got, ref, atol=2e-5, rtol=1e-5)


def test_llm_compressor_refuses_groups_that_do_not_divide(stories_dir, tmp_path):
    ar = _ar(stories_dir, "NVFP4", iters=0)  # down_proj has 172 inputs
    with pytest.raises(ExportError, match="divide"):
        ar.quantize_and_save(tmp_path / "o", format="llm_compressor")
    assert ar.result is None and not (tmp_path / "o").exists()


def test_fp4_byte_packing_by_hand():
    codes = torch.tensor([[1, 2, 3, 15]], dtype=torch.uint8)
    assert pack_fp4(codes).tolist() == [[0x21, 0xF3]]
    assert torch.equal(unpack_fp4(pack_fp4(codes)), codes)


CT_SCHEMES = [
    ("W4A16G32", {}),
    ("W4A16G32", {"sym": False}),
    ("W3A16G32", {"sym": False}),
    ("W8A16", {"group_size": -1}),
    ("W2A16G32", {}),
    ("MXFP4", {}),
    ("MXFP8", {}),
    ("NVFP4", {}),
    ("FPW8A16", {}),
    ("FP8_STATIC", {}),
    ("W8A8", {}),
]


@pytest.mark.parametrize("scheme,kw", CT_SCHEMES)
def test_llm_compressor_decompresses_to_our_qdq_weights(stories_dir, tmp_path, scheme, kw):
    pytest.importorskip("compressed_tensors", reason="pip install compressed-tensors (the llm_compressor extra)")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    ar = _ar(stories_dir, scheme, iters=0, ignore_layers="down_proj", **kw)
    ar.quantize()
    out = ar.save_quantized(tmp_path / "o", format="llm_compressor")
    qc = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    assert qc.quant_method == "compressed-tensors" and "model.layers.0.mlp.down_proj" in qc.ignore
    sd = {}
    for f in out.glob("*.safetensors"):
        sd.update(load_file(str(f)))
    group = qc.config_groups["group_0"]
    compressor = BaseCompressor.load_from_registry(group.format)
    for name, qp in ar.result.qparams.items():
        local = {k[len(name) + 1 :]: v for k, v in sd.items() if k.startswith(name + ".")}
        got = compressor.decompress(local, group)["weight"].float()
        ref = qp.dequantize(torch.float32)
        if scheme == "NVFP4":  # compressed-tensors dequantizes FP4 in bfloat16
            assert torch.allclose(got, ref, rtol=2**-7, atol=0), name
        else:
            assert torch.equal(got, ref), name
        if scheme == "FP8_STATIC":
            assert torch.allclose(local["input_scale"], qp.input_amax / 448)


@pytest.mark.parametrize("scheme", ["W4A16G32", "FPW8A16"])
def test_llm_compressor_loads_in_transformers_with_same_logits(stories_dir, tmp_path, scheme):
    pytest.importorskip("compressed_tensors", reason="pip install compressed-tensors (the llm_compressor extra)")
    from transformers import AutoModelForCausalLM

    ar = _ar(stories_dir, scheme, iters=0, ignore_layers="down_proj")
    model, _ = ar.quantize()
    out = ar.save_quantized(tmp_path / "o", format="llm_compressor", inplace=False)
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
        got = hf(ids).logits
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme,kw", [("W4A16G32", {"sym": False}), ("MXFP4", {}), ("MXFP8", {}), ("NVFP4", {}),
                                       ("FP8_STATIC", {}), ("W8A8", {})])
def test_load_quantized_reads_llm_compressor_with_activation_quant(stories_dir, tmp_path, scheme, kw):
    from signround import load_quantized

    ar = _ar(stories_dir, scheme, iters=0, ignore_layers="down_proj", **kw)
    model, _ = ar.quantize()
    out = ar.save_quantized(tmp_path / "o", format="llm_compressor", inplace=False)
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        got = load_quantized(str(out))(ids).logits
    # NVFP4's activation range goes through input_global_scale = 448 * 6 / amax and back
    assert torch.allclose(got, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("flag,tensors", [("static_kv_dtype", ("k", "v")), ("static_attention_dtype", ("q", "k", "v"))])
def test_static_fp8_attention_scales(stories_dir, tmp_path, flag, tensors):
    from safetensors.torch import load_file

    from signround import load_quantized
    from signround.model.kvcache import SCALE_NAMES, KVQuant, attention_modules

    # fp32 (no bf16 autocast): the scales measured in the run and here agree to float rounding
    ar = _ar(stories_dir, "W4A16G32", iters=0, ignore_layers="down_proj", amp=False, **{flag: "fp8"})
    model, _ = ar.quantize()
    out = ar.save_quantized(tmp_path / "o", format="llm_compressor", inplace=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["kv_cache_scheme"] == {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                                     "strategy": "tensor", "group_size": None}
    assert ("attention_input_activations" in qc) == ("q" in tensors)
    sd = load_file(str(next(out.glob("*.safetensors"))))
    # the scales are amax / 448 of the tensors attention sees (keys after rotary embedding) on the
    # calibration data, run through the quantized model
    attn = dict(attention_modules(model))
    saved = {n: m._signround_kv for n, m in attn.items()}
    for m in attn.values():
        m._signround_kv = KVQuant(tensors)
    with torch.no_grad():
        model(ar.calibration_ids())
    for name, m in attn.items():
        for t in tensors:
            assert torch.allclose(sd[f"{name}.{SCALE_NAMES[t]}"], m._signround_kv.amax[t] / 448, rtol=1e-4), (name, t)
        m._signround_kv = saved[name]
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        got = load_quantized(str(out))(ids).logits
        for m in attn.values():
            m._signround_kv = None
        plain = model(ids).logits
    assert torch.equal(got, ref)  # the loader applies the FP8 scales as the tuned model did
    assert not torch.allclose(plain, ref)


def test_static_kv_needs_a_format_that_holds_it(stories_dir, tmp_path):
    ar = _ar(stories_dir, "W4A16G32", iters=0, static_kv_dtype="fp8")
    with pytest.raises(ExportError, match="kv_cache_scheme.*--format llm_compressor"):
        ar.quantize_and_save(tmp_path / "o", format="auto_round")
    assert ar.result is None and not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="static_kv_dtype 'int8'.*fp8"):
        _ar(stories_dir, "W4A16G32", iters=0, static_kv_dtype="int8")


def test_static_kv_scales_of_a_half_precision_model_stay_float32(stories_dir, tmp_path):
    from safetensors.torch import load_file

    # the block is cast back to float16 after tuning: its measured scales must not be rounded with it
    ar = AutoRound(str(stories_dir), scheme="W4A16G32", iters=0, nsamples=8, seqlen=64, ignore_layers="down_proj",
                   static_kv_dtype="fp8", dtype="float16", enable_torch_compile=False)
    ar.quantize_and_save(tmp_path / "o", format="llm_compressor")
    check = json.loads((tmp_path / "o" / "report.json").read_text())["self_check"][0]
    assert check["status"] == "passed" and check["relative_difference"] < 1e-6, check
    sd = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert sd["model.layers.0.self_attn.k_scale"].dtype == torch.float32
