"""GGUF export: files that transformers loads (gguf_file=) with the logits of our qdq model."""

import json
from pathlib import Path

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


def test_cli_gguf_scheme_implies_the_format(stories_dir, tmp_path):
    out = tmp_path / "o"
    rc = main(["--model", str(stories_dir), "--iters", "0", "--disable_opt_rtn", "--scheme", "GGUF:Q4_0",
               "--output_dir", str(out)])
    assert rc == 0 and [p.name for p in out.glob("*.gguf")] == ["stories260K-q4_0.gguf"]


def test_layer_config_fixes_gguf_types_per_layer(wide_dirs, tmp_path):
    """Upstream's ``layer_config={"lm_head": "GGUF:Q6_K"}``: an entry that is a GGUF scheme fixes that
    layer's block type (a file type's own: Q5_K_S -> q5_k), the other layers follow the file type's mix."""
    from gguf import GGUFReader

    ar = AutoRound(str(wide_dirs[False]), scheme="GGUF:Q4_K_M", iters=0, nsamples=4, seqlen=32, batch_size=4,
                   layer_config={"lm_head": "GGUF:Q8_0", "model.layers.1.mlp.down_proj": "GGUF:Q5_K_S",
                                 "model.layers.0.self_attn.v_proj": {"ggml_type": "q2_k"}})
    ar.quantize_and_save(tmp_path / "o", self_check=False)
    (f,) = (tmp_path / "o").glob("*.gguf")
    types = {t.name.removesuffix(".weight"): t.tensor_type.name for t in GGUFReader(str(f)).tensors}
    assert types["output"] == "Q8_0" and types["blk.1.ffn_down"] == "Q5_K" and types["blk.0.attn_v"] == "Q2_K"
    assert types["blk.3.ffn_down"] == "Q6_K" and types["blk.1.ffn_up"] == "Q4_K"  # Q4_K_M's mix elsewhere
    with pytest.raises(ConfigError, match="mixes GGUF and non-GGUF schemes"):
        AutoRound(str(wide_dirs[False]), scheme="GGUF:Q4_K_M", iters=0, layer_config={"down_proj": "W4A16"})


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


def test_vision_language_gemma3_is_refused_naming_the_formats_that_hold_it():
    from types import SimpleNamespace

    from signround.export.gguf.mapping import family_of

    with pytest.raises(ExportError, match="vision-language 'gemma3'.*auto_round or llm_compressor"):
        family_of(SimpleNamespace(model_type="gemma3", vision_config={}))
    assert family_of(SimpleNamespace(model_type="gemma3_text")).arch == "gemma3"


def _gguf_tensors(path: Path) -> dict:
    from gguf import GGUFReader

    return {t.name: t for t in GGUFReader(str(path)).tensors}


def _expert_weight(model, layer: int, expert: int, proj: str) -> torch.Tensor:
    return getattr(model.model.layers[layer].mlp.experts[expert], proj).weight.detach().float()


@pytest.mark.parametrize("family,projs", [("qwen3_moe", ("gate_proj", "up_proj", "down_proj")), ("mixtral", ("w1", "w3", "w2")),
                                          ("qwen2_moe", ("gate_proj", "up_proj", "down_proj"))])
