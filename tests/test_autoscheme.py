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
    ("W2A16G32,GGUF:Q4_K_M", "GGUF types cannot be mixed by AutoScheme"),
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
    args = (ar._model, plan.block_names, units_by_block(req, plan), len(req.groups), req.options, ids, ar.cfg,
            ar.devmap, ar.source, 2)
    whole = score_groups(*args)
    per_sample = len(plan.block_names) * ids.shape[1] * ar._model.config.hidden_size * 2  # bf16 or fp32 cache
    chunked = score_groups(*args, max_cache_bytes=2 * per_sample)  # two chunks (or four with a float32 cache)
    assert np.all(chunked[:, 0] > chunked[:, 1]) and np.all(chunked[:, 1] > chunked[:, 2])
    np.testing.assert_allclose(chunked, whole, rtol=0.25)
