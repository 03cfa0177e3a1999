"""Perplexity over fixed, non-overlapping token windows of a local text file."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def read_text(path: str | Path) -> str:
    """Read a corpus; CRLF is normalized to LF (the shared WikiText-2 copy uses CRLF)."""
    return Path(path).read_text(encoding="utf-8").replace("\r\n", "\n")


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    seqlen: int = 512,
    n_windows: int | None = 16,
    batch_size: int = 4,
) -> dict[str, float]:
    """exp(mean token NLL) over the first ``n_windows`` windows of ``seqlen`` tokens (all when None).

    Each window is scored independently (no context carried over); the first token of a window
    is context only, so ``seqlen - 1`` tokens are scored per window.
    """
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    total = ids.numel() // seqlen
    n = total if n_windows is None else min(n_windows, total)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = ids[: n * seqlen].view(n, seqlen)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, n, batch_size):
        batch = windows[i : i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        nll += loss.item()
        count += batch[:, 1:].numel()
    return {"ppl": math.exp(nll / count), "tokens": count, "windows": n, "seqlen": seqlen}
