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
from .auto_round import AutoRoundExporter, dir_size
from .awq import AutoAWQExporter
from .fake import FakeExporter
from .gguf import EXPORTERS as GGUF_EXPORTERS
from .gptq import AutoGPTQExporter
from .llm_compressor import LLMCompressorExporter
from .writer import AtomicDir, check_output_dir, write_config, write_safetensors, write_tokenizer

logger = logging.getLogger(__name__)

FORMATS = {
    e.name: e
    for e in (AutoRoundExporter(), AutoGPTQExporter(), AutoAWQExporter(), LLMCompressorExporter(), FakeExporter(),
              *GGUF_EXPORTERS)
}


def get_exporter(fmt: str):
    key = fmt.strip().lower()
    if key not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(sorted(FORMATS))}")
    return FORMATS[key]


def get_exporters(formats: str | list[str]) -> list:
    """``"auto_round,auto_gptq"`` -> exporters, in order, without repeats."""
    names = formats.split(",") if isinstance(formats, str) else list(formats)
    out = []
    for n in names:
        if n.strip():
            e = get_exporter(n)
            if e not in out:
                out.append(e)
    if not out:
        raise ExportError("no format given; use e.g. --format auto_round")
    return out


def check_formats(formats: str | list[str], model: nn.Module, plan: QuantPlan, output_dir: str | os.PathLike) -> list:
    """Every requested format can hold the plan, and the output target is usable: before any tuning."""
    exporters = get_exporters(formats)
    for e in exporters:
        e.check(plan, model)
    check_output_dir(output_dir, sum(e.estimate_bytes(model, plan) for e in exporters))
    return exporters


def save(
    output_dir: str | os.PathLike,
    formats: str | list[str],
    model: nn.Module,
    plan: QuantPlan,
    qparams: dict[str, QParams],
    tokenizer: Any = None,
    source_dir: str | None = None,
    extra_config: dict[str, Any] | None = None,
    max_shard_bytes: int | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write the model to exactly ``output_dir``, atomically; several formats go to one subdirectory each."""
    exporters = check_formats(formats, model, plan, output_dir)
    kwargs = {"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}
    with AtomicDir(output_dir) as tmp:
        for exporter in exporters:
            d = tmp if len(exporters) == 1 else tmp / exporter.name.replace(":", "-")
            d.mkdir(exist_ok=True)
            if hasattr(exporter, "write"):  # single-file containers (gguf)
                exporter.write(d, model, plan, qparams, tokenizer, source_dir)
            else:  # a GGUF mix's embedding / output stay float here: their qdq values, unpacked
                quantized = plan.quantized
                packed = {n: qp for n, qp in qparams.items() if n in quantized}
                write_safetensors(d, exporter.tensors(model, plan, packed), **kwargs)
                write_config(d, model, exporter.quantization_config(plan, extra_config or {}, model))
                write_tokenizer(d, tokenizer, source_dir)
            for fname, text in (extra_files or {}).items():
                (d / fname).write_text(text)
    out = Path(output_dir).expanduser().absolute()
    logger.info("saved %s to %s (%.2f MB)", ", ".join(e.name for e in exporters), out, dir_size(out) / 1e6)
    return out


__all__ = ["FORMATS", "get_exporter", "get_exporters", "check_formats", "save", "check_output_dir", "AtomicDir"]
