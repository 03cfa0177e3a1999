"""AutoScheme: bit accounting, groups, the exact budgeted choice, DeltaLoss scoring, and the runs
a user makes (API and CLI), with the bad inputs refused before any scoring."""

from __future__ import annotations

import importlib
import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from signround import AutoRound, load_quantized
from signround.autoscheme import AutoScheme, layer_bits
from signround.autoscheme.groups import fused_key, scheme_groups
from signround.autoscheme.solve import choose
from signround.errors import ConfigError, ExportError
from signround.schemes import preset

OPTS = "W2A16G32,W3A16G32,W4A16G32"
SMALL = dict(iters=0, nsamples=4, seqlen=32, batch_size=2)


def test_layer_bits_count_scales_and_zero_points_as_upstream():
    # 4-bit group 128: 16-bit scale and 4-bit zero point per group (upstream counts both for int)
    assert layer_bits(preset("W4A16"), 4096, 4096) / 4096**2 == pytest.approx(4 + 20 / 128)
    assert layer_bits(preset("W4A16"), 4096, 4096, ignore_scale_zp_bits=True) / 4096**2 == 4
    assert layer_bits(preset("MXFP4"), 64, 64) / 64**2 == pytest.approx(4.25)  # 8-bit shared exponent / 32
    assert layer_bits(preset("NVFP4"), 64, 64) / 64**2 == pytest.approx(4.5)  # FP8 scale / 16
    assert layer_bits(preset("BF16"), 64, 64) / 64**2 == 16
    # a last short group still has its scale and zero point: 100 inputs in groups of 32 -> 4 groups
    assert layer_bits(preset("W2A16G32"), 1, 100) == 2 * 100 + 4 * 18
    assert layer_bits(preset("GGUF:Q4_K_M"), 1, 256) == 144 * 8  # ggml q4_k block: 144 bytes / 256


def test_fused_layers_share_a_key():
    assert fused_key("self_attn.q_proj") == fused_key("self_attn.v_proj") == "self_attn.qkv"
    assert fused_key("mlp.gate_proj") == fused_key("mlp.up_proj") != fused_key("mlp.down_proj")
    assert fused_key("mlp.experts.3.down_proj") == fused_key("mlp.experts.0.down_proj")
    assert fused_key("block_sparse_moe.experts.1.w1") == fused_key("block_sparse_moe.experts.7.w3")
    assert fused_key("mlp.shared_expert.gate_proj") != fused_key("mlp.experts.0.gate_proj")


def _layers(n_blocks=2):
    rel = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]
    return {f"l.{b}": [f"l.{b}.{r}" for r in rel] for b in range(n_blocks)}


def test_groups_default_and_shared_layers():
    bl = _layers()
    names = [n for v in bl.values() for n in v]
    groups = scheme_groups(bl, names, [])
    assert ["l.0.self_attn.q_proj", "l.0.self_attn.k_proj", "l.0.self_attn.v_proj"] in groups
    assert ["l.0.mlp.gate_proj", "l.0.mlp.up_proj"] in groups and len(groups) == 8
    # a pattern joins within each block; full names join across blocks
    g = scheme_groups(bl, names, [["o_proj", "down_proj"], ["l.0.mlp.down_proj", "l.1.mlp.down_proj"]])
    assert sorted(map(len, g)) == [2, 2, 3, 3, 4]
    assert any({"l.0.self_attn.o_proj", "l.0.mlp.down_proj", "l.1.mlp.down_proj", "l.1.self_attn.o_proj"} == set(x)
               for x in g)
    with pytest.raises(ConfigError, match=r"shared_layers entries \['nothing_here'\] match no layer"):
        scheme_groups(bl, names, [["nothing_here", "o_proj"]])


