"""SignRound and optimized RTN on stories260K: losses, chaining, lm_head, logs, reload."""

import json
import logging

import pytest
import torch

from signround import AutoRound, load_quantized
from signround.qdq import qdq
from signround.schemes import QuantSpec
from signround.tune.signround import compiled_qdq, qdq_values

SMALL = dict(nsamples=8, seqlen=64, batch_size=4, enable_torch_compile=False)


@pytest.fixture(scope="module")
def tuned(stories_dir):
    ar = AutoRound(str(stories_dir), scheme="W2A16G32", iters=30, **SMALL)
    ar.quantize()
    return ar


def test_signround_beats_rtn_on_every_block(tuned):
    stats = tuned.result.block_stats
    assert len(stats) == 5
    for block, s in stats.items():
        assert s["loss_final"] < s["loss_rtn"], (block, s)
        assert s["loss_final"] <= s["loss_start"]
        assert s["iters_run"] == 30


def test_opt_rtn_beats_plain_rtn(stories_dir):
    ar = AutoRound(str(stories_dir), scheme="W2A16G32", iters=0, **SMALL)
    ar.quantize()
    assert ar.cfg.mode == "opt_rtn"
    for s in ar.result.block_stats.values():
        assert s["loss_start"] < s["loss_rtn"]


