"""Run summary: layers per bit width, average bits, output size, time, peak memory."""

from __future__ import annotations

import resource
import sys
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
