"""GGUF export: files that transformers loads (gguf_file=) with the logits of our qdq model."""

import pytest
import torch

from signround import AutoRound
from signround.cli import main
from signround.errors import ConfigError, ExportError
from signround.schemes import resolve_scheme
from tiny_models import wide_model

pytest.importorskip("gguf", reason="pip install gguf (the gguf extra)")

TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]


def _logits(model, vocab=500):
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("ggml_type", TYPES)
def test_gguf_loads_in_transformers_with_our_logits(stories_dir, tmp_path, ggml_type):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ar = AutoRound(str(stories_dir), scheme=f"GGUF:{ggml_type.upper()}", iters=0, nsamples=8, seqlen=64,
                   batch_size=4)
    model, _ = ar.quantize()
    # down_proj has 172 inputs: ggml blocks of 32 do not divide it, so it stays in floating point
    assert not ar.plan.specs["model.layers.0.mlp.down_proj"].quantized
    out = ar.save_quantized(tmp_path / "o", format=f"gguf:{ggml_type}", inplace=False)
    files = [p.name for p in out.glob("*.gguf")]
    assert files == [f"{stories_dir.name}-{ggml_type}.gguf"]
    hf = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=files[0], dtype=torch.float32)
    assert torch.allclose(_logits(hf), _logits(model), atol=1e-5, rtol=1e-5)
    tok = AutoTokenizer.from_pretrained(str(out), gguf_file=files[0])
    text = "Once upon a time, there was a little girl named Lily. She had 12 red apples!"
    assert tok(text)["input_ids"] == ar.tokenizer(text)["input_ids"]


def test_cli_gguf_format_implies_the_scheme(stories_dir, tmp_path):
    out = tmp_path / "o"
    rc = main(["--model", str(stories_dir), "--iters", "0", "--disable_opt_rtn", "--format", "gguf:q4_0",
               "--output_dir", str(out)])
    assert rc == 0
    assert sorted(p.suffix for p in out.iterdir() if p.suffix != ".png") == [".gguf", ".json"]  # file, report


def test_gguf_refusals_before_tuning(stories_dir, tiny_model_dir, tmp_path):
    ar = AutoRound(str(stories_dir), scheme="W4A16G32", iters=0, disable_opt_rtn=True)
    with pytest.raises(ExportError, match="--scheme GGUF:Q4_0"):
        ar.quantize_and_save(tmp_path / "a", format="gguf:q4_0")
    assert ar.result is None and not (tmp_path / "a").exists()
    with pytest.raises(ExportError, match="supports the model families"):  # the mix needs the family table
        AutoRound(str(tiny_model_dir("gpt2")), scheme="GGUF:Q4_0", iters=0,
                  disable_opt_rtn=True).quantize_and_save(tmp_path / "b", format="gguf:q4_0")
    assert not (tmp_path / "b").exists()
    with pytest.raises(ConfigError, match="GGUF q4_0 is 4-bit"):
        resolve_scheme("GGUF:Q4_0", bits=8)
    # llama.cpp scales Gemma3 attention by 1/sqrt(head_dim) and has no key for another scale
    with pytest.raises(ExportError, match="query_pre_attn_scalar=256"):
        AutoRound(str(tiny_model_dir("gemma3")), scheme="GGUF:Q4_0", iters=0, disable_opt_rtn=True).quantize_and_save(
            tmp_path / "c", format="gguf:q4_0")
    assert not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def wide_dirs(tmp_path_factory, stories_dir):
    root = tmp_path_factory.mktemp("wide")
    return {tied: wide_model(root, stories_dir, tied) for tied in (True, False)}