def test_tuned_model_saves_log_and_reloads(tuned, tmp_path):
    tuned.save_quantized(tmp_path / "q")
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["mode"] == "signround" and set(report["blocks"]) == set(tuned.result.block_stats)
    assert report["layers"]["model.layers.0.mlp.down_proj"]["scheme"] == "W2G32 sym"
    assert report["totals"]["calibration_tokens"] == 8 * 64 and report["totals"]["peak_rss_bytes"] > 0
    assert [c["status"] for c in report["self_check"]] == ["passed"]
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["iters"] == 30 and qc["nsamples"] == 8
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(str(tmp_path / "q"))(ids).logits, tuned.model(ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_quantized_lm_head_is_tuned(stories_dir):
    ar = AutoRound(str(stories_dir), scheme="W4A16", group_size=32, iters=10, quant_lm_head=True, **SMALL)
    ar.quantize()
    s = ar.result.block_stats["lm_head"]
    assert s["loss_final"] < s["loss_rtn"] and s["iters_run"] == 10
    assert "lm_head" in ar.result.qparams


def test_minmax_tuning_and_quanted_input_options_do_what_they_say(stories_dir, monkeypatch):
    """--disable_minmax_tuning: the clipping scales never move from their start (only the rounding
    is tuned); --disable_quanted_input: each block is tuned on the fp chain's inputs."""
    from signround.tune import pipeline, signround

    steps = []
    real_step = signround.TunableLayer.signed_step

    def spy_step(self, lr, minmax_lr, momentum=0.0):
        # a gradient, or only its sign (backprop_shared(sign_only=True), the default plain steps)
        has = [p.grad is not None or id(p) in self._signs for p in (self.v, self.min_scale, self.max_scale)]
        steps.append(tuple(has))
        return real_step(self, lr, minmax_lr, momentum)

    monkeypatch.setattr(signround.TunableLayer, "signed_step", spy_step)
    base = dict(scheme="W2A16G32", iters=4, **SMALL)
    AutoRound(str(stories_dir), enable_minmax_tuning=False, **base).quantize()
    assert steps and all(v and not mn and not mx for v, mn, mx in steps)
    steps.clear()
    AutoRound(str(stories_dir), **base).quantize()
    assert steps and all(v and mn and mx for v, mn, mx in steps)

    seen = []
    real_unit = pipeline._quantize_unit

    def spy_unit(unit, layers, run, x_q, target, *a, **k):
        seen.append(x_q.clone())
        return real_unit(unit, layers, run, x_q, target, *a, **k)

    monkeypatch.setattr(pipeline, "_quantize_unit", spy_unit)
    fp_chain = []
    real_batched = pipeline._batched
    monkeypatch.setattr(pipeline, "_batched", lambda *a, **k: fp_chain.append(real_batched(*a, **k)) or fp_chain[-1])
    AutoRound(str(stories_dir), enable_quanted_input=False, **base).quantize()
    # block k is tuned on exactly the fp outputs of block k-1
    assert all(torch.equal(seen[k], fp_chain[k - 1]) for k in range(1, len(seen)))
    seen.clear()
    fp_chain.clear()
    AutoRound(str(stories_dir), **base).quantize()
    assert not torch.equal(seen[1], fp_chain[0])  # the quantized chain differs from the fp one


def test_recipes_and_bad_options(stories_dir):
    from signround.errors import ConfigError
    from signround.schemes import preset
    from signround.tune.config import tune_config

    assert tune_config("best").iters == 1000 and tune_config("best").nsamples == 512
    assert tune_config("light").iters == 50 and tune_config("light").lr == 5e-3
    fast = tune_config("fast", iters=40)  # a recipe's values give way to the user's
    assert (fast.iters, fast.lr, fast.minmax_lr) == (40, 0.01, 0.0025)
    from signround.tune.config import describe_recipes  # the CLI help lists each recipe's values

    assert "light: iters 50, lr 0.005; fast: iters 30, lr 0.01, minmax_lr 0.0025" in describe_recipes()
    assert tune_config().iters == 200 and tune_config().lr_value == 1 / 200
    # nv_fp and GGUF layers take smaller automatic steps; explicit values and other types are untouched
    nv, w4, gguf = preset("NVFP4"), preset("W4A16"), preset("GGUF:Q2_K_S")
    assert tune_config(iters=50).lrs_for(nv) == pytest.approx((0.005, 0.001))
    assert tune_config(iters=50).lrs_for(w4) == (0.02, 0.02)
    assert tune_config(iters=50).lrs_for(gguf) == pytest.approx((0.005, 0.005))
    assert tune_config(iters=50, lr=0.01).lrs_for(nv) == pytest.approx((0.01, 0.002))
    assert tune_config(iters=50, lr=0.01).lrs_for(gguf) == (0.01, 0.01)
    assert tune_config(iters=50, lr=0.01, minmax_lr=0.01).lrs_for(nv) == (0.01, 0.01)
    with pytest.raises(ConfigError, match="unknown recipe"):
        tune_config("fastest")
    with pytest.raises(ConfigError, match="batch_size"):
        tune_config(batch_size=0)


def test_few_samples_lower_batch_size(stories_dir, caplog):
    caplog.set_level(logging.INFO, logger="signround")
    ar = AutoRound(str(stories_dir), scheme="W4A16", iters=2, nsamples=3, seqlen=64, batch_size=8,
                   enable_torch_compile=False)
    ar.quantize()
    assert ar.cfg.batch_size == 3 and "batch_size lowered" in caplog.text
    assert "2 iters, batch 3, lr 0.5, minmax_lr 0.5" in caplog.text  # the steps in use are logged


def test_compiled_qdq_matches_eager():
    spec = QuantSpec(bits=3, group_size=32, sym=False)
    torch.manual_seed(0)
    w = torch.randn(8, 80)
    v = (torch.rand_like(w) - 0.5).requires_grad_()
    mn = torch.rand(8, 3).requires_grad_()
    mx = torch.rand(8, 3).requires_grad_()
    fn = compiled_qdq(spec)
    assert fn is not None
    out = fn(w, v, mn, mx)
    ref = qdq(w, spec, v=v, min_scale=mn, max_scale=mx)[0]
    torch.testing.assert_close(out, ref)
    g1 = torch.autograd.grad(out.square().sum(), [v, mn, mx])
    g2 = torch.autograd.grad(ref.square().sum(), [v, mn, mx])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_qdq_of_half_weights_with_a_short_last_group(dtype):
    """SmolLM2's 576 inputs at group 128 under bf16 autocast: the compiled qdq must give the eager
    values in the short last group too (torch's CPU inductor wrote garbage there)."""
    spec = QuantSpec(bits=4, group_size=128, sym=True)
    torch.manual_seed(0)
    for _ in range(3):
        w = (torch.randn(256, 576) * 0.02).to(dtype)
        v = torch.rand(256, 576) - 0.5
        mn, mx = torch.rand(256, 5) * 0.5 + 0.5, torch.rand(256, 5) * 0.5 + 0.5
        out = qdq_values(spec, w, v, mn, mx, compile_qdq=True)
        ref = qdq_values(spec, w, v, mn, mx, compile_qdq=False)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=0)


def test_denormals_flushed_only_while_tuning():
    from signround.tune.pipeline import flush_denormals

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormal floats")
    tiny = torch.tensor([1e-40])
    with flush_denormals():
        assert (tiny * 1).item() == 0.0
    assert (tiny * 1).item() > 0  # the caller's arithmetic is left as it was


