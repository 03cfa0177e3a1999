"""Run summary and report: layers per bit width, average bits, per-block losses, time, peak memory.

``report.json`` is written into every saved output; ``signround report OUT`` prints it and renders
``report.png`` (with matplotlib, the ``report`` extra).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
from pathlib import Path
from collections import Counter
from typing import Any

import torch
from torch import nn

from .model.layers import get_module, get_weight
from .plan import QuantPlan


def peak_rss_bytes() -> int:
    """Peak resident memory of this process.

    On Linux this is VmHWM, the high-water mark of this address space: ru_maxrss also counts the
    address space of the parent a process was spawned from (exec records the pre-exec image's
    peak), so a CLI started from a big process would report that process's size.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def peak_gpu_bytes() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def bits_summary(model: nn.Module, plan: QuantPlan) -> dict[str, Any]:
    """Counts per spec label and the parameter-weighted average weight bits over candidate layers."""
    counts: Counter[str] = Counter()
    bits_sum = 0
    numel_sum = 0
    considered = [n for names in plan.block_layers.values() for n in names] + plan.outside_blocks()
    for name in considered:
        spec = plan.specs[name]
        counts[spec.label() if spec.quantized else "fp (kept)"] += 1
        n = get_weight(get_module(model, name)).numel()
        bits_sum += n * min(spec.bits, 16)
        numel_sum += n
    return {"layers": dict(sorted(counts.items())), "average_bits": bits_sum / max(numel_sum, 1)}


def format_summary(summary: dict[str, Any]) -> str:
    lines = ["signround summary"]
    for label, n in summary["layers"].items():
        lines.append(f"  {label:<18} {n:>5} layers")
    lines.append(f"  average weight bits  {summary['average_bits']:.3f} (block layers and quantized heads; fp counted as 16)")
    if "output_bytes" in summary:
        lines.append(f"  output size          {summary['output_bytes'] / 1e6:.2f} MB at {summary['output_dir']}")
    lines.append(f"  time                 {summary['seconds']:.1f} s")
    lines.append(f"  peak RSS             {summary['peak_rss_bytes'] / 2**20:.0f} MiB")
    if summary.get("peak_gpu_bytes"):
        lines.append(f"  peak GPU memory      {summary['peak_gpu_bytes'] / 2**20:.0f} MiB")
    return "\n".join(lines)


REPORT_FILE = "report.json"
PLOT_FILE = "report.png"


def layer_table(model: nn.Module, plan: QuantPlan) -> dict[str, dict[str, Any]]:
    """Per candidate layer: scheme label, bits, group size, data type and parameter count."""
    out = {}
    for name in [n for names in plan.block_layers.values() for n in names] + plan.outside_blocks():
        spec = plan.specs[name]
        out[name] = {"scheme": spec.label() if spec.quantized else "fp (kept)", "bits": min(spec.bits, 16),
                     "group_size": spec.group_size, "data_type": spec.data_type,
                     "params": get_weight(get_module(model, name)).numel()}
    return out


def write_report(directory: Path, report: dict[str, Any]) -> Path:
    """report.json (replaced atomically: a run that dies while writing it keeps the old one)."""
    path = directory / REPORT_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_report(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """report.json of an output directory (or of its first format subdirectory)."""
    from .errors import ConfigError

    p = Path(path)
    candidates = [p] if p.is_file() else [p / REPORT_FILE, *sorted(p.glob(f"*/{REPORT_FILE}"))]
    for c in candidates:
        if c.is_file():
            return c, json.loads(c.read_text())
    raise ConfigError(f"no {REPORT_FILE} in {p}; pass the output directory of a signround run")


def format_report(report: dict[str, Any]) -> str:
    """The per-block table and the totals, as text."""
    lines = [f"signround report: {report.get('model')} -> {report.get('format')} ({report.get('mode')})"]
    blocks = report.get("blocks") or {}
    if blocks:
        lines.append(f"{'block':<28} {'rtn loss':>10} {'start':>10} {'tuned':>10} {'best it':>8} {'s':>7}")
        for name, b in blocks.items():
            lines.append(f"{name:<28} {_num(b.get('loss_rtn')):>10} {_num(b.get('loss_start')):>10} "
                         f"{_num(b.get('loss_final')):>10} {str(b.get('best_iter', '')):>8} {_num(b.get('seconds')):>7}")
    t = report.get("totals", {})
    if t:
        lines.append(f"time {t.get('seconds', 0):.1f} s, peak RSS {t.get('peak_rss_bytes', 0) / 2**20:.0f} MiB, "
                     f"calibration tokens {t.get('calibration_tokens', 0)}, average weight bits "
                     f"{t.get('average_bits', 0):.3f}")
    for check in report.get("self_check", []) or []:
        extra = (f"relative difference {check['relative_difference']:.2e}" if "relative_difference" in check
                 else check.get("error") or check.get("reason", ""))
        lines.append(f"self-check {check['format']}: {check['status']} ({extra})")
    return "\n".join(lines)


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def render_plot(report: dict[str, Any], path: Path) -> Path | None:
    """report.png: per-block loss before and after tuning, and per-layer bits when they are mixed.
    None (and a log line) without matplotlib, the ``report`` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.getLogger(__name__).info("report.png needs matplotlib: pip install 'signround[report]'")
        return None
    blocks = {k: v for k, v in (report.get("blocks") or {}).items() if v.get("loss_final") is not None}
    bits = [v["bits"] for v in (report.get("layers") or {}).values()]
    mixed = len(set(bits)) > 1
    fig, axes = plt.subplots(1, 2 if mixed else 1, figsize=(12 if mixed else 7, 4), squeeze=False)
    ax = axes[0][0]
    if blocks:
        xs = range(len(blocks))
        for key, label in (("loss_rtn", "plain RTN"), ("loss_start", "start (opt-RTN)"), ("loss_final", "tuned")):
            ax.plot(xs, [v.get(key) for v in blocks.values()], marker=".", label=label)
        ax.set_yscale("log")
        ax.set_xlabel("block")
        ax.set_ylabel("block output MSE (calibration)")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no calibrated blocks (plain RTN)", ha="center", va="center")
    ax.set_title(f"{report.get('mode')}: loss per block")
    if mixed:
        ax2 = axes[0][1]
        ax2.bar(range(len(bits)), bits)
        ax2.set_xlabel("layer")
        ax2.set_ylabel("weight bits")
        ax2.set_title("bits per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
