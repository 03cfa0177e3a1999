"""Safetensors shards written tensor by tensor, with memory that does not grow with the model.

A safetensors file is an 8-byte header length, a JSON header (names, dtypes, shapes, byte ranges)
and the raw data. The header comes first but is known only when the shard is complete, so each
tensor's bytes are appended to a spill file as it arrives (nothing is held in memory) and, when the
shard reaches its size limit, the shard is written as header + the spill's bytes. Shards get their
final names (``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``, or
``model.safetensors`` when one suffices) when the writer is finished.

The writer's :meth:`state` (finished shards, and the spill's entries and length) is what a resumed
run needs: :meth:`restore` truncates the spill to the recorded length and carries on.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Iterable

import torch

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}


def shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The tensor's raw little-endian bytes (any dtype, bf16 and fp8 included)."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


class ShardWriter:
    """Append named tensors; :meth:`finish` names the shards and writes the index."""

    def __init__(self, out: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.out = Path(out)
        self.max_shard_bytes = max_shard_bytes
        self.shards: list[dict[str, Any]] = []  # finished: {"file": tmp name, "names": [...], "bytes": n}
        self.entries: list[list[Any]] = []  # current shard: [name, dtype, shape, begin, end]
        self.length = 0
        self.total = 0

    # -- state for resuming -------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"shards": self.shards, "entries": self.entries, "length": self.length, "total": self.total,
                "max_shard_bytes": self.max_shard_bytes}

    @classmethod
    def restore(cls, out: Path, state: dict[str, Any]) -> "ShardWriter":
        w = cls(out, state["max_shard_bytes"])
        w.shards, w.entries, w.length, w.total = state["shards"], state["entries"], state["length"], state["total"]
        spill = w._spill()
        if w.length:
            with open(spill, "r+b") as f:
                f.truncate(w.length)  # anything after the recorded state belongs to an unfinished block
        elif spill.exists():
            spill.unlink()
        return w

    # -- writing ------------------------------------------------------------------------------
    def _spill(self) -> Path:
        return self.out / f".shard-{len(self.shards):05d}.data"

    def add(self, name: str, t: torch.Tensor) -> None:
        if t.dtype not in _DTYPES:
            raise TypeError(f"safetensors has no dtype for {t.dtype} ({name})")
        data = tensor_bytes(t)
        if self.entries and self.length + len(data) > self.max_shard_bytes:
            self._close_shard()
        with open(self._spill(), "ab") as f:
            f.write(data)
        self.entries.append([name, _DTYPES[t.dtype], list(t.shape), self.length, self.length + len(data)])
        self.length += len(data)
        self.total += len(data)

    def add_all(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, t in tensors:
            self.add(name, t)

    def sync(self) -> None:
        """Flush the spill to disk (before the state that points into it is recorded)."""
        spill = self._spill()
        if spill.exists():
            fd = os.open(spill, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _close_shard(self) -> None:
        index = len(self.shards)
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        for name, dtype, shape, begin, end in self.entries:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        tmp = self.out / f".shard-{index:05d}.safetensors"
        spill = self._spill()
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            if spill.exists():
                with open(spill, "rb") as src:
                    shutil.copyfileobj(src, f, 16 * 1024 * 1024)
            f.flush()
            os.fsync(f.fileno())
        if spill.exists():
            spill.unlink()
        self.shards.append({"file": tmp.name, "names": [e[0] for e in self.entries], "bytes": self.length})
        self.entries, self.length = [], 0

    def finish(self) -> int:
        """Close the last shard, give every shard its final name, write the index. Returns bytes."""
        if self.entries or not self.shards:
            self._close_shard()
        n = len(self.shards)
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(self.shards):
            final = shard_name(i, n)
            os.replace(self.out / shard["file"], self.out / final)
            weight_map.update({k: final for k in shard["names"]})
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return self.total


def write_safetensors(out: Path, tensors: Iterable[tuple[str, torch.Tensor]],
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> int:
    """Write tensors into shards of at most ``max_shard_bytes`` (plus an index when several). Returns bytes."""
    w = ShardWriter(out, max_shard_bytes)
    w.add_all(tensors)
    return w.finish()