def test_clip_search_through_compiled_kernels_chooses_the_same():
    # SignRound's start searches the clipping with compiled error kernels
    from signround.schemes import QuantSpec
    from signround.tune.rtn import COARSE_CLIP_GRID, search_clip

    g = torch.Generator().manual_seed(0)
    w, imp = torch.randn(64, 160, generator=g), torch.rand(160, generator=g) + 0.1
    for spec in (QuantSpec(bits=2, group_size=32), QuantSpec(bits=4, group_size=64, sym=False)):
        ref = search_clip(w, spec, imp, COARSE_CLIP_GRID)
        got = search_clip(w, spec, imp, COARSE_CLIP_GRID, compile=True)
        assert all(torch.equal(a, b) for a, b in zip(ref, got))



def test_best_iteration_is_judged_relative_to_each_minibatchs_start():
    """Minibatches differ in difficulty; the kept iteration is the one whose minibatch loss is
    lowest relative to the same samples' starting loss, not the lowest raw loss (which would keep
    whichever iteration happened to draw the easy samples)."""
    from signround.schemes import preset
    from signround.tune.config import TuneConfig
    from signround.tune.signround import tune_unit

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16, bias=False)
    x = torch.randn(4, 8, 64)
    x[:2] *= 30.0  # two loud samples: their losses are ~900x the quiet ones'
    w_fp = lin.weight.detach().clone()
    calls: list[tuple[bool, torch.Tensor, torch.Tensor]] = []

    def target(idx, xb):
        return torch.nn.functional.linear(xb, w_fp)

    def run(unit, xb, _idx):
        out = unit(xb)
        calls.append((torch.is_grad_enabled(), xb, out.detach().clone()))
        return out

    cfg = TuneConfig(iters=12, batch_size=1, enable_torch_compile=False)
    res = tune_unit(lin, {"": (lin, preset("W2A16G32"))}, x, target, run, cfg, torch.device("cpu"),
                    generator=torch.Generator().manual_seed(1))

    def loss(xb, out):
        return torch.nn.functional.mse_loss(out, target(None, xb)).item()

    # no init: a plain-RTN pass over the 4 samples in order (the start), the iterations, a final pass
    assert len(calls) == 4 + cfg.iters + 4
    start = [loss(xb, out) for _, xb, out in calls[:4]]
    steps = [(xb, out) for _, xb, out in calls[4 : 4 + cfg.iters]]
    # the last iteration is only scored: the step after it would never be evaluated, so no backward
    assert [grad for grad, _, _ in calls[4 : 4 + cfg.iters]] == [True] * (cfg.iters - 1) + [False]
    sample = [next(i for i in range(4) if torch.equal(x[i], xb[0])) for xb, _ in steps]
    raw = [loss(xb, out) for xb, out in steps]
    rel = [r / start[i] for r, i in zip(raw, sample)]
    expected = min(range(cfg.iters), key=rel.__getitem__)
    assert min(range(cfg.iters), key=raw.__getitem__) != expected  # the two rules disagree here
    assert res.stats.best_iter == expected
    assert res.stats.loss_best == pytest.approx(raw[expected], rel=1e-5)
    assert res.stats.loss_final <= res.stats.loss_start


def test_not_use_best_mse_keeps_the_last_step():
    """Without best-iteration restore the final parameters are the ones after the last step, so
    every iteration, the last included, runs its backward and steps."""
    from signround.schemes import preset
    from signround.tune.config import TuneConfig
    from signround.tune.signround import tune_unit

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16, bias=False)
    x = torch.randn(4, 8, 64)
    w_fp = lin.weight.detach().clone()
    grads: list[bool] = []

    def run(unit, xb, _idx):
        grads.append(torch.is_grad_enabled())
        return unit(xb)

    cfg = TuneConfig(iters=5, batch_size=2, not_use_best_mse=True, enable_torch_compile=False)
    res = tune_unit(lin, {"": (lin, preset("W2A16G32"))}, x, lambda idx, xb: torch.nn.functional.linear(xb, w_fp),
                    run, cfg, torch.device("cpu"), generator=torch.Generator().manual_seed(1))
    assert grads[2 : 2 + cfg.iters] == [True] * cfg.iters  # after the 2-batch RTN pass
    assert res.stats.iters_run == cfg.iters