def test_choice_is_the_exact_optimum_within_the_budget():
    rng = np.random.default_rng(0)
    for _ in range(30):
        g, o = rng.integers(2, 6), rng.integers(2, 4)
        costs = rng.integers(1, 20, size=(g, o)).astype(float) * 1000
        losses = rng.random((g, o))
        budget = float(rng.uniform(costs.min(1).sum(), costs.max(1).sum()))
        picked = choose(costs, losses, budget, resolution=200000)
        spent = sum(costs[i, p] for i, p in enumerate(picked))
        assert spent <= budget
        best = min((sum(losses[i, p] for i, p in enumerate(c)) for c in itertools.product(range(o), repeat=g)
                    if sum(costs[i, p] for i, p in enumerate(c)) <= budget))
        assert sum(losses[i, p] for i, p in enumerate(picked)) == pytest.approx(best)


def test_loss_gradient_after_blocks_matches_the_whole_model(stories_dir):
    from transformers import AutoModelForCausalLM

    from signround.model.capture import loss_grad_after_blocks
    from signround.model.layers import find_block_names

    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    blocks = find_block_names(model)
    ids = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    kept = []
    handle = model.get_submodule(blocks[-1]).register_forward_hook(
        lambda _m, _a, out: kept.append((out[0] if isinstance(out, tuple) else out).retain_grad() or
                                        (out[0] if isinstance(out, tuple) else out)))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    handle.remove()
    hidden = kept[0]
    grad, total = loss_grad_after_blocks(model, blocks, hidden.detach(), ids, None, batch_size=1)
    # per-sample means weighted by their share equal the batch mean (same token count per sample)
    assert total == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(grad, hidden.grad, rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def chosen(stories_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("as") / "out"
    ar = AutoRound(str(stories_dir), scheme=AutoScheme(2.9, OPTS), **SMALL)
    ar.quantize_and_save(out, format="auto_round")
    return ar, out


def test_autoscheme_meets_the_budget_and_saves_a_reusable_layer_config(chosen, stories_dir, tmp_path):
    ar, out = chosen
    sel = ar.selection
    assert sel.avg_bits <= 2.9 and sel.avg_bits > 2.5  # the budget is used, not left idle
    report = json.loads((out / "report.json").read_text())
    assert report["autoscheme"]["avg_bits"] == pytest.approx(sel.avg_bits, abs=1e-4)
    cfg = json.loads((out / "layer_config.json").read_text())
    assert set(cfg) == set(ar.plan.quantized) and len({v["bits"] for v in cfg.values()}) > 1
    for b in ar.plan.block_names:  # fused layers share a scheme
        assert len({cfg[f"{b}.self_attn.{p}_proj"]["bits"] for p in "qkv"}) == 1
        assert cfg[f"{b}.mlp.gate_proj"] == cfg[f"{b}.mlp.up_proj"]
    # DeltaLoss falls as bits rise, for every group
    for row in sel.rows:
        s = row["scores"]
        assert s["W2A16G32"] > s["W3A16G32"] > s["W4A16G32"] > 0
    # the saved model loads and runs; reusing layer_config.json gives the same tensors
    model = load_quantized(str(out))
    assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()
    again = tmp_path / "again"
    r = subprocess.run([sys.executable, "-m", "signround", str(stories_dir), "--layer_config", str(out / "layer_config.json"),
                        "--iters", "0", "--nsamples", "4", "--seqlen", "32", "--batch_size", "2", "--output_dir", str(again),
                        "--scheme", "W2A16G32"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_streamed_and_in_memory_choose_the_same(chosen, stories_dir):
    ar, _ = chosen
    whole = AutoRound(str(stories_dir), scheme=AutoScheme(2.9, OPTS), low_cpu_mem_usage=False, **SMALL)
    sel = whole.choose_schemes()
    assert [r["option"] for r in sel.rows] == [r["option"] for r in ar.selection.rows]
    np.testing.assert_allclose([r["score"] for r in sel.rows], [r["score"] for r in ar.selection.rows], rtol=1e-3)


def test_bf16_option_and_fixed_layers_count(stories_dir):
    ar = AutoRound(str(stories_dir), scheme=AutoScheme(6.0, "W4A16G32,BF16"),
                   layer_config={"down_proj": {"bits": 8, "group_size": 32}}, **SMALL)
    sel = ar.choose_schemes()
    assert all("down_proj" not in n for r in sel.rows for n in r["layers"])  # fixed, not chosen
    assert {r["option"] for r in sel.rows} == {"W4A16G32", "BF16"} and sel.avg_bits <= 6.0
    assert ar.plan.specs["model.layers.0.mlp.down_proj"].bits == 8


def _no_scoring(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("scoring ran before the bad input was refused")

    # the package exports a function named select: patch the module itself
    monkeypatch.setattr(importlib.import_module("signround.autoscheme.select"), "score_groups", fail)


@pytest.mark.parametrize("budget,match", [(2.0, r"outside what the options reach.*2\.5"), (9.0, "outside what the options reach")])
def test_budget_outside_the_options_range_is_refused(stories_dir, monkeypatch, budget, match):
    _no_scoring(monkeypatch)
    with pytest.raises(ConfigError, match=match):
        AutoRound(str(stories_dir), scheme=AutoScheme(budget, OPTS), **SMALL)


@pytest.mark.parametrize("options,match", [
    ("W2A16G32,W9A16", "AutoScheme option W9A16: 9-bit integer weights are not supported"),
    ("W2A16G32,GGUF:Q4_K_M", "choose GGUF options .BF16 may join them. or none"),
    ("W4A16G32", "at least two different options"),
    ("NOPE,W4A16", "unknown scheme"),
])
def test_bad_options_are_refused(options, match):
    with pytest.raises(ConfigError, match=match):
        AutoScheme(3.0, options)


def test_a_format_that_cannot_hold_an_option_is_named_before_scoring(stories_dir, tmp_path, monkeypatch):
    _no_scoring(monkeypatch)
    ar = AutoRound(str(stories_dir), scheme=AutoScheme(3.0, OPTS), **SMALL)
    with pytest.raises(ExportError, match="AutoScheme option W2A16G32: auto_awq holds 4-bit weights only"):
        ar.quantize_and_save(tmp_path / "o", format="auto_awq")
    assert not (tmp_path / "o").exists()


def test_autoscheme_refuses_scheme_overrides(stories_dir):
    with pytest.raises(ConfigError, match="with AutoScheme the options set every layer's scheme"):
        AutoRound(str(stories_dir), scheme=AutoScheme(3.0, OPTS), bits=4)


def test_cli_autoscheme(stories_dir, tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "signround", str(stories_dir), "--options", "W2A16G32,W4A16G32",
                        "--avg_bits", "3.2", "--shared_layers", "o_proj,down_proj", "--iters", "0", "--nsamples", "4",
                        "--seqlen", "32", "--batch_size", "2", "--output_dir", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "AutoScheme:" in r.stderr and "layers per option" in r.stderr
    cfg = json.loads((out / "layer_config.json").read_text())
    for b in range(5):
        assert cfg[f"model.layers.{b}.self_attn.o_proj"]["bits"] == cfg[f"model.layers.{b}.mlp.down_proj"]["bits"]
    assert json.loads((out / "report.json").read_text())["autoscheme"]["avg_bits"] <= 3.2


@pytest.mark.parametrize("args,match", [
    (["--bits", "3.5"], "not a whole number of bits"),
    (["--options", "W2A16G32,W4A16G32"], "needs the budget"),
    (["--avg_bits", "3"], "need --options"),
    (["--options", "W2A16G32,W4A16G32", "--bits", "3", "--scheme", "W4A16"], "cannot be used together"),
    (["--options", "W2A16G32,W4A16G32", "--avg_bits", "3", "--shared_layers", "zzz"], "match no layer"),
])
def test_cli_autoscheme_bad_input(stories_dir, tmp_path, args, match):
    r = subprocess.run([sys.executable, "-m", "signround", str(stories_dir), "--iters", "0", "--nsamples", "4",
                        "--seqlen", "32", "--output_dir", str(tmp_path / "x"), *args], capture_output=True, text=True)
    assert r.returncode == 2 and match in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()


def test_scoring_in_chunks_of_samples_agrees_with_one_pass(stories_dir):
    """Stored block inputs over the memory bound: the samples are scored in chunks (each a forward
    and a backward pass), summing to about the one-pass scores (the clipping search then weights
    by the first chunk's inputs only)."""
    from signround.autoscheme.score import score_groups
    from signround.autoscheme.select import units_by_block

    ar = AutoRound(str(stories_dir), scheme=AutoScheme(2.9, OPTS), **SMALL)
    req, plan, ids = ar._request, ar.plan, ar._autoscheme_ids()
    args = (ar._model, plan.block_names, units_by_block(req, plan), len(req.groups), req.options, req.layer_specs, ids, ar.cfg,
            ar.devmap, ar.source, 2)
    whole = score_groups(*args)
    per_sample = len(plan.block_names) * ids.shape[1] * ar._model.config.hidden_size * 2  # bf16 or fp32 cache
    chunked = score_groups(*args, max_cache_bytes=2 * per_sample)  # two chunks (or four with a float32 cache)
    assert np.all(chunked[:, 0] > chunked[:, 1]) and np.all(chunked[:, 1] > chunked[:, 2])
    np.testing.assert_allclose(chunked, whole, rtol=0.25)


def test_resume_reuses_the_interrupted_runs_choice(chosen, stories_dir, tmp_path, monkeypatch):
    """A run stopped after two blocks, resumed: the choice comes from the resume state (no scoring
    again) and the files equal an uninterrupted run's."""
    from signround.resume import RunCheckpoint
    from test_streaming import same_files

    _, ref = chosen
    out = tmp_path / "out"
    save = RunCheckpoint.save

    def crash_after_two(self, point):
        save(self, point)
        if point.blocks_done == 2:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(RunCheckpoint, "save", crash_after_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        AutoRound(str(stories_dir), scheme=AutoScheme(2.9, OPTS), **SMALL).quantize_and_save(out, format="auto_round")
    monkeypatch.setattr(RunCheckpoint, "save", save)
    state = json.loads((tmp_path / ".out.signround-partial" / "resume" / "state.json").read_text())
    assert state["blocks_done"] == 2 and state["autoscheme"]["groups"]
    _no_scoring(monkeypatch)
    # other AutoScheme settings are refused, naming the scheme
    with pytest.raises(ConfigError, match="different scheme"):
        AutoRound(str(stories_dir), scheme=AutoScheme(2.8, OPTS), **SMALL).quantize_and_save(out, resume=True)
    ar = AutoRound(str(stories_dir), scheme=AutoScheme(2.9, OPTS), **SMALL)
    ar.quantize_and_save(out, format="auto_round", resume=True)
    assert [r["option"] for r in ar.selection.rows] == [r["option"] for r in chosen[0].selection.rows]
    same_files(out, ref)


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory, stories_dir):
    from tiny_models import wide_model

    return wide_model(tmp_path_factory.mktemp("wide"), stories_dir, tied=False)


def test_gguf_options_mix_llama_cpp_types_per_layer(wide_dir, tmp_path):
    """GGUF options: each layer takes the block type its option's llama.cpp mix gives it, the token
    embedding and output follow the dearest option (the file type, the format when none is given);
    the file loads in transformers with our logits, and the saved layer_config rebuilds it."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from signround.export.gguf.mixes import Mix

    ar = AutoRound(str(wide_dir), scheme=AutoScheme(4.0, "GGUF:Q2_K_S,GGUF:Q4_K_M"), **SMALL)
    ar.quantize_and_save(tmp_path / "o", self_check=False)  # format: gguf:q4_k_m, implied
    sel = ar.selection
    assert 3.8 < sel.avg_bits <= 4.0 and {r["option"] for r in sel.rows} == {"GGUF:Q2_K_S", "GGUF:Q4_K_M"}
    (f,) = (tmp_path / "o").glob("*-q4_k_m.gguf")
    types = {t.name.removesuffix(".weight"): t.tensor_type.name.lower() for t in GGUFReader(str(f)).tensors}
    mix = Mix(ar._model)
    for row in sel.rows:
        for name in row["layers"]:
            want = mix.spec(row["option"].lower()[5:], name)  # e.g. attn_v of layer 0 under Q4_K_M: q6_k
            assert types[f"blk.{name.split('.')[2]}.{_role(name)}"] == want.ggml_type
    assert types["token_embd"] == "q4_k" and types["output"] == "q6_k"  # Q4_K_M's rules
    # the counted bits: block layers at their types plus the embedding and output
    sizes = {t.name.removesuffix(".weight"): int(t.n_bytes) for t in GGUFReader(str(f)).tensors if len(t.shape) == 2}
    assert sum(sizes.values()) * 8 / ar._request.params == pytest.approx(sel.avg_bits, rel=1e-6)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "o"), gguf_file=f.name, dtype=torch.float32)
    ids = torch.arange(40).reshape(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ar.model(ids).logits, atol=1e-5, rtol=1e-5)
    # --layer_config FILE with the file type as the scheme writes the same file
    again = AutoRound(str(wide_dir), scheme="GGUF:Q4_K_M", layer_config=json.loads((tmp_path / "o" / "layer_config.json").read_text()),
                      **SMALL)
    again.quantize_and_save(tmp_path / "again", self_check=False)
    assert (tmp_path / "again" / f.name).read_bytes() == f.read_bytes()


def _role(name: str) -> str:
    return {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[name.rsplit(".", 1)[1]]


def test_gguf_options_refusals(wide_dir, tmp_path, monkeypatch):
    _no_scoring(monkeypatch)
    ar = AutoRound(str(wide_dir), scheme=AutoScheme(4.0, "GGUF:Q2_K_S,GGUF:Q4_K_M"), **SMALL)
    for fmt in ("auto_round", "gguf:q2_k_s"):
        with pytest.raises(ExportError, match="file type Q4_K_M .the dearest option.*--format gguf:q4_k_m"):
            ar.quantize_and_save(tmp_path / "o", format=fmt)
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="outside what the options reach"):
        AutoRound(str(wide_dir), scheme=AutoScheme(2.0, "GGUF:Q2_K_S,GGUF:Q4_K_M"), **SMALL)


def test_cli_gguf_options_write_the_dearest_file_type(wide_dir, tmp_path):
    from signround.cli import main

    out = tmp_path / "o"
    assert main([str(wide_dir), "--options", "GGUF:Q4_K_S,GGUF:Q2_K_S", "--avg_bits", "3.5", "--iters", "0",
                 "--nsamples", "4", "--seqlen", "32", "--batch_size", "2", "--output_dir", str(out)]) == 0
    assert [p.name for p in out.glob("*.gguf")] == ["wide-llama-untied-q4_k_s.gguf"]
    cfg = json.loads((out / "layer_config.json").read_text())
    assert {c["ggml_type"] for c in cfg.values()} >= {"q2_k", "q4_k"}


def test_moe_experts_choose_together_even_when_a_batch_routes_none_to_some(tiny_model_dir):
    """Scoring an MoE model: an expert routed no token of a mini-batch has no weight gradient
    there (it was scored as a crash before); the experts of one projection share one option."""
    ar = AutoRound(str(tiny_model_dir("qwen3_moe")), scheme=AutoScheme(3.0, OPTS), iters=0, nsamples=2, seqlen=8,
                   batch_size=1, dataset=[list(range(3, 11)), list(range(20, 28))])
    sel = ar.choose_schemes()
    assert sel.avg_bits <= 3.0
    experts = [r for r in sel.rows if ".experts." in r["layers"][0]]
    assert experts and all(len(r["layers"]) >= 8 for r in experts)  # all 8 experts of a projection, one option
    for b in (0, 1):
        down = {ar.plan.specs[f"model.layers.{b}.mlp.experts.{e}.down_proj"] for e in range(8)}
        assert len(down) == 1
