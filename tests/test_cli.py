"""CLI: the main job, and bad input that must fail early with a clear message and no output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from signround.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "signround", *map(str, args)], capture_output=True, text=True)


def test_cli_quantizes_and_reports(stories_dir, tmp_path):
    out = tmp_path / "out"
    r = run_cli("--model", stories_dir, "--scheme", "W4A16", "--group_size", "32", "--iters", "0",
                "--disable_opt_rtn", "--layer_config", '{"down_proj": {"bits": 8}}', "--format", "auto_round",
                "--output_dir", out)
    assert r.returncode == 0, r.stderr
    assert "W4G32 sym" in r.stderr and "W8G32 sym" in r.stderr and "average weight bits" in r.stderr
    assert "peak RSS" in r.stderr
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4


@pytest.fixture
def nan_model(stories_dir, tmp_path):
    d = tmp_path / "nan_model"
    d.mkdir()
    for f in stories_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


CASES = {
    "missing path": (["--model", "/nonexistent/model"], "does not exist"),
    "hub id": (["--model", "someorg/somemodel"], "Hugging Face Hub id"),
    "not a model": (["--model", "{tmp}"], "not a model directory"),
    "unknown scheme": (["--scheme", "INT4X"], "unknown scheme"),
    "unsupported bits preset": (["--scheme", "W5A16"], "choose bits from"),
    "bad bits": (["--bits", "5"], "choose bits from"),
    "bad group": (["--group_size", "0"], "group_size must be"),
    "regex no match": (["--layer_config", '{"nothing_like_this": {"bits": 8}}'], "matches no quantizable layer"),
    "bad json": (["--layer_config", "{bits: 8"], "not valid JSON"),
    "unknown format": (["--format", "exl2"], "unknown format"),
    "missing dataset": (["--iters", "2", "--dataset", "/nonexistent/calib.json"], "does not exist"),
    "unknown dataset option": (["--iters", "2", "--dataset", "signround-default:numb=4"], "unknown option"),
    "seqlen beyond context": (["--iters", "2", "--seqlen", "4096"], "longer than the model's context"),
    "too-short data": (["--iters", "2", "--seqlen", "64", "--dataset", "{tmp}/short.txt"], "no calibration sample"),
    "bad iters": (["--iters", "-1"], "non-negative"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_cleanly(case, stories_dir, tmp_path, capsys):
    extra, needle = CASES[case]
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    (tmp_path / "short.txt").write_text("once upon a time\nthe end\n")
    out = tmp_path / "out"
    args = ["--model", str(stories_dir), "--iters", "0", "--disable_opt_rtn", "--output_dir", str(out)]
    rc = main(args + extra)
    err = capsys.readouterr().err
    assert rc == 2 and needle in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_nan_weights_rejected(nan_model, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["--model", str(nan_model), "--iters", "0", "--disable_opt_rtn", "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "model.layers.1.mlp.up_proj" in err and "NaN" in err
    assert not out.exists()


def test_non_empty_output_dir_rejected(stories_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    rc = main(["--model", str(stories_dir), "--iters", "0", "--disable_opt_rtn", "--output_dir", str(out)])
    assert rc == 2 and "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MB tmpfs (real ENOSPC from every writer); skipped where mounting is not allowed."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or r.returncode})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("fmt", ["auto_round", "fake", "auto_round,auto_gptq"])
def test_disk_filling_up_during_the_save_leaves_nothing(stories_dir, small_fs, monkeypatch, capsys, fmt):
    """The disk fills up after the up-front space check passed: whichever writer hits it
    (safetensors shards, config, tokenizer), one message, exit code 2, nothing left behind."""
    from signround import export

    real = export.check_formats

    def then_fill(*a, **k):
        out = real(*a, **k)
        with open(small_fs / "filler", "wb") as f:  # another process taking the space
            try:
                f.write(b"\0" * (2 * 2**20))
            except OSError:
                pass
        return out

    monkeypatch.setattr(export, "check_formats", then_fill)
    rc = main(["--model", str(stories_dir), "--iters", "0", "--disable_opt_rtn", "--format", fmt,
               "--output_dir", str(small_fs / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "the disk is full" in err and str(small_fs / "out") in err and "nothing was left behind" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler"]


def test_list_formats_and_schemes(capsys):
    assert main(["list", "formats"]) == 0
    out = capsys.readouterr().out
    for fmt in ("auto_round", "auto_gptq", "auto_awq", "fake"):
        assert fmt in out
    assert "4-bit only" in out
    assert main(["list", "schemes"]) == 0 and "W2A16G64" in capsys.readouterr().out
    assert main(["list", "nothing"]) == 2


def test_console_scripts_and_module_entry_point_resolve():
    """Every console script in pyproject.toml names a callable, and ``python -m signround.cli`` runs."""
    import importlib
    import subprocess
    import sys
    import tomllib

    repo = Path(__file__).resolve().parents[1]
    scripts = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"signround", "signround-best", "signround-light", "signround-fast"} <= set(scripts)
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target
    r = subprocess.run([sys.executable, "-m", "signround.cli", "--model", "/nonexistent", "--output_dir", "/tmp/x"],
                       capture_output=True, text=True, cwd=repo)
    assert r.returncode == 2 and "does not exist" in r.stderr