def test_nan_loss_during_tuning_keeps_the_best_parameters_and_says_so(caplog):
    """A loss that turns NaN mid-tuning stops the loop with a warning; the block keeps the best
    finite parameters (never NaN weights)."""
    from signround.schemes import preset
    from signround.tune.config import TuneConfig
    from signround.tune.signround import tune_unit

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16, bias=False)
    x = torch.randn(4, 8, 64)
    w_fp = lin.weight.detach().clone()
    steps = [0]

    def run(unit, xb, _idx):
        out = unit(xb)
        if torch.is_grad_enabled():
            steps[0] += 1
            if steps[0] == 4:  # the 4th iteration blows up
                out = out * float("nan")
        return out

    cfg = TuneConfig(iters=10, batch_size=2, enable_torch_compile=False)
    with caplog.at_level("WARNING"):
        res = tune_unit(lin, {"": (lin, preset("W2A16G32"))}, x, lambda idx, xb: torch.nn.functional.linear(xb, w_fp),
                        run, cfg, torch.device("cpu"), generator=torch.Generator().manual_seed(1))
    assert "non-finite loss at iteration 3" in caplog.text
    assert res.stats.iters_run == 4 and res.stats.best_iter < 3
    assert torch.isfinite(lin.weight).all()
    assert res.stats.loss_final <= res.stats.loss_start


def test_micro_batched_step_has_the_whole_minibatchs_gradient():
    """On a CPU a minibatch runs as smaller forward/backward passes over qdq weights computed once;
    the offsets and clipping scales must get the gradient of the whole minibatch's loss."""
    from signround.schemes import preset
    from signround.tune.signround import TunableLayer, backprop_shared, shared_weights

    torch.manual_seed(0)
    spec = preset("W2A16G32")
    a, b = torch.nn.Linear(64, 48, bias=False), torch.nn.Linear(48, 16, bias=True)
    x, y = torch.randn(6, 5, 64), torch.randn(6, 5, 16)

    def grads(micro: int | None):
        la = TunableLayer(a, spec, None, None, tune_minmax=True)
        lb = TunableLayer(b, spec, None, None, tune_minmax=True)
        with torch.no_grad():  # start away from zero offsets so every element has a gradient path
            for layer in (la, lb):
                layer.v.uniform_(-0.4, 0.4, generator=torch.Generator().manual_seed(3))
        if micro is None:
            torch.nn.functional.mse_loss(lb(torch.relu(la(x))), y).backward()
        else:
            with shared_weights([la, lb], grad=True):
                for sub in torch.arange(6).split(micro):
                    out = lb(torch.relu(la(x[sub])))
                    (torch.nn.functional.mse_loss(out, y[sub]) * len(sub) / 6).backward()
                assert la.v.grad is None  # nothing reaches the parameters before backprop_shared
                backprop_shared([la, lb])
        return [p.grad.clone() for layer in (la, lb) for p in (layer.v, layer.min_scale, layer.max_scale)]

    whole = grads(None)
    for micro in (1, 4):
        for g_whole, g_micro in zip(whole, grads(micro)):
            torch.testing.assert_close(g_micro, g_whole, rtol=1e-4, atol=1e-7)


def test_micro_batch_size_caps_tokens_per_pass_on_cpu_only():
    from signround.tune.signround import CPU_MICRO_TOKENS, micro_batch_size

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert micro_batch_size(8, torch.empty(16, 256, 4), cpu) == CPU_MICRO_TOKENS // 256
    assert micro_batch_size(8, torch.empty(16, 2048, 4), cpu) == 1  # one long sample per pass
    assert micro_batch_size(2, torch.empty(16, 16, 4), cpu) == 2  # never more than the minibatch
    assert micro_batch_size(8, torch.empty(16, 2048, 4), cuda) == 8


