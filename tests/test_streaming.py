"""Streaming (the default for local safetensors), write-as-you-go and resuming after a kill.

A streamed run builds the model on the meta device and reads one block at a time from the shards;
its output must be the same files, byte for byte, as a run that loaded the whole model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from signround import AutoRound
from signround.cli import main
from tiny_models import ARCHS, wide_model

REPO = Path(__file__).resolve().parents[1]
FAST = dict(nsamples=4, seqlen=16, batch_size=2, enable_torch_compile=False)


def same_files(a: Path, b: Path) -> None:
    """Every file of two outputs is byte-identical (report.json holds times, so it is skipped)."""
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name not in ("report.json", "report.png"))
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name not in ("report.json", "report.png"))
    assert fa == fb
    for rel in fa:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def run_both(src: Path, tmp_path: Path, fmt: str, **kw) -> tuple[AutoRound, AutoRound]:
    streamed = AutoRound(str(src), **kw)
    assert streamed.streamed
    streamed.quantize_and_save(tmp_path / "streamed", format=fmt)
    whole = AutoRound(str(src), low_cpu_mem_usage=False, **kw)
    assert not whole.streamed
    whole.quantize_and_save(tmp_path / "whole", format=fmt)
    same_files(tmp_path / "streamed", tmp_path / "whole")
    return streamed, whole


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_signround_writes_the_whole_model_runs_files_on_every_architecture(arch, tiny_model_dir, tmp_path):
    ids = torch.randint(3, 120, (4, 16), generator=torch.Generator().manual_seed(0)).tolist()
    streamed, _ = run_both(tiny_model_dir(arch), tmp_path, "auto_round,fake", scheme="W4A16", group_size=16,
                           iters=3, dataset=ids, **FAST)
    report = json.loads((tmp_path / "streamed" / "auto_round" / "report.json").read_text())
    assert report["streamed"] is True and [c["status"] for c in report["self_check"]] == ["passed"]


@pytest.mark.parametrize("fmt", ["auto_round", "auto_gptq", "auto_awq", "llm_compressor", "fake"])
def test_streamed_and_whole_runs_write_identical_files_in_every_format(fmt, tiny_model_dir, tmp_path):
    run_both(tiny_model_dir("llama"), tmp_path, fmt, scheme="W4A16", group_size=16, iters=0, disable_opt_rtn=True)


def test_streamed_gguf_and_half_precision_checkpoints(stories_dir, tmp_path):
    """A float16 checkpoint streams in float16 (what from_pretrained gives), and a GGUF k-quant
    mix (quantized token embedding, tied output) comes out identical to the whole-model run's."""
    src = wide_model(tmp_path, stories_dir, tied=True)
    half = tmp_path / "half"
    AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float16).save_pretrained(half)
    for f in src.iterdir():
        if "token" in f.name:
            (half / f.name).write_bytes(f.read_bytes())
    streamed, _ = run_both(half, tmp_path, "gguf:q4_k_m,fake", scheme="GGUF:Q4_K_M", iters=0,
                           nsamples=4, seqlen=32, batch_size=4)
    assert streamed._model.model.embed_tokens.weight.dtype == torch.float16


def test_streaming_holds_one_block_at_a_time(tiny_model_dir, monkeypatch):
    """While a block is tuned, no other block has real tensors (the memory model's promise)."""
    from signround.tune import pipeline

    seen = []
    real = pipeline._quantize_unit

    def spy(unit, *a, **k):
        model = ar._model
        live = [b for b in ar.plan.block_names if not next(model.get_submodule(b).parameters()).is_meta]
        seen.append(live)
        return real(unit, *a, **k)

    monkeypatch.setattr(pipeline, "_quantize_unit", spy)
    ids = torch.randint(3, 120, (4, 16), generator=torch.Generator().manual_seed(0)).tolist()
    ar = AutoRound(str(tiny_model_dir("qwen3")), scheme="W4A16", group_size=16, iters=2, dataset=ids, **FAST)
    ar.quantize()
    assert seen == [[b] for b in ar.plan.block_names]


def test_max_shard_size_shards_a_streamed_output(stories_dir, tmp_path):
    rc = main(["--model", str(stories_dir), "--iters", "0", "--disable_opt_rtn", "--max_shard_size", "100KB",
               "--output_dir", str(tmp_path / "o")])
    assert rc == 0
    index = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / "o" / s).is_file() for s in shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"


# -- resume --------------------------------------------------------------------------------------

CMD = ["--scheme", "W2A16G32", "--iters", "40", "--nsamples", "8", "--seqlen", "64", "--batch_size", "4",
       "--disable_torch_compile"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from signround.cli import main; sys.exit(main(sys.argv[1:]))", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def test_killed_run_resumes_to_the_same_files(stories_dir, tmp_path):
    """SIGKILL in the middle of the run (after at least two finished blocks), then the same command
    with --resume: the output equals an uninterrupted run's, file for file."""
    out = tmp_path / "out"
    state = tmp_path / ".out.signround-partial" / "resume" / "state.json"
    proc = subprocess.Popen(_cli("--model", str(stories_dir), *CMD, "--output_dir", str(out)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if state.is_file():
            try:
                done = json.loads(state.read_text())["blocks_done"]
            except (ValueError, KeyError):
                done = 0
            if done >= 2:
                break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and state.is_file()

    # the same command without --resume names both ways forward
    r = subprocess.run(_cli("--model", str(stories_dir), *CMD, "--output_dir", str(out)), env=_env(),
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--resume" in r.stderr and "--start_over" in r.stderr
    # different settings are refused, naming the one that differs
    r = subprocess.run(_cli("--model", str(stories_dir), *CMD[:-1], "--iters", "41", "--disable_torch_compile",
                            "--output_dir", str(out), "--resume"), env=_env(), capture_output=True, text=True)
    assert r.returncode == 2 and "different iters" in r.stderr, r.stderr[-2000:]

    r = subprocess.run(_cli("--model", str(stories_dir), *CMD, "--output_dir", str(out), "--resume"), env=_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming after block" in r.stderr
    assert not (tmp_path / ".out.signround-partial").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from_block"] >= 2 and len(report["blocks"]) == 5

    ref = tmp_path / "ref"
    r = subprocess.run(_cli("--model", str(stories_dir), *CMD, "--output_dir", str(ref)), env=_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    same_files(out, ref)


def test_start_over_discards_an_unfinished_run(stories_dir, tmp_path):
    out = tmp_path / "out"
    partial = tmp_path / ".out.signround-partial"
    (partial / "resume").mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"half written")
    assert main(["--model", str(stories_dir), "--iters", "0", "--disable_opt_rtn", "--output_dir", str(out)]) == 2
    assert main(["--model", str(stories_dir), "--iters", "0", "--disable_opt_rtn", "--output_dir", str(out),
                 "--start_over"]) == 0
    assert not partial.exists() and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_end_cleanly_and_keep_finished_blocks(stories_dir, tmp_path, sig, code):
    out = tmp_path / "out"
    state = tmp_path / ".out.signround-partial" / "resume" / "state.json"
    slow = [*CMD[:3], "200", *CMD[4:]]  # long enough that the signal arrives mid-run
    proc = subprocess.Popen(_cli("--model", str(stories_dir), *slow, "--output_dir", str(out)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not state.is_file():
        time.sleep(0.02)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err and "--resume" in err
    assert state.is_file() and not out.exists()
