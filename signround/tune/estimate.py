"""An estimate of a run's time before its first block, from the settings and a timed forward pass.

The progress bar's estimate arrives only after the first block, and on a CPU upstream's default
budget (128 x 2048 tokens) takes minutes per block even without tuning; a user should learn that
before waiting, with the setting that fits the machine.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from .config import TuneConfig

logger = logging.getLogger(__name__)

# A backward pass costs about twice its forward.
BACKWARD_FACTOR = 2.0
# Full passes over all calibration samples per block: fp targets, plain RTN, the optimized-RTN start
# (its outputs feed the next block), and after tuning one more to score the kept parameters.
PASSES = {"rtn": 2, "opt_rtn": 3, "signround": 4}
# Warn on a CPU when the calibration passes alone are expected to take longer than this.
LONG_CPU_RUN_S = 20 * 60
# What the docs call the practical CPU setting on a 2-core machine.
PRACTICAL_CPU = {"nsamples": 16, "seqlen": 256}


def time_sample_forward(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device: torch.device) -> float:
    """Seconds for one sample's forward through a block: the faster of two calls (the first pays
    one-time costs)."""
    xb = x[:1].to(device)
    best = float("inf")
    with torch.no_grad():
        for _ in range(2):
            t0 = time.perf_counter()
            run(xb)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
    return best


def passes_seconds(cfg: TuneConfig, sample_s: float, n_samples: int, n_blocks: int, seqlen: int | None = None) -> float:
    """Seconds the forward/backward passes of a run take, for ``n_samples`` samples of ``seqlen``
    tokens (``sample_s`` was measured at ``cfg.seqlen``; attention makes longer samples cost a bit
    more than linearly, which this ignores)."""
    scale = (seqlen or cfg.seqlen) / cfg.seqlen
    per_block = PASSES[cfg.mode] * n_samples
    if cfg.mode == "signround":
        per_block += cfg.iters * min(cfg.batch_size, n_samples) * cfg.gradient_accumulate_steps * (1 + BACKWARD_FACTOR)
    return per_block * sample_s * scale * n_blocks


def log_estimate(cfg: TuneConfig, sample_s: float, n_samples: int, n_blocks: int, device: torch.device) -> float:
    """Log the expected time of the block loop; on a CPU, warn when it is long and name the
    practical setting with its own estimate. Returns the estimate in seconds."""
    total = passes_seconds(cfg, sample_s, n_samples, n_blocks)
    logger.info("expected time: about %s for %d blocks (%.2f s per block forward of one %d-token sample on %s; "
                "clipping searches and saving come on top)", _fmt(total), n_blocks, sample_s, cfg.seqlen, device.type)
    if device.type == "cpu" and total > LONG_CPU_RUN_S:
        small_n = min(n_samples, PRACTICAL_CPU["nsamples"])
        small_len = min(cfg.seqlen, PRACTICAL_CPU["seqlen"])
        fewer_iters = cfg.mode == "signround" and cfg.iters > _fast(cfg).iters
        what = f"{n_samples} samples x {cfg.seqlen} tokens" + (f", {cfg.iters} iters" if cfg.iters else "")
        if (small_n, small_len) == (n_samples, cfg.seqlen) and not fewer_iters:
            logger.warning("this run is long on a CPU: %s take about %s; a GPU shortens it", what, _fmt(total))
        else:
            setting = f"--nsamples {small_n} --seqlen {small_len}" + (" --recipe fast" if fewer_iters else "")
            small = passes_seconds(_fast(cfg) if fewer_iters else cfg, sample_s, small_n, n_blocks, small_len)
            logger.warning("this run is long on a CPU: %s take about %s. The practical CPU setting %s takes about %s",
                           what, _fmt(total), setting, _fmt(small))
    return total


def _fast(cfg: TuneConfig) -> TuneConfig:
    import dataclasses

    from .config import RECIPES

    return dataclasses.replace(cfg, **{k: v for k, v in RECIPES["fast"].items() if k == "iters"})


def _fmt(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
