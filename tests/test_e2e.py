"""quantize -> save -> load_quantized gives the in-memory qdq model's logits, on every architecture."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from signround import AutoRound, QuantLinear, load_quantized
from tiny_models import ARCHS


def logits(model, vocab, seed=0):
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def rtn(path, **kw):
    # the whole model in memory: the quantized in-memory model is the reference the files must match
    return AutoRound(str(path), iters=0, disable_opt_rtn=True, low_cpu_mem_usage=False, **kw)


def assert_reload_matches(ar, out, vocab):
    ref = logits(ar.model, vocab)
    loaded = load_quantized(str(out))
    n_q = sum(isinstance(m, QuantLinear) for m in loaded.modules())
    assert n_q == len(ar.plan.quantized)
    torch.testing.assert_close(logits(loaded, vocab), ref, rtol=1e-4, atol=1e-4)
    return loaded


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_every_architecture(arch, tiny_model_dir, tmp_path):
    src = tiny_model_dir(arch)
    fp = AutoModelForCausalLM.from_pretrained(str(src))
    ar = rtn(src, scheme="W4A16", group_size=32)
    ar.quantize_and_save(tmp_path / "q")
    ref = logits(ar.model, 128)
    assert not torch.allclose(ref, logits(fp, 128), atol=1e-3), "quantization should change the logits"
    assert_reload_matches(ar, tmp_path / "q", 128)


@pytest.mark.parametrize(
    "kw,packing",
    [
        ({"bits": 3, "group_size": 32}, "auto_round:auto_gptq"),
        ({"bits": 4, "group_size": 32, "sym": False}, "auto_round:auto_awq"),
        ({"bits": 2, "group_size": -1, "sym": False}, "auto_round"),
        ({"bits": 8, "group_size": 64}, "auto_round:auto_gptq"),
    ],
)
def test_stories_schemes_and_packings(stories_dir, tmp_path, kw, packing):
    ar = rtn(stories_dir, **kw)
    ar.quantize_and_save(tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["packing_format"] == packing and cfg["quant_method"] == "auto-round"
    assert cfg["block_name_to_quantize"] == "model.layers"
    assert_reload_matches(ar, tmp_path / "q", 512)


def test_mixed_bits_layer_config(stories_dir, tmp_path):
    lc = {
        "model.layers.0.mlp.down_proj": {"bits": 8},
        r"layers\.[34]\.self_attn\.[qk]_proj": {"bits": 2, "group_size": 32, "sym": False},
        "v_proj": {"bits": 16},
    }
    ar = rtn(stories_dir, scheme="W4A16", group_size=64, layer_config=lc)
    ar.quantize_and_save(tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    extra = cfg["extra_config"]
    assert cfg["packing_format"] == "auto_round"  # a mix with asym layers needs raw zeros
    assert extra["model.layers.0.mlp.down_proj"] == {"bits": 8}
    assert extra["model.layers.3.self_attn.k_proj"] == {"bits": 2, "group_size": 32, "sym": False}
    assert extra["model.layers.2.self_attn.v_proj"]["bits"] == 16
    loaded = assert_reload_matches(ar, tmp_path / "q", 512)
    assert isinstance(loaded.model.layers[2].self_attn.v_proj, torch.nn.Linear)
    assert loaded.model.layers[0].mlp.down_proj.bits == 8


def test_quant_lm_head_unties_embedding(stories_dir, tmp_path):
    ar = rtn(stories_dir, scheme="W8A16", group_size=32, quant_lm_head=True)
    emb_before = ar.model.model.embed_tokens.weight.detach().clone()
    ar.quantize_and_save(tmp_path / "q")
    assert torch.equal(ar.model.model.embed_tokens.weight, emb_before)  # embedding stays fp
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    assert cfg["quantization_config"]["extra_config"]["lm_head"]["bits"] == 8
    loaded = assert_reload_matches(ar, tmp_path / "q", 512)
    assert isinstance(loaded.lm_head, QuantLinear)


def test_fake_format_loads_with_plain_transformers(stories_dir, tmp_path):
    ar = rtn(stories_dir, scheme="W2A16G32")
    ar.quantize_and_save(tmp_path / "fake", format="fake")
    cfg = json.loads((tmp_path / "fake" / "config.json").read_text())
    assert "quantization_config" not in cfg
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fake"))
    torch.testing.assert_close(logits(plain, 512), logits(ar.model, 512), rtol=1e-5, atol=1e-5)
    assert (tmp_path / "fake" / "tokenizer.json").is_file()


def test_output_files_and_sharding(stories_dir, tmp_path):
    ar = rtn(stories_dir)
    ar.quantize()
    ar.save_quantized(tmp_path / "q", max_shard_size=100_000)
    files = sorted(p.name for p in (tmp_path / "q").iterdir())
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"
    assert_reload_matches(ar, tmp_path / "q", 512)
    assert ar.summary["layers"] == {"W4G128 sym": 35}


def test_loaded_model_generates_what_the_qdq_model_generates(stories_dir, tmp_path):
    ar = rtn(stories_dir, scheme="W4A16", group_size=32)
    ar.quantize_and_save(tmp_path / "q")
    loaded = load_quantized(str(tmp_path / "q"))
    prompt = torch.tensor([[1, 403, 407, 261, 365]])
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want, got = ar.model.generate(prompt, **kw), loaded.generate(prompt, **kw)
    assert got.shape == (1, 17) and torch.equal(got, want)


@pytest.mark.parametrize("arch", ARCHS)
def test_signround_every_architecture(arch, tiny_model_dir, tmp_path):
    # tuning runs each block as the model calls it: keyword arguments, or positional ones (gpt2)
    src = tiny_model_dir(arch)
    ids = torch.randint(3, 120, (4, 16), generator=torch.Generator().manual_seed(0)).tolist()
    ar = AutoRound(str(src), scheme="W2A16", group_size=32, iters=20, nsamples=4, seqlen=16, batch_size=2,
                   dataset=ids, enable_torch_compile=False, low_cpu_mem_usage=False)
    ar.quantize_and_save(tmp_path / "q")
    stats = ar.result.block_stats
    assert len(stats) == len(ar.plan.block_names)
    assert all(s["loss_final"] <= s["loss_start"] for s in stats.values())
    assert any(s["loss_final"] < s["loss_start"] for s in stats.values()), "tuning moved nothing"
    assert_reload_matches(ar, tmp_path / "q", 128)