def test_quantize_and_save_releases_tuned_weights_and_gives_them_back(stories_dir, tmp_path, monkeypatch):
    """A whole-model export-only run drops each tuned block's weights as it goes (peak memory): the
    files are the same as a run that kept them, and the model it returns has its weights back
    (real tensors that move, save and generate)."""
    from safetensors.torch import load_file

    from signround.tune import pipeline

    kept = AutoRound(str(stories_dir), scheme="W2A16G32", iters=5, low_cpu_mem_usage=False, **SMALL)
    kept.quantize()
    kept.save_quantized(tmp_path / "kept")
    released = []
    real = pipeline.release_weights
    monkeypatch.setattr(pipeline, "release_weights", lambda m, names, r: released.extend(names) or real(m, names, r))
    ar = AutoRound(str(stories_dir), scheme="W2A16G32", iters=5, low_cpu_mem_usage=False, **SMALL)
    model, out = ar.quantize_and_save(tmp_path / "released")
    assert set(released) == {n for b in ar.plan.block_names for n in ar.plan.layers_of(b)}
    assert not ar.result.released and not any(p.is_meta for p in model.parameters())
    a, b = load_file(tmp_path / "kept" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, kept.model(ids).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(ids).logits, load_quantized(str(out))(ids).logits, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "plain")  # an ordinary module now
    ar.save_quantized(tmp_path / "fake", format="fake")  # a format that reads the weights
    assert (tmp_path / "fake" / "model.safetensors").exists()


def test_fake_format_and_lm_head_tuning_keep_weights(stories_dir, tmp_path):
    fake = AutoRound(str(stories_dir), scheme="W4A16", group_size=32, iters=0, **SMALL)
    fake.quantize_and_save(tmp_path / "fake", format="fake")
    assert not fake.result.released
    head = AutoRound(str(stories_dir), scheme="W4A16", group_size=32, iters=0, quant_lm_head=True, **SMALL)
    model, _ = head.quantize_and_save(tmp_path / "head")  # lm_head is tuned on the whole quantized model
    assert not head.result.released and not any(p.is_meta for p in model.parameters())


def test_amp_uses_bf16_where_the_device_computes_it(monkeypatch):
    from signround.tune import pipeline
    from signround.tune.config import TuneConfig

    cpu = torch.device("cpu")
    monkeypatch.setattr(pipeline, "cpu_has_native_bf16", lambda: True)
    assert pipeline.amp_dtype(cpu, TuneConfig()) == torch.bfloat16
    assert pipeline.amp_dtype(cpu, TuneConfig(amp=False)) is None
    monkeypatch.setattr(pipeline, "cpu_has_native_bf16", lambda: False)
    assert pipeline.amp_dtype(cpu, TuneConfig()) is None  # emulated bf16 is slower than fp32


def test_bf16_autocast_tuning_still_beats_rtn(stories_dir, monkeypatch, caplog):
    """The bf16 path a CPU with AVX512-BF16/AMX takes (forced here, emulated where the CPU lacks
    it): every block still ends below its RTN loss, and the run says it tuned in bf16."""
    from signround.tune import pipeline

    monkeypatch.setattr(pipeline, "cpu_has_native_bf16", lambda: True)
    seen = []
    real = pipeline.block_forward

    def recording_forward(blk, x, kw, idx=None):
        if x.shape[1] == SMALL["seqlen"]:  # calibration samples (the self-check's probe runs in fp32)
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return real(blk, x, kw, idx)

    monkeypatch.setattr(pipeline, "block_forward", recording_forward)
    with caplog.at_level("INFO", logger="signround"):
        ar = AutoRound(str(stories_dir), scheme="W2A16G32", iters=30, device_map="cpu", **SMALL)
        ar.quantize()
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert "bf16 autocast" in caplog.text
    for block, s in ar.result.block_stats.items():
        assert s["loss_final"] < s["loss_rtn"], (block, s)


def test_compile_failure_falls_back_to_eager_for_good(monkeypatch, caplog):
    from signround.tune import kernels

    monkeypatch.setattr(kernels, "_COMPILED", {})
    monkeypatch.setattr(kernels, "_BROKEN", [])

    def broken_compile(fn, **kw):
        def run(*a):
            raise RuntimeError("no C++ compiler found")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    spec = QuantSpec(bits=2, group_size=32)
    w = torch.randn(4, 64)
    with caplog.at_level("WARNING", logger="signround.tune.kernels"):
        out = kernels.call(("qdq", spec), lambda w_: qdq(w_, spec)[0], w)
    torch.testing.assert_close(out, qdq(w, spec)[0])
    assert "torch.compile failed" in caplog.text and "no C++ compiler" in caplog.text
    assert kernels.compiled(("other", spec), lambda x: x) is None  # every later kernel runs eager


