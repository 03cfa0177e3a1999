"""How long a mistake takes to be reported on a 1.1B-class checkpoint: each bad input, one process.

    python3 benchmarks/bench_fail_fast.py [--model .bench/memory/tinyllama-22L]

Needs the model ``benchmarks/bench_memory.py`` builds (22 layers, 2.3 GB of bf16 shards). Every
case is the cheapest run (``--iters 0 --disable_opt_rtn``) plus one mistake; the table gives the
exit code, the wall time of the whole process (Python start and imports included) and the error's
first line. The truncated-shard case uses a copy of the model directory whose last shard is cut
in half (the other files are symlinks). No output directory may remain after any case.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO.parent / "shared" / "corpora" / "tinyshakespeare.txt"
Q = ["--iters", "0", "--disable_opt_rtn"]


def truncated_copy(model: Path, tmp: Path) -> Path:
    d = tmp / "truncated"
    d.mkdir()
    shards = sorted(model.glob("*.safetensors"))
    for f in model.iterdir():
        if f != shards[-1]:
            (d / f.name).symlink_to(f.resolve())
    with open(shards[-1], "rb") as src, open(d / shards[-1].name, "wb") as dst:
        dst.write(src.read(shards[-1].stat().st_size // 2))
    return d


def cases(model: Path, tmp: Path) -> list[tuple[str, list[str]]]:
    m = ["--model", str(model)]
    (tmp / "empty.txt").write_text("")
    (tmp / "tiny.txt").write_text("Once upon a time.")
    return [
        ("missing dataset file", [*m, "--iters", "0", "--dataset", str(tmp / "none.jsonl")]),
        ("unknown dataset option", [*m, "--iters", "0", "--dataset", f"{TEXT}:shuffle=1"]),
        ("empty dataset file", [*m, "--iters", "0", "--dataset", str(tmp / "empty.txt")]),
        ("unknown eval backend", [*m, *Q, "--tasks", f"ppl:{TEXT}", "--eval_backend", "bogus"]),
        ("--limit 0", [*m, *Q, "--tasks", f"ppl:{TEXT}", "--limit", "0"]),
        ("eval text shorter than a window", [*m, *Q, "--tasks", f"ppl:{tmp / 'tiny.txt'}"]),
        ("missing layer_config file", [*m, *Q, "--layer_config", str(tmp / "lc.json")]),
        ("layer_config key matching nothing", [*m, *Q, "--layer_config", '{"attn.c_proj": {"bits": 8}}']),
        ("bits the format cannot hold", [*m, *Q, "--bits", "3", "--format", "auto_awq"]),
        ("FP scheme into auto_gptq", [*m, *Q, "--scheme", "MXFP4", "--format", "auto_gptq"]),
        ("device_map cuda without CUDA", [*m, *Q, "--device_map", "cuda"]),
        ("seqlen beyond the context", [*m, "--iters", "0", "--seqlen", "4096"]),
        ("truncated shard", ["--model", str(truncated_copy(model, tmp)), *Q]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / ".bench" / "memory" / "tinyllama-22L"))
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    model = Path(args.model)
    if not (model / "config.json").is_file():
        sys.exit(f"{model} is missing: build it with python3 benchmarks/bench_memory.py --layers 22")
    rows = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for name, argv in cases(model, tmp):
            out = tmp / "out"
            t0 = time.time()
            r = subprocess.run([sys.executable, "-m", "signround.cli", *argv, "--output_dir", str(out)],
                               capture_output=True, text=True, cwd=tmp)
            wall = time.time() - t0
            err = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
            left = sorted(p.name for p in tmp.iterdir() if p.name.startswith((".out", "out")))
            rows.append({"case": name, "rc": r.returncode, "seconds": round(wall, 1), "left_behind": left,
                         "traceback": "Traceback" in r.stderr, "error": (err[-1] if err else r.stderr[-200:])[:160]})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    print("\n| mistake | exit | seconds | message |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['rc']} | {r['seconds']} | {r['error'].replace('|', '/')} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
