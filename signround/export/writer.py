"""Atomic checkpoint writing: tensors in safetensors shards, config, generation config, tokenizer.

Everything is written into a hidden temporary directory beside the target and renamed into place
only when complete, so an interrupted or failed save never leaves a directory that looks finished.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator

import torch
from safetensors.torch import save_file

from ..errors import ExportError

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# Files a tokenizer may need that save_pretrained does not always regenerate.
_TOKENIZER_FILES = ("tokenizer.model", "chat_template.jinja", "chat_template.json")


def check_output_dir(output_dir: str | os.PathLike, needed_bytes: int = 0) -> Path:
    """Fail early when the target exists with content, cannot be written, or the disk is too full."""
    out = Path(output_dir).expanduser().absolute()
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"output path {out} exists and is a file; choose a new --output_dir")
        if any(out.iterdir()):
            raise ExportError(f"output directory {out} is not empty; choose a new --output_dir or empty it")
    anchor = out
    while not anchor.exists():
        anchor = anchor.parent
    try:  # a real probe: permission bits say nothing for root or read-only mounts
        os.rmdir(tempfile.mkdtemp(prefix=".signround-probe-", dir=anchor))
    except OSError as e:
        raise ExportError(f"cannot write under {anchor} ({e.strerror}); choose an --output_dir you can write to") from e
    if needed_bytes:
        free = shutil.disk_usage(anchor).free
        if free < needed_bytes:
            raise ExportError(
                f"not enough disk space under {anchor}: about {needed_bytes / 1e9:.2f} GB needed, "
                f"{free / 1e9:.2f} GB free; free space or choose another --output_dir"
            )
    return out


class AtomicDir:
    """Context manager yielding a temporary directory that becomes ``target`` on success."""

    def __init__(self, target: str | os.PathLike):
        self.target = check_output_dir(target)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ExportError(
                    f"disk full while writing {self.target}; nothing was left behind. Free space or "
                    "choose another --output_dir"
                ) from exc
            return False
        # mkdtemp (and safetensors) create private files; give them the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)
        for root, dirs, files in os.walk(self.tmp):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~umask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~umask)
        if self.target.exists():
            self.target.rmdir()  # empty, checked above
        os.rename(self.tmp, self.target)
        return False


def _shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_safetensors(
    out: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> int:
    """Write tensors into shards of at most ``max_shard_bytes`` (plus an index when several). Returns bytes."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    total = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = t.detach().to("cpu").contiguous()
        sizes[-1] += nbytes
        total += nbytes
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = _shard_name(i, n)
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def unique_state_dict(model: torch.nn.Module, from_qparams: Collection[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """The state dict without the second name of tied tensors (safetensors refuses shared storage).

    ``from_qparams``: layers the caller writes from their QParams, whose weights may have been
    released after tuning (meta tensors, passed through unread).
    """
    seen: set[tuple[int, int, tuple]] = set()
    for name, t in model.state_dict().items():
        if t.is_meta:
            layer, _, leaf = name.rpartition(".")
            if leaf == "weight" and layer in from_qparams:
                yield name, t
                continue
            raise ExportError(f"{name} is still on the meta device; load the model fully before saving")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        yield name, t


def write_config(out: Path, model: torch.nn.Module, quantization_config: dict[str, Any] | None) -> None:
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(str(out))
        except Exception as e:  # an invalid generation config must not sink the model
            logger.warning("generation_config not saved: %s", e)


def write_tokenizer(out: Path, tokenizer: Any, source_dir: str | None) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    if source_dir:
        for fname in _TOKENIZER_FILES:
            src = Path(source_dir) / fname
            if src.is_file() and not (out / fname).exists():
                shutil.copy2(src, out / fname)
