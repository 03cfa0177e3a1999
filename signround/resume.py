"""Resume state: what a run killed at any moment needs to continue after its last finished block.

It lives in ``resume/`` inside the hidden partial output directory, next to the files being written:

- ``state.json``: the run's fingerprint (model, scheme, tuning settings, calibration data, seed,
  formats), the number of finished blocks, per-block statistics, each output file's writer state
  (how far its spill is valid), the name of the chain file, and AutoScheme's choice (a resumed run
  reuses it instead of scoring again);
- ``chain-K.safetensors``: both activation chains after block K, the probes' hidden states and
  the tuning RNG state.

Writes are ordered so that a kill at any instant leaves a consistent state: the output spills are
synced, then the chain file is written under a new name, then ``state.json`` is replaced
atomically, then the previous chain file is removed. A resumed run truncates each spill to its
recorded length, so a block that was half written when the process died is written again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import ConfigError
from .tune.pipeline import ResumePoint

logger = logging.getLogger(__name__)

STATE = "state.json"
# Chains larger than this are saved at most every CHECKPOINT_EVERY_S seconds (a block recomputed
# after a crash costs less than writing gigabytes after every block).
SMALL_CHAINS_BYTES = 512 * 2**20
CHECKPOINT_EVERY_S = 300.0


def tensor_digest(t: torch.Tensor | None) -> str:
    if t is None:
        return "none"
    h = hashlib.sha256(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def data_digest(ids: torch.Tensor | None, extras: list[dict[str, torch.Tensor]] | None = None) -> str:
    """Calibration data: the ids, and image-text samples' other model inputs (pixels, grids)."""
    if not extras:
        return tensor_digest(ids)
    h = hashlib.sha256(tensor_digest(ids).encode())
    for e in extras:
        for k in sorted(e):
            h.update(f"{k}:{tensor_digest(e[k])}".encode())
    return h.hexdigest()[:16]


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "none"


class RunCheckpoint:
    """Reads and writes the resume state of one output location."""

    def __init__(self, directory: Path, fingerprint: dict[str, str], resume: bool):
        self.dir = directory
        self.fingerprint = fingerprint
        self.sink: Any = None  # the ExportSink whose writer states go with each checkpoint
        self.autoscheme: dict[str, Any] | None = None  # AutoScheme's choice, kept so a resume does not score again
        self._state: dict[str, Any] | None = None
        self._last_save = 0.0
        if resume:
            self._state = self._read()
        else:
            directory.mkdir(parents=True, exist_ok=True)

    def _read(self) -> dict[str, Any] | None:
        path = self.dir / STATE
        if not path.is_file():
            logger.info("no finished block to resume from in %s; starting from the first block", self.dir.parent)
            self.dir.mkdir(parents=True, exist_ok=True)
            return None
        state = json.loads(path.read_text())
        old = state.get("fingerprint", {})
        for key, value in self.fingerprint.items():
            if old.get(key) != value:
                raise ConfigError(
                    f"--resume: the interrupted run used a different {key} ({old.get(key)!r}, now {value!r}); "
                    "rerun with the same settings to continue it, or use --start_over to discard it"
                )
        self.autoscheme = state.get("autoscheme")
        return state

    @property
    def sink_state(self) -> dict | None:
        return self._state["sink"] if self._state else None

    def resume_point(self) -> ResumePoint | None:
        if not self._state:
            return None
        t = load_file(str(self.dir / self._state["chain"]))
        return ResumePoint(
            blocks_done=self._state["blocks_done"], x_fp=t.get("x_fp"), x_q=t.get("x_q"),
            probes={k[len("probe_"):]: v for k, v in t.items() if k.startswith("probe_")},
            generator_state=t["generator"], block_stats=self._state["block_stats"],
        )

    def save(self, point: ResumePoint) -> None:
        chains = [t for t in (point.x_fp, point.x_q) if t is not None]
        size = sum(t.numel() * t.element_size() for t in chains)
        if size > SMALL_CHAINS_BYTES and time.time() - self._last_save < CHECKPOINT_EVERY_S:
            return
        t0 = time.time()
        sink_state = self.sink.state() if self.sink is not None else {}  # syncs the spills first
        chain = f"chain-{point.blocks_done}.safetensors"
        tensors = {"generator": point.generator_state}
        named = [("x_fp", point.x_fp), ("x_q", point.x_q), *((f"probe_{k}", v) for k, v in point.probes.items())]
        for key, t in named:
            if t is not None:
                tensors[key] = t.detach().cpu().contiguous()
        if point.x_fp is not None and point.x_q is not None and point.x_q.data_ptr() == point.x_fp.data_ptr():
            tensors["x_q"] = tensors["x_fp"].clone()  # safetensors refuses shared storage
        save_file(tensors, str(self.dir / chain))
        _fsync(self.dir / chain)
        state = {"fingerprint": self.fingerprint, "blocks_done": point.blocks_done, "chain": chain,
                 "block_stats": point.block_stats, "sink": sink_state,
                 **({"autoscheme": self.autoscheme} if self.autoscheme is not None else {})}
        tmp = self.dir / (STATE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        _fsync(tmp)
        os.replace(tmp, self.dir / STATE)
        for old in self.dir.glob("chain-*.safetensors"):
            if old.name != chain:
                old.unlink()
        self._last_save = time.time()
        logger.debug("resume state after %d blocks saved in %.2f s (%.1f MB)", point.blocks_done,
                     time.time() - t0, size / 1e6)

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