# llama.cpp's mixes on that model (8 layers, n_gqa 4), written out by hand from llama-quant.cpp:
# use_more_bits picks layers 0, 3, 6, 7; n/8 = 1; the output is q6_k; a tied embedding is the output
K_MIXES = {
    "q4_k_m": {"blk.0.attn_v": "Q6_K", "blk.1.attn_v": "Q4_K", "blk.3.ffn_down": "Q6_K", "blk.4.ffn_down": "Q4_K",
               "blk.2.attn_q": "Q4_K", "output": "Q6_K", "token_embd": "Q4_K"},
    "q2_k_s": {"blk.0.attn_v": "Q4_K", "blk.0.ffn_down": "Q4_K", "blk.1.ffn_down": "Q2_K", "blk.5.attn_k": "Q2_K",
               "output": "Q6_K", "token_embd": "Q2_K"},
    "q3_k_m": {"blk.0.attn_v": "Q5_K", "blk.2.attn_v": "Q4_K", "blk.0.ffn_down": "Q4_K", "blk.1.attn_output": "Q4_K",
               "blk.1.ffn_up": "Q3_K", "output": "Q6_K", "token_embd": "Q3_K"},
    "q5_k_s": {"blk.0.attn_v": "Q5_K", "blk.7.ffn_down": "Q5_K", "output": "Q6_K", "token_embd": "Q5_K"},
    "q6_k": {"blk.0.attn_v": "Q6_K", "blk.3.ffn_gate": "Q6_K", "output": "Q6_K", "token_embd": "Q6_K"},
}


@pytest.mark.parametrize("ftype", sorted(K_MIXES))
def test_k_quant_mix_loads_in_transformers_with_our_logits(wide_dirs, tmp_path, ftype):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    src = wide_dirs[False]
    ar = AutoRound(str(src), scheme=f"GGUF:{ftype.upper()}", iters=0, nsamples=4, seqlen=32, batch_size=4)
    model, _ = ar.quantize()
    out = ar.save_quantized(tmp_path / "o", format=f"gguf:{ftype}", inplace=False)
    (f,) = out.glob("*.gguf")
    types = {t.name.removesuffix(".weight"): t.tensor_type.name for t in GGUFReader(str(f)).tensors}
    assert {k: types[k] for k in K_MIXES[ftype]} == K_MIXES[ftype]
    hf = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=f.name, dtype=torch.float32)
    assert torch.allclose(_logits(hf), _logits(model), atol=1e-5, rtol=1e-5)


def test_q4_k_m_searches_q6_k_like_llama_and_q4_k_wide(wide_dirs, clip_searches):
    """Optimized RTN: q6_k tensors get llama.cpp's narrow refit candidates (SmolLM2-135M Q4_K_M
    measured better in perplexity), q4_k keeps the wide clipping grid (measured better there)."""
    from signround.tune.rtn import CLIP_GRID, COARSE_CLIP_GRID, REFIT_GRID, llama_refit_grid

    AutoRound(str(wide_dirs[False]), scheme="GGUF:Q4_K_M", iters=0, nsamples=4, seqlen=32, batch_size=4).quantize()
    assert clip_searches["q6_k"] == {((1.0,), llama_refit_grid(6))}
    # block layers search the fine grid, the token embedding (no activations) the coarse one
    assert clip_searches["q4_k"] == {(CLIP_GRID, REFIT_GRID), (COARSE_CLIP_GRID, REFIT_GRID)}


def test_gguf_signround_starts_from_the_optimized_rtn_result(wide_dirs):
    """SignRound on GGUF types starts from (and is judged against) the optimized-RTN weights, not
    the coarser start integer schemes use: each block's starting loss is optimized RTN's loss."""
    kw = dict(scheme="GGUF:Q2_K_S", nsamples=4, seqlen=32, batch_size=4, enable_quanted_input=False,
              enable_torch_compile=False)  # compiling each GGUF type costs minutes here
    opt = AutoRound(str(wide_dirs[False]), iters=0, **kw)
    opt.quantize()
    tuned = AutoRound(str(wide_dirs[False]), iters=2, **kw)
    tuned.quantize()
    blocks = [n for n in opt.result.block_stats if n.startswith("model.layers.")]
    assert blocks
    for name in blocks:  # fp-chain inputs: the same for both runs
        s = tuned.result.block_stats[name]
        assert s["loss_start"] == pytest.approx(opt.result.block_stats[name]["loss_final"], rel=1e-6)
        assert s["loss_final"] <= s["loss_start"]


