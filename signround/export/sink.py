"""Writing every requested format block by block, as the pipeline finishes each block.

``ExportSink`` owns one :class:`FormatFile` per format (one subdirectory each when there are
several) inside the hidden partial directory. The pipeline hands it each finished block (its
state-dict entries and QParams); the entries outside the blocks (embeddings, final norm, head)
and the configs follow at :meth:`ExportSink.finish`. Whole-model saves replay the same sequence, so
streamed and whole-model runs write identical files. :meth:`ExportSink.state` is what a resumed
run needs to continue each file where the last finished block left it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ExportError
from ..model.kvcache import SCALE_NAMES
from ..model.source import checkpoint_namer
from ..plan import QuantPlan
from ..qdq import QParams
from .shards import DEFAULT_MAX_SHARD_BYTES, ShardWriter
from .writer import canonical_entries, write_config, write_tokenizer


class SafetensorsFile:
    """A transformers-style checkpoint directory: sharded safetensors, config, tokenizer."""

    def __init__(self, exporter: Any, d: Path, max_shard_bytes: int, state: dict | None = None,
                 namer: Callable[[str], str] | None = None):
        self.exporter, self.d, self.namer = exporter, d, namer
        self.shards = ShardWriter.restore(d, state) if state else ShardWriter(d, max_shard_bytes)

    def add(self, name: str, t: torch.Tensor, qparams: dict[str, QParams], plan: QuantPlan) -> None:
        for out_name, out in self.exporter.convert(name, t, qparams, plan):
            if out.is_meta:
                raise ExportError(f"{name} has no values (meta tensor) and {self.exporter.name} needs them")
            self.shards.add(self.namer(out_name) if self.namer else out_name, out)

    def state(self) -> dict:
        return self.shards.state()

    def sync(self) -> None:
        self.shards.sync()

    def finish(self, model: nn.Module, plan: QuantPlan, extra_config: dict, tokenizer: Any) -> None:
        self.shards.finish()
        qc = self.exporter.quantization_config(plan, extra_config, model)
        write_config(self.d, model, config_names(qc, self.namer) if self.namer and qc else qc)


class ExportSink:
    """Every requested format, written as blocks finish."""

    def __init__(self, exporters: list, root: Path, model: nn.Module, plan: QuantPlan, source_dir: str | None,
                 max_shard_bytes: int | None = None, state: dict | None = None):
        self.exporters, self.root, self.plan, self.source_dir = exporters, root, plan, source_dir
        self.files: dict[str, Any] = {}
        self.entries = canonical_entries(model)
        namer = checkpoint_namer(model)  # tensors under the names the checkpoint format uses
        for e in exporters:
            d = self.dir_of(e)
            d.mkdir(parents=True, exist_ok=True)
            st = (state or {}).get(e.name)
            if hasattr(e, "open"):  # single-file containers (gguf)
                self.files[e.name] = e.open(d, model, plan, source_dir, st)
            else:
                self.files[e.name] = SafetensorsFile(e, d, max_shard_bytes or DEFAULT_MAX_SHARD_BYTES, st, namer)

    def dir_of(self, exporter: Any) -> Path:
        return self.root if len(self.exporters) == 1 else self.root / exporter.name.replace(":", "-")

    def _add(self, name: str, t: torch.Tensor, qparams: dict[str, QParams]) -> None:
        for f in self.files.values():
            f.add(name, t, qparams, self.plan)

    def block(self, model: nn.Module, block_name: str, qparams: dict[str, QParams]) -> None:
        prefix = block_name + "."
        listed = set()
        for name, _ in self.entries:
            if name.startswith(prefix):
                listed.add(name)
                self._add(name, _tensor(model, name), qparams)
        # static attention scales (k_scale, v_scale, q_scale) measured after the entries were listed
        for name, buf in model.get_submodule(block_name).named_buffers(prefix=block_name):
            if name.rpartition(".")[2] in SCALE_NAMES.values() and name not in listed:
                self._add(name, buf, qparams)

    def state(self) -> dict:
        for f in self.files.values():
            f.sync()
        return {name: f.state() for name, f in self.files.items()}

    def finish(self, model: nn.Module, qparams: dict[str, QParams], extra_config: dict, tokenizer: Any,
               extra_files: dict[str, str] | None = None) -> list[Path]:
        """The entries outside the blocks, then each format's closing files; returns the directories."""
        inside = tuple(b + "." for b in self.plan.block_names)
        for name, _ in self.entries:
            if not name.startswith(inside):
                self._add(name, _tensor(model, name), qparams)
        dirs = []
        for e in self.exporters:
            d = self.dir_of(e)
            self.files[e.name].finish(model, self.plan, extra_config, tokenizer)
            if not hasattr(e, "open"):
                write_tokenizer(d, tokenizer, self.source_dir)
            for fname, text in (extra_files or {}).items():
                (d / fname).write_text(text)
            dirs.append(d)
        return dirs


def config_names(qc: dict[str, Any], namer: Callable[[str], str]) -> dict[str, Any]:
    """The layer names inside a quantization_config as the checkpoint names them, and as the model's
    modules are named where that differs: auto_round's ``extra_config`` keys, AWQ's
    ``modules_to_not_convert``, compressed-tensors' ``ignore`` and group ``targets``, GPTQ's
    ``dynamic`` regexes (``+:^escaped name$``). Loaders match them against different names: vLLM
    against the checkpoint's (Mixtral's ``block_sparse_moe``, LLaVA's ``language_model.model``) or
    through its own mapper, transformers against its modules (``model.language_model``)."""
    def both(name: str) -> list[str]:
        return list(dict.fromkeys((namer(name), name)))

    out = dict(qc)
    if isinstance(out.get("extra_config"), dict):
        out["extra_config"] = {k2: v for k, v in out["extra_config"].items() for k2 in both(k)}
    for key in ("modules_to_not_convert", "ignore"):
        if isinstance(out.get(key), list):
            out[key] = [n2 for n in out[key] for n2 in both(n)]
    if isinstance(out.get("config_groups"), dict):
        out["config_groups"] = {g: {**v, "targets": [t2 for t in v["targets"] for t2 in ([t] if t == "Linear" else both(t))]}
                                for g, v in out["config_groups"].items()}
    if isinstance(out.get("dynamic"), dict):
        def regexes(key: str) -> list[str]:
            m = re.fullmatch(r"([+-]:)\^(.*)\$", key)
            if not m:
                return [key]
            return [m.group(1) + "^" + re.escape(n) + "$" for n in both(re.sub(r"\\(.)", r"\1", m.group(2)))]

        out["dynamic"] = {k2: v for k, v in out["dynamic"].items() for k2 in regexes(k)}
    return out


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The current tensor under ``name`` (materialized or restored since the entries were listed)."""
    mod_name, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(mod_name) if mod_name else model, leaf)
