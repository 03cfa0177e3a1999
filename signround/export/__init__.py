"""Export formats, by name. Each exporter checks what it can hold before any tuning starts."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ExportError
from ..plan import QuantPlan
from .auto_round import AutoRoundExporter, dir_size
from .awq import AutoAWQExporter
from .fake import FakeExporter
from .gguf import EXPORTERS as GGUF_EXPORTERS
from .gptq import AutoGPTQExporter
from .llm_compressor import LLMCompressorExporter
from .sink import ExportSink
from .writer import PartialDir, check_output_dir

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
        if plan.static_attention and e.name != "llm_compressor":
            raise ExportError(
                f"static FP8 attention / KV-cache scales (--static_kv_dtype, --static_attention_dtype) are written "
                f"into compressed-tensors' kv_cache_scheme, which vLLM reads; {e.name} has no place for them: use "
                "--format llm_compressor"
            )
        e.check(plan, model)
    check_output_dir(output_dir, sum(e.estimate_bytes(model, plan) for e in exporters))
    return exporters


__all__ = ["FORMATS", "ExportSink", "PartialDir", "check_formats", "check_output_dir", "dir_size", "get_exporter",
           "get_exporters"]
