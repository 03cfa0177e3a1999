"""auto_gptq and auto_awq exports, several formats per run, and refusals before tuning."""

import json

import pytest
import torch

from signround import AutoRound, QuantLinear, load_quantized
from signround.errors import ExportError


def logits(model, seed=0):
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def rtn(path, **kw):
    return AutoRound(str(path), iters=0, disable_opt_rtn=True, **kw)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_auto_gptq_round_trip_and_config(tiny_model_dir, tmp_path, bits):
    ar = rtn(tiny_model_dir("llama"), scheme="W4A16", bits=bits, group_size=16,
             layer_config={"down_proj": {"bits": 8, "group_size": 32}, "v_proj": {"bits": 16}})
    ar.quantize_and_save(tmp_path / "q", format="auto_gptq")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["desc_act"] is False and cfg["bits"] == bits
    assert cfg["dynamic"]["-:^model\\.layers\\.0\\.self_attn\\.v_proj$"] == {}
    if bits != 8:
        assert cfg["dynamic"]["+:^model\\.layers\\.1\\.mlp\\.down_proj$"] == {"bits": 8, "group_size": 32, "sym": True}
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert torch.equal(sd["model.layers.0.self_attn.q_proj.g_idx"], torch.arange(64, dtype=torch.int32) // 16)
    loaded = load_quantized(str(tmp_path / "q"))
    assert loaded.model.layers[0].mlp.down_proj.bits == 8
    torch.testing.assert_close(logits(loaded), logits(ar.model), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sym", [True, False])
def test_auto_awq_round_trip(tiny_model_dir, tmp_path, sym):
    ar = rtn(tiny_model_dir("qwen2"), scheme="W4A16", group_size=16, sym=sym, ignore_layers="o_proj")
    ar.quantize_and_save(tmp_path / "q", format="auto_awq")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg == {"quant_method": "awq", "bits": 4, "group_size": 16, "sym": sym, "zero_point": not sym, "version": "gemm",
                   "modules_to_not_convert": ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj",
                                              "lm_head"]}
    loaded = load_quantized(str(tmp_path / "q"))
    assert isinstance(loaded.model.layers[0].mlp.up_proj, QuantLinear)
    torch.testing.assert_close(logits(loaded), logits(ar.model), rtol=1e-4, atol=1e-4)


def test_several_formats_from_one_run(tiny_model_dir, tmp_path):
    ar = rtn(tiny_model_dir("llama"), scheme="W4A16", group_size=16)
    ar.quantize_and_save(tmp_path / "q", format="auto_round,auto_gptq,auto_awq,fake")
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["auto_awq", "auto_gptq", "auto_round", "fake"]
    ref = logits(ar.model)
    for fmt in ("auto_round", "auto_gptq", "auto_awq"):
        torch.testing.assert_close(logits(load_quantized(str(tmp_path / "q" / fmt))), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw,fmt,needle", [
    ({"bits": 2}, "auto_awq", "4-bit weights only"),
    ({"layer_config": {"down_proj": {"bits": 8}}}, "auto_awq", "4-bit weights only"),
    ({"group_size": 32}, "auto_awq", "divisible by the group size"),  # in_features 80 % 32 != 0
    ({"quant_lm_head": True, "group_size": 16}, "auto_awq", "lm_head"),
    ({"sym": False}, "auto_gptq", "auto_round"),
    ({}, "gguf", "unknown format"),
])
def test_formats_refuse_before_tuning(tiny_model_dir, tmp_path, kw, fmt, needle):
    ids = torch.randint(3, 120, (2, 32), generator=torch.Generator().manual_seed(0)).tolist()
    ar = AutoRound(str(tiny_model_dir("llama")), iters=5, seqlen=32, nsamples=2, enable_torch_compile=False,
                   dataset=ids, **kw)
    with pytest.raises(ExportError, match=needle):
        ar.quantize_and_save(tmp_path / "q", format=fmt)
    assert ar.result is None, "nothing may be tuned before the format check"
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("scale_dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_scale_dtype_rounds_and_stores_scales(stories_dir, tmp_path, scale_dtype, torch_dtype):
    import json

    from safetensors.torch import load_file

    from signround import AutoRound, load_quantized
    from signround.qdq import qdq
    from signround.schemes import resolve_scheme

    spec = resolve_scheme("W4A16G32", scale_dtype=scale_dtype)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    _, qp = qdq(w, spec)
    assert torch.equal(qp.scale, qp.scale.to(torch_dtype).float())  # rounded to what the file stores
    if torch_dtype == torch.float32:
        assert not torch.equal(qp.scale, qp.scale.half().float())  # not the float16 default
    ar = AutoRound(str(stories_dir), scheme="W4A16G32", scale_dtype=scale_dtype, iters=2, nsamples=4, seqlen=64,
                   batch_size=4, enable_torch_compile=False, ignore_layers="down_proj")
    model, _ = ar.quantize()
    out = ar.save_quantized(tmp_path / "o", format="auto_round", inplace=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["scale_dtype"] == f"torch.{torch_dtype}".replace("torch.torch.", "torch.")
    sd = load_file(str(out / "model.safetensors"))
    assert sd["model.layers.0.self_attn.q_proj.scales"].dtype == torch_dtype
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_quantized(str(out), dtype=torch.float32)(ids).logits, model(ids).logits)


def test_scale_dtype_refused_where_it_cannot_hold(stories_dir, tmp_path):
    from signround import AutoRound
    from signround.errors import ConfigError, ExportError

    ar = AutoRound(str(stories_dir), scheme="W4A16G32", scale_dtype="bf16", iters=0, ignore_layers="down_proj")
    with pytest.raises(ExportError, match="float16 scales.*auto_round"):
        ar.quantize_and_save(tmp_path / "o", format="auto_gptq")
    with pytest.raises(ConfigError, match="drop --scale_dtype"):
        AutoRound(str(stories_dir), scheme="MXFP4", scale_dtype="bf16")
    with pytest.raises(ConfigError, match="fp16 \\(default\\), bf16 or fp32"):
        AutoRound(str(stories_dir), scale_dtype="int8")
