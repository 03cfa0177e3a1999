"""Export formats, by name. Each exporter checks what it can hold before any tuning starts."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ExportError
from ..plan import QuantPlan
from ..qdq import QParams
from .auto_round import AutoRoundExporter, FakeExporter, dir_size
from .writer import AtomicDir, check_output_dir, write_config, write_safetensors, write_tokenizer

logger = logging.getLogger(__name__)

FORMATS = {e.name: e for e in (AutoRoundExporter(), FakeExporter())}


def get_exporter(fmt: str):
    key = fmt.strip().lower()
    if key not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(sorted(FORMATS))}")
    return FORMATS[key]


def save(
    output_dir: str | os.PathLike,
    fmt: str,
    model: nn.Module,
    plan: QuantPlan,
    qparams: dict[str, QParams],
    tokenizer: Any = None,
    source_dir: str | None = None,
    extra_config: dict[str, Any] | None = None,
    max_shard_bytes: int | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write the model in format ``fmt`` to exactly ``output_dir``, atomically. Returns the path."""
    exporter = get_exporter(fmt)
    exporter.check(plan)
    check_output_dir(output_dir, exporter.estimate_bytes(model, plan))
    kwargs = {"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}
    with AtomicDir(output_dir) as tmp:
        write_safetensors(tmp, exporter.tensors(model, plan, qparams), **kwargs)
        write_config(tmp, model, exporter.quantization_config(plan, extra_config or {}))
        write_tokenizer(tmp, tokenizer, source_dir)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
    out = Path(output_dir).expanduser().absolute()
    logger.info("saved %s model to %s (%.2f MB)", exporter.name, out, dir_size(out) / 1e6)
    return out


__all__ = ["FORMATS", "get_exporter", "save", "check_output_dir", "AtomicDir"]
