"""Wall time and peak GPU memory of signround's default path on a CUDA GPU.

    python3 benchmarks/bench_gpu.py [--work .bench/gpu] [--models smollm2,tinyllama-22L]
                                    [--modes default,low_gpu] [--timeout 600]

Each run is one process, ``signround --model M --scheme W4A16 --output_dir OUT`` plus the mode's
flags (default: none, so SignRound with 200 iters on 128 x 2048 tokens of the built-in corpus,
streamed from the checkpoint, on the first GPU; ``low_gpu``: ``--low_gpu_mem_usage``).

Models: ``smollm2`` is ``.bench/SmolLM2-135M`` (``benchmarks/prepare_smollm2.py``) where its weights
are there, else a checkpoint of SmolLM2-135M's shape with random weights (its tokenizer only is
needed: a GPU machine without the package gets the tokenizer files); ``tinyllama-NL`` is
``benchmarks/bench_memory.py``'s TinyLlama-1.1B-shaped random checkpoint with N layers. Time and
memory do not depend on the weights' values; accuracy figures come from the CPU benchmarks.

Recorded per run: exit status, wall seconds, the report's tuning seconds, seconds per block
(median), peak GPU memory as torch allocated it (report.json) and as ``nvidia-smi`` saw the whole
device (sampled every 0.2 s; includes the CUDA context), peak RSS. A run stopped by ``--timeout``
keeps what its log shows (blocks done). Prints a markdown table and writes ``gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from bench_memory import SMOLLM2, build_model  # noqa: E402

MODES = {"default": [], "low_gpu": ["--low_gpu_mem_usage"]}
SMOLLM2_SHAPE = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
                 "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                 "rope_parameters")


def smollm2(work: Path) -> tuple[Path, str]:
    """The real SmolLM2-135M where its weights are present, else a random one of its shape."""
    if (SMOLLM2 / "model.safetensors").is_file():
        return SMOLLM2, "SmolLM2-135M"
    if not (SMOLLM2 / "config.json").is_file() or not (SMOLLM2 / "tokenizer.json").is_file():
        sys.exit(f"{SMOLLM2} needs at least config.json and the tokenizer (benchmarks/prepare_smollm2.py)")
    cfg = json.loads((SMOLLM2 / "config.json").read_text())
    shape = {k: cfg[k] for k in SMOLLM2_SHAPE if k in cfg}
    return build_model(work / "smollm2-random", cfg["num_hidden_layers"], shape=shape), "SmolLM2-135M shape, random"


class GpuSampler:
    """The largest ``memory.used`` nvidia-smi reports while running (MiB; None without nvidia-smi)."""

    def __init__(self, every: float = 0.2):
        self.every, self.peak, self._stop = every, None, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                used = max(int(v) for v in out.split())
                self.peak = used if self.peak is None else max(self.peak, used)
            except (OSError, ValueError, subprocess.SubprocessError):
                return
            self._stop.wait(self.every)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def blocks_done(log: str) -> int | None:
    """Blocks finished, from the last tqdm progress line (``signround blocks: ... 12/30``)."""
    found = re.findall(r"blocks:.*?\|\s*(\d+)/(\d+)", log)
    return int(found[-1][0]) if found else None


def run_one(model: Path, out: Path, flags: list[str], log_path: Path, timeout: float) -> dict:
    for d in (out, out.with_name(f".{out.name}.signround-partial")):  # a timed-out run leaves the partial one
        shutil.rmtree(d, ignore_errors=True)
    cmd = [sys.executable, "-m", "signround.cli", "--model", str(model), "--scheme", "W4A16", *flags,
           "--output_dir", str(out)]
    if Path("/usr/bin/time").is_file():  # GNU time's peak RSS covers a run that times out too
        cmd = ["/usr/bin/time", "-f", "MAXRSS_KB %M", *cmd]
    t0 = time.time()
    with GpuSampler() as smi, open(log_path, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # the whole group: GNU time's child keeps the GPU otherwise
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
    row: dict = {"rc": rc, "wall_s": round(time.time() - t0, 1), "smi_peak_mib": smi.peak}
    log = log_path.read_text(errors="replace")
    kb = [int(line.split()[1]) for line in log.splitlines() if line.startswith("MAXRSS_KB")]
    row["peak_rss_mib"] = round(kb[-1] / 1024) if kb else None
    row["blocks_done"] = blocks_done(log)
    report = out / "report.json"
    if report.is_file():
        r = json.loads(report.read_text())
        t = r["totals"]
        secs = [b["seconds"] for b in (r.get("blocks") or {}).values() if "seconds" in b]
        row["peak_rss_mib"] = row["peak_rss_mib"] or round(t["peak_rss_bytes"] / 2**20)
        row.update(report_s=t["seconds"], torch_peak_gpu_mib=round(t.get("peak_gpu_bytes", 0) / 2**20),
                   block_s_median=round(statistics.median(secs), 2) if secs else None,
                   calibration_tokens=t.get("calibration_tokens"), streamed=r.get("streamed"),
                   blocks_done=len(secs))
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=str(REPO / ".bench" / "gpu"))
    ap.add_argument("--models", default="smollm2,tinyllama-22L")
    ap.add_argument("--modes", default="default")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    ap.add_argument("--extra", default="", help="flags added to every run (e.g. '--iters 2 --nsamples 4')")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU (runs on the CPU)"
    print(f"device: {gpu}; torch {torch.__version__}", flush=True)
    rows = []
    for name in a.models.split(","):
        if name == "smollm2":
            model, label = smollm2(work)
        elif m := re.fullmatch(r"tinyllama-(\d+)L", name):
            model = build_model(work / name, int(m.group(1)))
            label = f"TinyLlama-1.1B shape, {m.group(1)} layers, random"
        else:
            sys.exit(f"unknown model {name!r}: smollm2 or tinyllama-NL")
        for mode in a.modes.split(","):
            flags = MODES[mode] + a.extra.split()
            res = run_one(model, work / "out" / f"{name}-{mode}", flags, work / f"{name}-{mode}.log", a.timeout)
            rows.append({"model": label, "mode": mode, "flags": " ".join(flags), **res})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(work / "out" / f"{name}-{mode}", ignore_errors=True)
    print(f"\n{gpu}\n\n| model | flags | exit | wall s | s/block | blocks | torch peak GPU MiB | nvidia-smi peak MiB | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['flags'] or '(defaults)'} | {r['rc']} | {r['wall_s']} | {r.get('block_s_median')} | "
              f"{r.get('blocks_done')} | {r.get('torch_peak_gpu_mib')} | {r['smi_peak_mib']} | {r['peak_rss_mib']} |")
    (work / "gpu.json").write_text(json.dumps({"device": gpu, "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print(f"\nJSON: {work / 'gpu.json'}")


if __name__ == "__main__":
    main()
