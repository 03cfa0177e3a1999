"""Give freed memory back: between blocks, the allocator otherwise keeps (and fragments) the
fp32 copies, activations and optimizer state of every block tuned so far, and peak RSS grows
block after block."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys

import numpy as np
import torch

_LIBC: list = []


def malloc_trim() -> None:
    """Return free heap pages to the OS (glibc's malloc_trim; a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL("libc.so.6"))
        except OSError:  # musl or another libc without malloc_trim
            _LIBC.append(None)
    libc = _LIBC[0]
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


# Allocations of at least this size get their own mapping, returned to the OS when freed. glibc
# otherwise raises the threshold to the largest block freed so far (up to 32 MB), after which a
# block's activations and qdq temporaries come from the heap, stay resident when freed and pile up
# until the next trim; fixing it also keeps the heap's trim threshold at its small default. Fixed
# at 32 MB (glibc's own ceiling): a TinyLlama-1.1B-shaped streamed SignRound run (11 layers, 2
# iters) peaks at 1526 MiB instead of 1776, in 105 s instead of 117; 16 MB gives 1425 MiB but
# slows streamed RTN by 10-15%, 4 MB 1315 MiB at 36% more time.
MMAP_THRESHOLD = 32 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def tune_allocator() -> None:
    """Fix glibc's mmap threshold (see MMAP_THRESHOLD) unless the user set MALLOC_MMAP_THRESHOLD_."""
    import os

    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    malloc_trim()  # loads libc into _LIBC
    libc = _LIBC[0] if _LIBC else None
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def release_memory(freeze: bool = False) -> None:
    """Collect garbage, empty the CUDA cache and return free heap pages to the OS (glibc).
    ``freeze`` (only inside :func:`gc_frozen_scope`): later collections skip what survives this one."""
    gc.collect()
    if freeze:
        gc.freeze()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    malloc_trim()


@contextlib.contextmanager
def gc_frozen_scope():
    """Inside, objects can be frozen out of the garbage collector's scans (``release_memory(freeze=
    True)``): a full collection otherwise walks every object alive, the model, imported modules and
    compile caches (~420k objects on SmolLM2-135M, 0.2-0.3 s, 8 s of a 30-block run when done after
    each block). Frozen objects that die are still freed by reference counting; cycles among them
    wait for the scope's exit, which unfreezes everything."""
    try:
        yield
    finally:
        gc.unfreeze()


_MADV_DONTNEED = 4


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of regular files (Linux /proc/self/maps)."""
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/") and not parts[5].rstrip().endswith("(deleted)"):
                lo, hi = parts[0].split("-")
                spans.append((int(lo, 16), int(hi, 16)))
    return spans


_PM_PRESENT, _PM_FILE = 1 << 63, 1 << 61  # /proc/self/pagemap: page resident; page is the file's own
_PAGE = 4096


def whole_pages(t: torch.Tensor) -> tuple[int, int]:
    """[start, end) of the whole pages inside a tensor's storage (empty when it spans none)."""
    st = t.untyped_storage()
    ptr, n = st.data_ptr(), st.nbytes()
    return -(-ptr // _PAGE) * _PAGE, (ptr + n) // _PAGE * _PAGE


def pagemap_entries(start: int, end: int) -> np.ndarray:
    """This process's /proc/self/pagemap entries (uint64, one a page) for page-aligned [start, end)."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(start // _PAGE * 8)
        return np.frombuffer(f.read(max(0, end - start) // _PAGE * 8), dtype=np.uint64)


def _only_file_pages(start: int, end: int) -> bool:
    """Whether every resident page of ``[start, end)`` is still the file's page. A write to a private
    file mapping (transformers maps checkpoints copy-on-write) swaps in an anonymous copy, and
    dropping that copy would silently undo the write. Unreadable pagemap: no."""
    try:
        entries = pagemap_entries(start, end)
    except OSError:
        return False
    resident = (entries & np.uint64(_PM_PRESENT)) != 0
    return len(entries) == (end - start) // _PAGE and bool(np.all(entries[resident] & np.uint64(_PM_FILE)))


def drop_file_pages(old: list[torch.Tensor], still_used: set[int], live: bool = False) -> int:
    """Let the kernel drop the resident pages of replaced weights that live in a memory-mapped
    checkpoint (transformers maps safetensors files): otherwise every tuned block keeps both
    its new weights and its old file pages resident, and RSS grows by the model's size.

    Only whole pages inside a storage that no live tensor uses (``still_used``: data pointers)
    are dropped; should anything read them again, they are faulted back in from the file.
    ``live=True``: the tensors stay in use (e.g. weights just checked for NaN, read again only when
    their block's turn comes); a tensor is then skipped unless every resident page is unmodified.
    Returns the bytes advised.
    """
    if not sys.platform.startswith("linux") or not old:
        return 0
    if not _LIBC:
        malloc_trim()
    libc = _LIBC[0]
    if libc is None or not hasattr(libc, "madvise"):
        return 0
    try:
        spans = _file_mappings()
    except OSError:
        return 0
    done = 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for t in old:
        if t.device.type != "cpu":
            continue
        st = t.untyped_storage()
        ptr, n = st.data_ptr(), st.nbytes()
        if ptr in still_used or n < _PAGE:
            continue
        if not any(lo <= ptr and ptr + n <= hi for lo, hi in spans):
            continue  # heap memory: freeing it is the allocator's job
        start, end = whole_pages(t)
        if live and not _only_file_pages(start, end):
            continue
        if end > start and libc.madvise(start, end - start, _MADV_DONTNEED) == 0:
            done += end - start
    return done
