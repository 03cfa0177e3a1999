"""Releasing the resident pages of replaced, memory-mapped weights must never change any data."""

import sys

import numpy as np
import pytest
import torch

from signround.memory import drop_file_pages, gc_frozen_scope, release_memory

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


def test_checkpoint_pages_released_before_tuning(stories_dir, monkeypatch):
    """Input capture's fallback runs one sample through every block, which reads the whole
    memory-mapped checkpoint in; the blocks not yet tuned must not stay resident while block 0 is
    tuned (SmolLM2-135M: ~150 MB of peak RSS)."""
    import functools

    from signround import AutoRound
    from signround.memory import _PM_PRESENT, _file_mappings, pagemap_entries, whole_pages
    from signround.model import capture
    from signround.tune import pipeline

    monkeypatch.setattr(capture, "_block_kwargs", functools.partial(capture._block_kwargs, shortcut=False))

    ar = AutoRound(str(stories_dir), scheme="W4A16", group_size=32, iters=1, nsamples=4, seqlen=32,
                   batch_size=4, enable_torch_compile=False)
    last = ar._model.model.layers[-1].mlp.down_proj.weight
    ptr = last.untyped_storage().data_ptr()
    if not any(lo <= ptr < hi for lo, hi in _file_mappings()):
        pytest.skip("this transformers version copies the checkpoint instead of mapping it")
    seen = []
    real = pipeline._quantize_unit

    def spy(*args, **kwargs):
        if not seen:
            entries = pagemap_entries(*whole_pages(last))
            seen.append((int(((entries & np.uint64(_PM_PRESENT)) != 0).sum()), len(entries)))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_quantize_unit", spy)
    ar.quantize()
    resident, total = seen[0]
    assert total >= 8  # 172 x 64 fp32: enough whole pages for the check to mean something
    assert resident == 0, f"{resident} of {total} pages of the last block's weight still resident"
    import gc

    assert gc.get_freeze_count() == 0, "the block loop's frozen objects are back under the collector"


def test_frozen_gc_scope_still_collects_new_cycles_and_unfreezes():
    import gc
    import weakref

    class Node:
        pass

    old = Node()
    old.me = old  # a cycle from before: frozen, so not collected inside the scope
    old_ref = weakref.ref(old)
    with gc_frozen_scope():
        release_memory(freeze=True)
        assert gc.get_freeze_count() > 0
        del old
        new = Node()
        new.me = new
        new_ref = weakref.ref(new)
        del new
        release_memory(freeze=True)
        assert new_ref() is None, "a cycle made inside the scope is collected"
        assert old_ref() is not None, "frozen objects are skipped"
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert old_ref() is None
