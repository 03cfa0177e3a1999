"""AutoRound's user-guide commands, with ``auto-round`` replaced by ``signround`` and the models
replaced by offline stand-ins: a table of command lines and what each must give, so a new flag in
the guide is one new row.

``HUB`` is a Hub id served from a Hugging Face cache laid out in a temporary ``HF_HOME`` (the
layout huggingface_hub's own ``snapshot_download`` resolves with the network off).
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from signround.cli import main

HUB = "stand-in/stories260K"
SMALL = "--iters 2 --nsamples 4 --seqlen 64 --disable_torch_compile"


@dataclass
class Row:
    cmd: str  # after the program name; {model} = the local stories260K, {out} = the output directory
    rc: int = 0
    expect: str = ""  # on success: a file that must exist under {out}; on failure: text of the error


ROWS = [
    # the guide's quick start, with a Hub id and a positional model
    Row(f"--model {HUB} --scheme W4A16 --format auto_round --output_dir {{out}} {SMALL}", 0, "config.json"),
    Row(f"{HUB} --scheme W4A16 --format auto_round --output_dir {{out}} {SMALL}", 0, "config.json"),
    Row("--model {model} --bits 4 --group_size 128 --format auto_gptq,auto_awq,auto_round --output_dir {out} "
        "--iters 0 --disable_opt_rtn", 2, "auto_awq needs in_features divisible by the group size"),
    Row("--model {model} --bits 4 --group_size 32 --format auto_gptq,auto_round --output_dir {out} --iters 0",
        0, "auto_round/config.json"),
    Row("--model {model} --format gguf:q4_k_m --output_dir {out} --iters 0 --nsamples 4 --seqlen 64", 0, None),
    Row("--model {model} --scheme W4A16 --iters 0 --disable-opt-rtn --output_dir {out}", 0, "model.safetensors"),
    Row("--model {model} --scheme W2A16 --bs 4 --iters 2 --nsamples 4 --seqlen 64 --lr 0.005 --minmax_lr 0.005 "
        "--disable_torch_compile --output_dir {out}", 0, "report.json"),
    Row("--model {model} --scheme W4A16 --adam --momentum 0.9 --output_dir {out} " + SMALL, 2,
        "momentum"),  # upstream's momentum belongs to the signed steps; with --adam it is refused below
    Row("--model {model} --scheme W4A16 --momentum 0.9 --output_dir {out} " + SMALL, 0, "report.json"),
    Row("--model {model} --scheme W4A16 --adam --output_dir {out} " + SMALL, 0, "report.json"),
    Row("--model {model} --scheme W4A16 --enable_deterministic_algorithms --output_dir {out} " + SMALL, 0,
        "report.json"),
    Row("--model {model} --scheme W4A16 --low_gpu_mem_usage --enable_torch_compile --output_dir {out} "
        "--iters 2 --nsamples 4 --seqlen 64", 0, "report.json"),
    Row("--model {model} --scheme W4A16 --device_map 0 --output_dir {out}", 2, "--device_map cpu"),
    Row("--model {model} --scheme W4A16 --device cpu --iters 0 --disable_opt_rtn --output_dir {out}", 0,
        "config.json"),
    Row("--model {model} --dataset NeelNanda/pile-10k:train --output_dir {out} --iters 0", 2,
        "NeelNanda/pile-10k"),  # a bare split parses; offline the dataset cannot be fetched
    Row("--model {model} --dataset mbpp:train+validation+test --output_dir {out} --iters 0", 2, "mbpp"),
    Row("--model {model} --scheme MXFP4 --format llm_compressor --ignore_layers down_proj --output_dir {out} "
        "--iters 0 --nsamples 4 --seqlen 64", 0, "config.json"),
    Row("--model {model} --scheme NVFP4 --format llm_compressor --ignore_layers down_proj --output_dir {out} "
        "--iters 0 --nsamples 4 --seqlen 64", 0, "config.json"),
    # the guide's format table: auto_round holds MXFP4/MXFP8(_RCEIL)/NVFP4/FPW8A16/FP8_STATIC too
    *[Row(f"--model {{model}} --scheme {s} --format auto_round --ignore_layers down_proj --output_dir {{out}} "
          "--iters 0 --nsamples 4 --seqlen 64", 0, "config.json")
      for s in ("MXFP4", "MXFP4_RCEIL", "MXFP8_RCEIL", "NVFP4", "FPW8A16", "FP8_STATIC")],
    Row("--model {model} --scheme W8A8 --format llm_compressor --output_dir {out} --iters 0 --nsamples 4 "
        "--seqlen 64", 0, "config.json"),
    Row("--model {model} --bits 8 --group_size -1 --act_bits 8 --format llm_compressor --output_dir {out} "
        "--iters 0 --nsamples 4 --seqlen 64", 0, "config.json"),
    Row("--model {model} --scheme W4A16 --group_size 32 --ignore_layers down_proj --static_kv_dtype fp8 "
        "--format llm_compressor --output_dir {out} --iters 0 --nsamples 4 --seqlen 64", 0, "config.json"),
    Row("--model {model} --scheme FP8_STATIC --static_attention_dtype fp8 --format llm_compressor "
        "--ignore_layers down_proj --output_dir {out} --iters 0 --nsamples 4 --seqlen 64", 0, "config.json"),
    Row("--model {model} --static_kv_dtype fp8 --format auto_round --output_dir {out} --iters 0", 2,
        "use --format llm_compressor"),
    Row("--model {model} --scheme INT8_W8A8 --format auto_round --output_dir {out} --iters 0", 2,
        "use --format llm_compressor"),
    Row("--model {model} --avg_bits 3 --options W2A16,W4A16 --output_dir {out} --iters 0 --nsamples 4 --seqlen 64",
        0, "layer_config.json"),
    Row("--model {model} --schemes W2A16,W4A16 --bits 3 --ignore_scale_zp_bits --output_dir {out} --iters 0 "
        "--nsamples 4 --seqlen 64", 0, "layer_config.json"),  # upstream's newer spelling of AutoScheme
    Row("--model {model} --avg_bits 1.5 --options W2A16,W4A16 --output_dir {out} --iters 0", 2,
        "outside what the options reach"),
    Row("--model {model} --nblocks 2 --output_dir {out} " + SMALL, 0, "report.json"),
    Row("--model {model} --enable_norm_bias_tuning --output_dir {out} " + SMALL, 0, "report.json"),
    Row("--model {model} --scale_dtype bf16 --output_dir {out} --iters 0", 0, "config.json"),
    # evaluation, the guide's spellings
    Row("--model {model} --eval --tasks ppl:{text} --limit 2 --eval_bs 2", 0, None),
    Row("eval --model {model} --tasks ppl:{text} --limit 2", 0, None),
    Row("--model {model} --eval --tasks lambada_openai --limit 2", 2, "lambada_openai"),
    Row("--model {model} --eval --limit 2", 2, "none of the tasks could load its data"),
]


@pytest.fixture
def hub_home(tmp_path, monkeypatch, stories_dir):
    """A Hugging Face cache holding stories260K under a Hub id (refs/main -> snapshots/<commit>)."""
    from huggingface_hub.file_download import repo_folder_name

    home = tmp_path / "hf"
    repo = home / "hub" / repo_folder_name(repo_id=HUB, repo_type="model")
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(stories_dir, repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.mark.parametrize("row", ROWS, ids=[r.cmd[:60] for r in ROWS])
def test_guide_command(row, stories_dir, hub_home, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    text = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "tinyshakespeare.txt"
    argv = shlex.split(row.cmd.format(model=stories_dir, out=out, text=text))
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = int(e.code)
    err = capsys.readouterr().err
    assert rc == row.rc, err[-3000:]
    assert "Traceback" not in err
    if rc == 0 and row.expect:
        assert (out / row.expect).exists(), sorted(p.name for p in out.rglob("*"))
    if rc != 0:
        assert row.expect in err, err[-3000:]


def test_hub_id_offline_and_uncached_names_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(["--model", "nobody/nothing", "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "HF_HUB_OFFLINE" in err and str(tmp_path / "empty") in err


def test_default_output_dir_is_named_as_upstream_names_it(stories_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([str(stories_dir), "--iters", "0", "--disable_opt_rtn", "--group_size", "32"]) == 0
    assert (tmp_path / "tmp_autoround" / "stories260K-w4g32" / "config.json").is_file()
    report = json.loads((tmp_path / "tmp_autoround" / "stories260K-w4g32" / "report.json").read_text())
    assert report["self_check"][0]["status"] == "passed"
