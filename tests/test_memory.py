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