def test_tied_embedding_is_quantized_once_as_the_output(wide_dirs, tmp_path):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    ar = AutoRound(str(wide_dirs[True]), scheme="GGUF:Q4_K_M", iters=0, nsamples=4, seqlen=32, batch_size=4)
    model, _ = ar.quantize()
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    out = ar.save_quantized(tmp_path / "o", format="gguf:q4_k_m", inplace=False)
    (f,) = out.glob("*.gguf")
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(f)).tensors}
    assert types["token_embd.weight"] == "Q6_K" and "output.weight" not in types
    hf = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=f.name, dtype=torch.float32)
    assert torch.allclose(_logits(hf), _logits(model), atol=1e-5, rtol=1e-5)


def test_k_quant_signround_tunes_below_its_rtn(wide_dirs):
    ar = AutoRound(str(wide_dirs[False]), scheme="GGUF:Q2_K_S", iters=20, nsamples=8, seqlen=32, batch_size=4)
    ar.quantize()
    for block, stats in ar.result.block_stats.items():
        assert stats["loss_final"] < stats["loss_rtn"], block


def test_gguf_and_other_formats_from_one_run(wide_dirs, tmp_path):
    """The same tuned weights as GGUF, auto_round and fake: the file type's embedding / output
    quantization reaches the other formats as float qdq values, not as packed layers."""
    from transformers import AutoModelForCausalLM

    from signround import load_quantized

    ar = AutoRound(str(wide_dirs[False]), scheme="GGUF:Q4_0", iters=0, nsamples=4, seqlen=32, batch_size=4)
    model, out = ar.quantize_and_save(tmp_path / "o", format="gguf:q4_0,auto_round,fake")
    (f,) = (out / "gguf-q4_0").glob("*.gguf")
    ref = _logits(model)
    for m in (AutoModelForCausalLM.from_pretrained(str(f.parent), gguf_file=f.name, dtype=torch.float32),
              load_quantized(str(out / "auto_round")),
              AutoModelForCausalLM.from_pretrained(str(out / "fake"), dtype=torch.float32)):
        assert torch.allclose(_logits(m), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "phi3", "gemma3"])
def test_families_load_in_transformers_with_our_logits(tmp_path_factory, stories_dir, tmp_path, family):
    """Each family's table (names, fused Phi-3 tensors, Qwen biases and q/k norms, q/k permutation,
    Gemma3's four norms per layer stored as 1 + w) gives transformers' GGUF loader the model we quantized."""
    from transformers import AutoModelForCausalLM

    src = wide_model(tmp_path_factory.mktemp(family), stories_dir, False, family)
    ar = AutoRound(str(src), scheme="GGUF:Q4_K_M", iters=0, nsamples=4, seqlen=32, batch_size=4)
    model, out = ar.quantize_and_save(tmp_path / "o", format="gguf:q4_k_m")
    (f,) = out.glob("*.gguf")
    hf = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=f.name, dtype=torch.float32)
    assert torch.allclose(_logits(hf), _logits(model), atol=1e-5, rtol=1e-5)


def test_packed_formats_refuse_k_quants_naming_gguf(stories_dir, tmp_path):
    ar = AutoRound(str(stories_dir), scheme="GGUF:Q4_K_M", iters=0, nsamples=4, seqlen=32)
    with pytest.raises(ExportError, match="gguf:q4_k_m"):
        ar.quantize_and_save(tmp_path / "o", format="auto_gptq")
    assert ar.result is None and not (tmp_path / "o").exists()


def test_vision_language_gemma3_is_refused_naming_the_text_model():
    from types import SimpleNamespace

    from signround.export.gguf.mapping import family_of

    with pytest.raises(ExportError, match="Gemma3ForCausalLM"):
        family_of(SimpleNamespace(model_type="gemma3"))
    assert family_of(SimpleNamespace(model_type="gemma3_text")).arch == "gemma3"
