"""Atomic checkpoint writing: the hidden partial directory, config, generation config, tokenizer.

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
from typing import Any

import torch

from ..errors import ExportError
from ..model.vlm import PROCESSOR_FILES

logger = logging.getLogger(__name__)

# Files a tokenizer or a VLM's processor may need that the tokenizer's save_pretrained does not write.
_TOKENIZER_FILES = ("tokenizer.model", *PROCESSOR_FILES)


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


PARTIAL_SUFFIX = ".signround-partial"


def partial_path(target: Path) -> Path:
    """The hidden directory a save into ``target`` is written in (fixed, so a resumed run finds it)."""
    return target.parent / f".{target.name}{PARTIAL_SUFFIX}"


def stale_partials(target: Path) -> list[Path]:
    """Hidden directories an interrupted save into ``target`` left (this version's and older ones)."""
    if not target.parent.is_dir():
        return []
    found = [p for p in target.parent.glob(f".{target.name}.partial-*") if p.is_dir()]
    p = partial_path(target)
    return ([p] if p.is_dir() else []) + found


def _usual_permissions(root: Path) -> None:
    """mkdtemp-style private permissions (safetensors, tempfile) -> what save_pretrained gives."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for base, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(base, d), 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(base, f), 0o666 & ~umask)


class PartialDir:
    """The hidden directory beside ``target`` that a save is written into; :meth:`commit` renames
    it into place once everything is there, so nothing that looks like a finished model exists
    before the end. An existing one (an interrupted run) is reused with ``resume``, removed with
    ``start_over``, and otherwise refused with both options named."""

    def __init__(self, target: str | os.PathLike, resume: bool = False, start_over: bool = False):
        self.target = check_output_dir(target)
        self.path = partial_path(self.target)
        stale = stale_partials(self.target)
        if stale and start_over:
            for p in stale:
                shutil.rmtree(p, ignore_errors=True)
            logger.info("removed the unfinished run(s) at %s", ", ".join(map(str, stale)))
        elif stale and not (resume and stale == [self.path]):
            raise ExportError(
                f"an unfinished run into {self.target} left {stale[0]}; add --resume to continue it (same "
                "command), or --start_over to delete it and start again"
            )
        self.resumed = self.path.is_dir()
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path.mkdir(exist_ok=True)

    def commit(self) -> Path:
        """Rename into place (state the output must not hold, e.g. resume files, removed first)."""
        _usual_permissions(self.path)
        if self.target.exists():
            self.target.rmdir()  # empty, checked when the save started
        os.rename(self.path, self.target)
        return self.target

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


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


def canonical_entries(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(state-dict name, tensor) of every parameter and persistent buffer, in module order, tied
    tensors once under their first name (safetensors refuses shared storage). Identity, not
    storage, decides ties, so meta tensors (streamed or released weights) are handled alike."""
    seen: set[int] = set()
    out = []
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        persistent = [(n, b) for n, b in mod._buffers.items() if b is not None and n not in mod._non_persistent_buffers_set]
        for leaf, t in [*((n, p) for n, p in mod._parameters.items() if p is not None), *persistent]:
            if id(t) in seen:
                continue
            seen.add(id(t))
            out.append((f"{mod_name}.{leaf}" if mod_name else leaf, t))
    return out


# errno -> what to tell the user; the writers of safetensors and tokenizers raise their own
# exception types with the OS message in the text, so those are recognized by the message too
_WRITE_ERRORS = {
    errno.ENOSPC: ("the disk is full", ("No space left on device", "os error 28")),
    errno.EDQUOT: ("the disk quota is exceeded", ("Disk quota exceeded", "os error 122")),
    errno.EROFS: ("the file system is read-only", ("Read-only file system", "os error 30")),
    errno.EACCES: ("permission was denied", ("Permission denied", "os error 13")),
    errno.EIO: ("the disk reported an I/O error", ("Input/output error", "os error 5")),
}


def write_failure(exc: BaseException) -> str | None:
    """What went wrong when ``exc`` (from any writer: safetensors, tokenizers, gguf, json) is a
    failed write to disk; None otherwise."""
    if isinstance(exc, OSError) and exc.errno in _WRITE_ERRORS:
        return _WRITE_ERRORS[exc.errno][0]
    text = str(exc)
    for what, needles in _WRITE_ERRORS.values():
        if any(n in text for n in needles):
            return what
    return None


def write_error(exc: BaseException, target: Path, needed_bytes: int, kept: Path | None = None) -> ExportError:
    """One message for a failed write: where, why, how much space the output needs (and, for a
    resumed run, where its finished blocks are kept)."""
    what = write_failure(exc) or str(exc)
    anchor = target.parent if target.parent.exists() else target
    try:
        free = f"{shutil.disk_usage(anchor).free / 1e9:.2f} GB free"
    except OSError:
        free = "free space unknown"
    left = (f"the finished blocks are kept in {kept}: free space and run the same command with --resume"
            if kept else "nothing was left behind. Free space or choose another --output_dir")
    return ExportError(
        f"writing {target} failed: {what}. The output needs about {needed_bytes / 1e9:.2f} GB ({free} there); {left}"
    )
