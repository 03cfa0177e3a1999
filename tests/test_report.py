"""The run report, the export self-check, the up-front time estimate and device-chosen dtypes."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from signround import AutoRound, load_quantized
from signround.api import SelfCheckFailed
from signround.cli import main

SMALL = dict(nsamples=8, seqlen=64, batch_size=4, enable_torch_compile=False)


def test_report_json_and_the_report_command(stories_dir, tmp_path, capsys):
    rc = main(["--model", str(stories_dir), "--scheme", "W4A16", "--group_size", "32", "--iters", "3",
               "--nsamples", "8", "--seqlen", "64", "--batch_size", "4", "--disable_torch_compile",
               "--layer_config", '{"down_proj": {"bits": 8}}', "--output_dir", str(tmp_path / "o")])
    assert rc == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert set(report["blocks"]) == {f"model.layers.{i}" for i in range(5)}
    b = report["blocks"]["model.layers.0"]
    assert b["loss_final"] <= b["loss_start"] and b["iters_run"] == 3 and b["seconds"] > 0
    assert report["layers"]["model.layers.0.mlp.down_proj"]["bits"] == 8
    assert report["layers"]["model.layers.0.mlp.up_proj"]["scheme"] == "W4G32 sym"
    t = report["totals"]
    assert t["calibration_tokens"] == 8 * 64 and t["peak_rss_bytes"] > 0 and t["seconds"] > 0
    assert report["self_check"][0]["status"] == "passed"
    capsys.readouterr()
    assert main(["report", str(tmp_path / "o"), "--no_plot"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.4" in out and "self-check auto_round: passed" in out
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_report_plot_is_rendered_with_matplotlib(stories_dir, tmp_path):
    pytest.importorskip("matplotlib", reason="the report extra")
    ar = AutoRound(str(stories_dir), scheme="W4A16", group_size=32, iters=2, **SMALL)
    ar.quantize_and_save(tmp_path / "o")
    png = (tmp_path / "o" / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_self_check_catches_a_packing_bug_and_keeps_the_output(stories_dir, tmp_path, monkeypatch, capsys):
    """A packer that writes wrong codes: the run fails naming the format, exit code 2, the files
    stay (marked failed in report.json) for the bug report."""
    from signround.export import base

    real = base.pack_layer

    def buggy(qp, packing, *args):
        out = real(qp, packing, *args)
        out["qweight"] = out["qweight"] ^ 0x0F0F0F0F
        return out

    monkeypatch.setattr(base, "pack_layer", buggy)
    rc = main(["--model", str(stories_dir), "--iters", "0", "--disable_opt_rtn", "--format", "auto_round,fake",
               "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "self-check failed for auto_round" in err and "fake" not in err.split("failed for")[1][:20]
    report = json.loads((tmp_path / "o" / "auto_round" / "report.json").read_text())
    assert report["self_check"][0]["status"] == "failed" and report["self_check"][0]["relative_difference"] > 0.01
    fake = json.loads((tmp_path / "o" / "fake" / "report.json").read_text())
    assert fake["self_check"][0]["status"] == "passed"
    # --skip_self_check: the same bug goes unnoticed, as promised
    assert main(["--model", str(stories_dir), "--iters", "0", "--disable_opt_rtn", "--skip_self_check",
                 "--output_dir", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "report.json").read_text())["self_check"][0]["status"] == "skipped"


def test_long_cpu_run_is_announced_with_the_practical_setting(stories_dir, caplog, monkeypatch):
    from signround.tune import pipeline

    monkeypatch.setattr(pipeline, "time_sample_forward", lambda run, x, device: 2.0)  # a slow CPU
    with caplog.at_level(logging.INFO, logger="signround"):
        ar = AutoRound(str(stories_dir), iters=0, nsamples=8, seqlen=256, enable_torch_compile=False)
        ar.quantize()
    # 5 blocks x 3 passes x 8 samples x 2 s = 240 s: announced, not long enough to warn
    assert "expected time: about 4 min for 5 blocks" in caplog.text and "long on a CPU" not in caplog.text
    caplog.clear()
    monkeypatch.setattr(pipeline, "time_sample_forward", lambda run, x, device: 60.0)
    with caplog.at_level(logging.INFO, logger="signround"):
        AutoRound(str(stories_dir), iters=0, nsamples=24, seqlen=256, enable_torch_compile=False).quantize()
    warning = [r.message for r in caplog.records if r.levelno == logging.WARNING and "long on a CPU" in r.message]
    # 5 x 3 x 24 x 60 s = 6 h; with 16 samples 4 h
    assert warning == ["this run is long on a CPU: 24 samples x 256 tokens take about 6.0 h. The practical CPU "
                       "setting --nsamples 16 --seqlen 256 takes about 4.0 h"]


def test_signround_estimate_counts_tuning_steps():
    from signround.tune.config import TuneConfig
    from signround.tune.estimate import passes_seconds

    cfg = TuneConfig(iters=50, nsamples=16, seqlen=256, batch_size=8)
    # per block: 4 full passes of 16 samples + 50 steps x 8 samples x (forward + backward)
    assert passes_seconds(cfg, 0.01, 16, 2) == pytest.approx((4 * 16 + 50 * 8 * 3) * 0.01 * 2)
    assert passes_seconds(cfg, 0.01, 16, 2, seqlen=128) == pytest.approx(passes_seconds(cfg, 0.01, 16, 2) / 2)


@pytest.mark.parametrize("native_bf16,want", [(False, torch.float32), (True, torch.bfloat16)])
def test_loading_picks_the_compute_dtype_by_device(stories_dir, tmp_path, monkeypatch, caplog, native_bf16, want):
    """A float16 checkpoint on a CPU: float32 without native half precision (fp16 emulation is many
    times slower), bf16 where the CPU has it; an explicit dtype always wins; logged once."""
    from transformers import AutoModelForCausalLM

    import signround.devices as devices

    half = tmp_path / "half"
    AutoModelForCausalLM.from_pretrained(str(stories_dir), dtype=torch.float16).save_pretrained(half)
    for f in stories_dir.iterdir():
        if "token" in f.name:
            (half / f.name).write_bytes(f.read_bytes())
    AutoRound(str(half), iters=0, disable_opt_rtn=True).quantize_and_save(tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["dtype"] == "float16"
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(devices, "cpu_has_native_fp16", lambda: False)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="signround"):
        model = load_quantized(str(tmp_path / "q"))
    assert model.model.embed_tokens.weight.dtype == want
    assert sum("computing in" in r.message for r in caplog.records) == 1
    assert load_quantized(str(tmp_path / "q"), dtype=torch.float16).model.embed_tokens.weight.dtype == torch.float16
    from signround.eval import load_for_eval

    ev, _ = load_for_eval(str(half), device="cpu")
    assert next(ev.parameters()).dtype == want
