"""Releasing the resident pages of replaced, memory-mapped weights must never change any data."""

import sys

import pytest
import torch

from signround.memory import drop_file_pages, release_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and madvise")


def test_dropped_file_pages_read_back_unchanged(tmp_path):
    data = torch.randn(64, 4096)
    path = tmp_path / "w.bin"
    data.numpy().tofile(path)
    st = torch.UntypedStorage.from_file(str(path), shared=True, nbytes=data.numel() * 4)
    mapped = torch.tensor([], dtype=torch.float32).set_(st).view(64, 4096)
    assert torch.equal(mapped, data)  # faults every page in
    assert drop_file_pages([mapped], still_used=set()) >= 64 * 4096 * 4 - 2 * 4096
    assert torch.equal(mapped, data)  # faulted back from the file


def test_heap_and_live_tensors_are_left_alone():
    heap = torch.randn(1024, 1024)
    assert drop_file_pages([heap], still_used=set()) == 0
    assert drop_file_pages([heap], still_used={heap.untyped_storage().data_ptr()}) == 0
    release_memory()
    assert torch.isfinite(heap).all()


def _private_map(path, nbytes):
    import mmap

    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), nbytes, flags=mmap.MAP_PRIVATE)
    return mm, torch.frombuffer(mm, dtype=torch.float32)


def test_live_weights_drop_only_unmodified_pages(tmp_path):
    """Weights that stay in use (a copy-on-write checkpoint mapping, as transformers maps it) may
    drop their pages only while no write has made a private copy; their values never change."""
    data = torch.randn(64 * 4096)
    path = tmp_path / "w.bin"
    data.numpy().tofile(path)
    mm, clean = _private_map(path, data.numel() * 4)
    assert torch.equal(clean, data)
    assert drop_file_pages([clean], still_used=set(), live=True) >= data.numel() * 4 - 2 * 4096
    assert torch.equal(clean, data)
    mm2, written = _private_map(path, data.numel() * 4)
    written[5 * 1024] = 7.0  # one page becomes an anonymous private copy
    assert drop_file_pages([written], still_used=set(), live=True) == 0
    assert written[5 * 1024].item() == 7.0 and torch.equal(written[: 5 * 1024], data[: 5 * 1024])
    del clean, written