def test_alg_ext_loss_leaves_out_the_largest_errors_and_widens_the_scales(stories_dir):
    from signround.schemes import preset
    from signround.tune.signround import alg_ext, block_loss, sample_errors

    target = torch.zeros(2, 10, 100)
    out = torch.full_like(target, 0.1)
    out[0, 0, 0] = out[1, 3, 7] = 50.0  # one huge error per sample (1 of 1000 values)
    plain, kept = block_loss(out, target), block_loss(out, target, suppress=True)
    assert plain > 1.0 and kept == pytest.approx(0.01 * 999 / 1000, rel=1e-5)
    assert sample_errors(out, target, True).shape == (2, 1000)
    assert alg_ext(preset("W2A16G64")) == (True, 2.0) and alg_ext(preset("W4A16")) == (False, 2.0)
    assert alg_ext(preset("GGUF:Q2_K_S")) == (False, 1.0) and alg_ext(preset("MXFP4")) == (True, 2.0)

    common = dict(scheme="W2A16G32", iters=4, nsamples=4, seqlen=32, batch_size=2, enable_torch_compile=False)
    base = AutoRound(str(stories_dir), **common)
    ext = AutoRound(str(stories_dir), enable_alg_ext=True, **common)
    base.quantize()
    ext.quantize()
    assert ext._config_record()["enable_alg_ext"] is True
    b, e = base.result.block_stats, ext.result.block_stats
    assert b.keys() == e.keys()
    # a different loss is tuned: on the first block (same inputs) the suppressed loss is the smaller
    first = base.plan.block_names[0]
    assert e[first]["loss_rtn"] < b[first]["loss_rtn"]


def test_norm_bias_tuning_tunes_norms_and_biases_and_stores_them(tmp_path, stories_dir):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from safetensors.torch import load_file
    from tiny_models import wide_model

    src = wide_model(tmp_path, stories_dir, tied=False, family="qwen2")  # k/v biases, norms of ones
    with torch.no_grad():  # norms that vary, as trained models' do
        from safetensors.torch import save_file

        sd = load_file(str(src / "model.safetensors"))
        g = torch.Generator().manual_seed(0)
        for k in sd:
            if k.endswith("layernorm.weight"):
                sd[k] = 1 + 0.2 * torch.randn(sd[k].shape, generator=g)
        save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    runs = {}
    for nb in (False, True):
        ar = AutoRound(str(src), scheme="W2A16G32", iters=8, nsamples=8, seqlen=64, batch_size=4,
                       enable_torch_compile=False, enable_norm_bias_tuning=nb)
        out = tmp_path / f"o{nb}"
        ar.quantize_and_save(out, format="auto_round")
        report = json.loads((out / "report.json").read_text())
        assert report["self_check"][0]["status"] == "passed"  # the tuned norms and biases are in the files
        runs[nb] = (ar.result.block_stats, load_file(str(next(out.glob("*.safetensors")))))
    orig = load_file(str(src / "model.safetensors"))
    for name in ("model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.k_proj.bias"):
        assert torch.equal(runs[False][1][name], orig[name]), name  # untouched without the flag
        moved = (runs[True][1][name].float() - orig[name].float()).abs()
        step = (orig[name].float().max() - orig[name].float().min()) / 15
        assert 0 < moved.max() <= step / 2 + 1e-3, name  # at most half a 4-bit step of the range
    # more tunable parameters reach a lower loss on the first block (the same inputs in both runs)
    first = {nb: stats["model.layers.0"]["loss_final"] for nb, (stats, _) in runs.items()}
    assert first[True] < first[False]


def test_nblocks_tunes_consecutive_blocks_as_one_unit(stories_dir, tmp_path):
    ar = AutoRound(str(stories_dir), scheme="W2A16G32", iters=6, nsamples=8, seqlen=64, batch_size=4,
                   enable_torch_compile=False, nblocks=2)
    ar.quantize_and_save(tmp_path / "o", format="auto_round")
    stats = ar.result.block_stats
    groups = [["model.layers.0", "model.layers.1"], ["model.layers.2", "model.layers.3"]]
    for g in groups:  # one tuning of both blocks' layers, its loss on the second block's output
        assert stats[g[0]] is stats[g[1]] and stats[g[0]]["tuned_with"] == g
        assert stats[g[0]]["loss_final"] < stats[g[0]]["loss_rtn"]
    assert "tuned_with" not in stats["model.layers.4"]  # the last, shorter group is one block
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["self_check"][0]["status"] == "passed" and report["settings"]["nblocks"] == 2
    with pytest.raises(Exception, match="nblocks must be a positive integer"):
        AutoRound(str(stories_dir), nblocks=0)