def test_moe_experts_are_stacked_as_llama_cpp_reads_them(family, projs, tmp_path_factory, stories_dir, tmp_path):
    """Every expert of a layer in one [experts, out, in] tensor per projection (ffn_gate/up/down_exps),
    in expert order, with the mix's block type (8 experts: attn_v/attn_k q8_0, attn_output q5_k, as
    llama-quant.cpp gives an 8-expert model), the router in float32. Qwen3-MoE loads in transformers
    with our logits; Mixtral's llama-architecture file is checked block by block against the model."""
    from gguf.quants import dequantize

    src = wide_model(tmp_path_factory.mktemp(family), stories_dir, False, family)
    ar = AutoRound(str(src), scheme="GGUF:Q4_K_M", iters=0, disable_opt_rtn=True, low_cpu_mem_usage=False)
    model, out = ar.quantize_and_save(tmp_path / "o", format="gguf:q4_k_m")
    (f,) = out.glob("*.gguf")
    tensors = _gguf_tensors(f)
    assert not any(".experts." in n or "ffn_gate." in n for n in tensors)
    types = {n.removesuffix(".weight"): t.tensor_type.name for n, t in tensors.items() if n.endswith(".weight")}
    # use_more_bits picks layers 0, 3, 6, 7 of 8 for ffn_down under q4_k_m
    assert types["blk.0.ffn_down_exps"] == "Q6_K" and types["blk.1.ffn_down_exps"] == "Q4_K"
    assert types["blk.1.ffn_gate_exps"] == types["blk.1.ffn_up_exps"] == "Q4_K"
    assert types["blk.2.attn_v"] == types["blk.2.attn_k"] == "Q8_0" and types["blk.2.attn_output"] == "Q5_K"
    assert types["blk.0.ffn_gate_inp"] == "F32"
    for layer in (0, 5):
        for proj, stacked in zip(projs, ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")):
            t = tensors[f"blk.{layer}.{stacked}.weight"]
            w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
            assert w.shape == (8, *_expert_weight(model, layer, 0, proj).shape)
            for e in (0, 3, 7):  # each slot holds that expert's quantized weight
                torch.testing.assert_close(w[e], _expert_weight(model, layer, e, proj), rtol=0, atol=1e-6)
    if family == "qwen2_moe":  # the shared expert: ffn_down's rule, its gate a float32 vector
        assert types["blk.0.ffn_down_shexp"] == "Q6_K" and types["blk.1.ffn_down_shexp"] == "Q4_K"
        assert types["blk.1.ffn_gate_shexp"] == types["blk.1.ffn_up_shexp"] == "Q4_K"
        gate = tensors["blk.1.ffn_gate_inp_shexp.weight"]
        assert gate.tensor_type.name == "F32" and list(gate.shape) == [256]
        torch.testing.assert_close(torch.from_numpy(gate.data.copy()),
                                   model.model.layers[1].mlp.shared_expert_gate.weight.detach().float().reshape(-1))
    report = json.loads((out / "report.json").read_text())["self_check"][0]
    if family in ("qwen3_moe", "qwen2_moe"):
        assert report["status"] == "passed"
        # transformers' reader, with its unread expert size filled in (what the self-check loads)
        from signround.selfcheck import load_saved

        assert torch.allclose(_logits(load_saved(out, "gguf:q4_k_m")), _logits(model), atol=1e-5, rtol=1e-5)
    else:
        assert report["status"] == "skipped" and "llama.cpp" in report["reason"]


def _wide_gguf(family: str, tmp_path_factory, stories_dir, tmp_path):
    """A wide random model of ``family`` as GGUF Q4_K_M (plain RTN, loaded whole): (the quantized
    model, the output directory, a reader of its .gguf)."""
    from gguf import GGUFReader

    src = wide_model(tmp_path_factory.mktemp(family), stories_dir, False, family)
    ar = AutoRound(str(src), scheme="GGUF:Q4_K_M", iters=0, disable_opt_rtn=True, low_cpu_mem_usage=False)
    model, out = ar.quantize_and_save(tmp_path / "o", format="gguf:q4_k_m")
    (f,) = out.glob("*.gguf")
    return model, out, GGUFReader(str(f))


def test_llama4_gguf_interleaves_dense_and_moe_layers(tmp_path_factory, stories_dir, tmp_path):
    """Llama 4 text (experts fused on disk, MoE in every second layer, a shared expert): dense layers keep
    ffn_gate/up/down, MoE layers get the stacked experts in expert order, the shared expert as *_shexp
    and the router in float32; the metadata llama.cpp's llama4 graph reads. (llama.cpp computes our
    model's perplexity from it: benchmarks/check_gguf_families_llamacpp.py --families llama4.)"""
    from gguf.quants import dequantize

    model, out, reader = _wide_gguf("llama4", tmp_path_factory, stories_dir, tmp_path)
    tensors = {t.name: t for t in reader.tensors}
    meta = {k: int(v.parts[-1][0]) for k, v in reader.fields.items() if k.startswith("llama4.") and len(v.parts[-1]) == 1}
    assert meta["llama4.interleave_moe_layer_step"] == 2 and meta["llama4.expert_count"] == 8
    assert meta["llama4.expert_used_count"] == 1
    assert meta["llama4.feed_forward_length"] == 512 and meta["llama4.expert_feed_forward_length"] == 256
    for layer in range(8):
        moe = layer % 2 == 1
        assert (f"blk.{layer}.ffn_gate_exps.weight" in tensors) == moe
        assert (f"blk.{layer}.ffn_gate.weight" in tensors) == (not moe)
    ff = model.model.layers[3].feed_forward
    assert tensors["blk.3.ffn_gate_inp.weight"].tensor_type.name == "F32"
    for proj, stacked in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
        t = tensors[f"blk.3.{stacked}.weight"]
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
        assert w.shape[0] == 8
        for e in (0, 5, 7):
            torch.testing.assert_close(w[e], getattr(ff.experts[e], proj).weight.detach().float(), rtol=0, atol=1e-6)
        t = tensors[f"blk.3.ffn_{proj[:-5]}_shexp.weight"]
        torch.testing.assert_close(torch.from_numpy(dequantize(t.data, t.tensor_type).copy()),
                                   getattr(ff.shared_expert, proj).weight.detach().float(), rtol=0, atol=1e-6)
    report = json.loads((out / "report.json").read_text())["self_check"][0]
    assert report["status"] == "skipped" and "llama.cpp" in report["reason"]


def test_gpt_oss_gguf_stacks_experts_with_their_biases_and_keeps_sinks(tmp_path_factory, stories_dir, tmp_path):
    """gpt-oss (experts fused on disk, gate/up interleaved): each projection's experts stacked with their
    biases ([experts, out]), attention sinks and the router's bias in float32, the window pattern and
    YaRN rope llama.cpp reads. (llama.cpp computes our model's perplexity from it:
    benchmarks/check_gguf_families_llamacpp.py --families gpt_oss.)"""
    from gguf.quants import dequantize

    model, out, reader = _wide_gguf("gpt_oss", tmp_path_factory, stories_dir, tmp_path)
    tensors = {t.name: t for t in reader.tensors}
    field = lambda k: reader.fields[k].parts[-1].tolist()  # noqa: E731
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "gpt-oss"
    assert field("gpt-oss.attention.sliding_window") == [16] and field("gpt-oss.expert_feed_forward_length") == [256]
    pattern = [bool(reader.fields["gpt-oss.attention.sliding_window_pattern"].parts[i][0])
               for i in reader.fields["gpt-oss.attention.sliding_window_pattern"].data]
    assert pattern == [True, False] * 4
    assert field("gpt-oss.rope.scaling.factor") == [32.0] and field("gpt-oss.rope.scaling.original_context_length") == [4096]
    layer = model.model.layers[2]
    sinks = tensors["blk.2.attn_sinks.weight"]
    assert sinks.tensor_type.name == "F32"
    torch.testing.assert_close(torch.from_numpy(sinks.data.copy()), layer.self_attn.sinks.detach().float())
    torch.testing.assert_close(torch.from_numpy(tensors["blk.2.ffn_gate_inp.bias"].data.copy()),
                               layer.mlp.router.bias.detach().float())
    for proj, stacked in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
        t = tensors[f"blk.2.{stacked}.weight"]
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
        bias = torch.from_numpy(tensors[f"blk.2.{stacked}.bias"].data.copy())
        assert w.shape[0] == bias.shape[0] == 8
        for e in (0, 6):
            mod = getattr(layer.mlp.experts[e], proj)
            torch.testing.assert_close(w[e], mod.weight.detach().float(), rtol=0, atol=1e-6)
            torch.testing.assert_close(bias[e], mod.bias.detach().float())
    report = json.loads((out / "report.json").read_text())["self_check"][0]
    assert report["status"] == "skipped" and "rope-scaling" in report["reason"]


@pytest.mark.parametrize("family,key,value,message", [
    ("llama4", "attention_chunk_size", 4096, "attention_chunk_size.*8192"),
    ("gpt_oss", "swiglu_limit", 5.0, "SwiGLU at 5.0.*7.0"),
    ("gpt_oss", "rope_parameters", {"rope_type": "yarn", "factor": 32.0, "beta_fast": 16.0, "beta_slow": 1.0,
                                    "original_max_position_embeddings": 4096, "rope_theta": 150000.0}, "beta_fast=16.0"),
])
def test_gguf_refuses_what_llama_cpp_fixes_otherwise(family, key, value, message, tmp_path_factory, stories_dir, tmp_path):
    """Settings llama.cpp's graph hard-codes instead of reading: refused before quantizing, naming them."""
    src = wide_model(tmp_path_factory.mktemp(family), stories_dir, False, family)
    cfg = json.loads((src / "config.json").read_text())
    cfg[key] = value
    (src / "config.json").write_text(json.dumps(cfg))
    ar = AutoRound(str(src), scheme="GGUF:Q4_K_M", iters=0, disable_opt_rtn=True)
    with pytest.raises(ExportError, match=message + ".*auto_round"):
        ar.quantize_and_save(tmp_path / "o", format="gguf:q4_k_m")
    assert not (tmp_path / "o").exists()


def test_moe_gguf_refuses_what_llama_cpp_computes_differently(tiny_model_dir, tmp_path):
    # tiny_models' Qwen3-MoE keeps transformers' default norm_topk_prob=False: llama.cpp renormalizes
    ar = AutoRound(str(tiny_model_dir("qwen3_moe")), scheme="GGUF:Q4_0", iters=0, disable_opt_rtn=True)
    with pytest.raises(ExportError, match="norm_topk_prob.*auto_round"):
        ar.quantize_and_save(tmp_path / "o", format="gguf:q4_0")
    assert not (tmp_path / "o").exists()
