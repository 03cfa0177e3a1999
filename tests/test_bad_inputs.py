"""Bad input and faults: each ends in exit code 2 (130/143 for signals), one line that names the fix,
no traceback, and nothing left behind (no output directory, no hidden partial directory).

Real faults where the machine allows: a truncated shard, NaN weights, a read-only mount, a small
filesystem that fills up (tests/test_cli.py), a SIGKILL / SIGTERM / SIGINT to a subprocess
(tests/test_streaming.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from signround.cli import main


@dataclass
class Case:
    id: str
    argv: Callable[[Path, Path], list[str]]  # (stories model dir, tmp dir) -> arguments
    needle: str


def _copy(stories: Path, tmp: Path, name: str) -> Path:
    dst = tmp / name
    shutil.copytree(stories, dst)
    return dst


def _bin_only(stories: Path, tmp: Path) -> Path:
    d = _copy(stories, tmp, "binonly")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    return d


def _truncated(stories: Path, tmp: Path) -> Path:
    d = _copy(stories, tmp, "truncated")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # a download cut short
    return d


def _missing_shard(stories: Path, tmp: Path) -> Path:
    d = _copy(stories, tmp, "sharded")
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(sd)
    save_file({k: sd[k] for k in names[:10]}, str(d / "model-00001-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {k: ("model-00001-of-00002.safetensors" if i < 10 else
                                                 "model-00002-of-00002.safetensors") for i, k in enumerate(names)}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


def _nan_weights(stories: Path, tmp: Path) -> Path:
    d = _copy(stories, tmp, "nan")
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.3.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def _file(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.write_text(text)
    return p


def _stale_partial(stories: Path, tmp: Path) -> list[str]:
    (tmp.parent / ".out.signround-partial" / "resume").mkdir(parents=True)  # beside --output_dir
    return ["--model", str(stories), "--iters", "0", "--disable_opt_rtn"]


Q = ["--iters", "0", "--disable_opt_rtn"]  # the cheapest run, so only the mistake can stop it

CASES = [
    Case("missing model path", lambda s, t: ["--model", str(t / "nope"), *Q], "does not exist"),
    Case("hub id offline", lambda s, t: ["--model", "someorg/somemodel", *Q], "Hugging Face Hub id"),
    Case("directory without config", lambda s, t: ["--model", str(t), *Q], "no config.json"),
    Case(".bin-only checkpoint", lambda s, t: ["--model", str(_bin_only(s, t)), *Q], "safetensors only"),
    Case("truncated shard", lambda s, t: ["--model", str(_truncated(s, t)), *Q], "is truncated"),
    Case("shard missing from the index", lambda s, t: ["--model", str(_missing_shard(s, t)), *Q], "lacks shard"),
    Case("NaN weights", lambda s, t: ["--model", str(_nan_weights(s, t)), *Q], "contains NaN"),
    Case("unknown scheme", lambda s, t: ["--model", str(s), "--scheme", "W5A99", *Q], "W5A99"),
    Case("bits the format cannot hold", lambda s, t: ["--model", str(s), "--bits", "3", "--format", "auto_awq", *Q],
         "4-bit weights only"),
    Case("FP scheme into auto_gptq", lambda s, t: ["--model", str(s), "--scheme", "MXFP4", "--format", "auto_gptq", *Q],
         "llm_compressor"),
    Case("unknown format", lambda s, t: ["--model", str(s), "--format", "onnx", *Q], "unknown format"),
    Case("gguf format, int scheme", lambda s, t: ["--model", str(s), "--scheme", "W4A16", "--format", "gguf:q4_0", *Q],
         "--scheme GGUF:Q4_0"),
    Case("unknown dataset option", lambda s, t: ["--model", str(s), "--iters", "0", "--dataset", "a.txt:shuffle=1"],
         "unknown option 'shuffle'"),
    Case("missing dataset file", lambda s, t: ["--model", str(s), "--iters", "0", "--dataset", str(t / "none.jsonl")],
         "none.jsonl"),
    Case("empty dataset file", lambda s, t: ["--model", str(s), "--iters", "0", "--dataset",
                                            str(_file(t, "empty.txt", ""))], "is empty"),
    Case("samples shorter than seqlen", lambda s, t: ["--model", str(s), "--iters", "0", "--seqlen", "256", "--dataset",
                                                     str(_file(t, "short.txt", "one short line\nanother\n"))],
         "no calibration sample has 256 tokens"),
    Case("malformed dataset spec", lambda s, t: ["--model", str(s), "--iters", "0", "--dataset", "a.txt:num=zero"],
         "num must be a positive integer"),
    Case("unknown eval backend", lambda s, t: ["--model", str(s), *Q, "--tasks", "ppl:x.txt", "--eval_backend", "bogus"],
         "invalid choice: 'bogus'"),
    Case("limit 0", lambda s, t: ["--model", str(s), *Q, "--tasks", "ppl:x.txt", "--limit", "0"],
         "expected a positive integer"),
    Case("eval text shorter than a window", lambda s, t: ["--model", str(s), *Q, "--tasks",
                                                         f"ppl:{_file(t, 'tiny.txt', 'Once upon a time.')}"],
         "fewer than one window"),
    Case("missing eval text", lambda s, t: ["--model", str(s), *Q, "--tasks", f"ppl:{t / 'gone.txt'}"], "no file"),
    Case("missing layer_config file", lambda s, t: ["--model", str(s), *Q, "--layer_config", str(t / "lc.json")],
         "does not exist"),
    Case("layer_config not JSON", lambda s, t: ["--model", str(s), *Q, "--layer_config", "{down_proj: 8}"],
         "not valid JSON"),
    Case("layer_config key matching nothing", lambda s, t: ["--model", str(s), *Q, "--layer_config",
                                                           '{"attn.c_proj": {"bits": 8}}'], "attn.c_proj"),
    Case("device_map cuda without CUDA", lambda s, t: ["--model", str(s), *Q, "--device_map", "cuda"],
         "needs a CUDA GPU"),
    Case("device_map 0 without a GPU", lambda s, t: ["--model", str(s), *Q, "--device_map", "0"], "--device_map cpu"),
    Case("seqlen beyond the context", lambda s, t: ["--model", str(s), "--iters", "0", "--seqlen", "4096"],
         "longer than the model's context"),
    Case("negative iters", lambda s, t: ["--model", str(s), "--iters", "-1"], "non-negative integer"),
    Case("unknown cache dtype", lambda s, t: ["--model", str(s), *Q, "--cache_dtype", "int8"], "invalid choice"),
    Case("bad max_shard_size", lambda s, t: ["--model", str(s), *Q, "--max_shard_size", "big"], "is not a size"),
    Case("unfinished run without --resume", _stale_partial, "--resume"),
]


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse
        return int(e.code)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_fast_with_one_line(case, stories_dir, tmp_path, capsys, monkeypatch):
    # the only thing a bad input may cost is the check: no tuning may start
    from signround.tune import pipeline

    if case.id.startswith("device_map") and torch.cuda.is_available():
        pytest.skip("the case is a machine without a GPU")

    def no_tuning(*a, **k):
        raise AssertionError("tuning started despite the bad input")

    monkeypatch.setattr(pipeline, "_quantize_unit", no_tuning)
    monkeypatch.chdir(tmp_path)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    out = tmp_path / "out"
    before = set(tmp_path.iterdir())
    rc = run([*case.argv(stories_dir, inputs), "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and case.needle in errors[0], err[-2000:]
    assert "Traceback" not in err
    assert not out.exists()
    left = {p.name for p in set(tmp_path.iterdir()) - before}
    assert left <= {".out.signround-partial"} if case.id == "unfinished run without --resume" else not left, left


def test_read_only_location_is_named(stories_dir, tmp_path, capsys):
    """A read-only mount (real EROFS; permission bits mean nothing to root)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here ({r.stderr.strip() or r.returncode})")
    try:
        rc = run(["--model", str(stories_dir), *Q, "--output_dir", str(mnt / "out")])
        err = capsys.readouterr().err
        assert rc == 2 and "cannot write under" in err and "Read-only file system" in err
        assert "Traceback" not in err and not any(mnt.iterdir())
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_report_of_a_directory_without_one(tmp_path, capsys):
    assert run(["report", str(tmp_path)]) == 2
    assert "no report.json" in capsys.readouterr().err


def test_eval_of_a_truncated_checkpoint(stories_dir, tmp_path, capsys):
    d = _truncated(stories_dir, tmp_path)
    assert run(["eval", "--model", str(d), "--tasks", "ppl:x.txt"]) == 2
    err = capsys.readouterr().err
    assert "is truncated" in err and "Traceback" not in err


def test_quantize_and_save_reports_nan_before_tuning_in_the_api(stories_dir, tmp_path, monkeypatch):
    from signround import AutoRound
    from signround.errors import ModelError

    d = _nan_weights(stories_dir, tmp_path)
    ar = AutoRound(str(d), iters=0, disable_opt_rtn=True)
    with pytest.raises(ModelError, match="model.layers.3.mlp.up_proj"):
        ar.quantize_and_save(tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.signround-partial").exists()
    assert torch.isnan(load_file(str(d / "model.safetensors"))["model.layers.3.mlp.up_proj.weight"]).any()
