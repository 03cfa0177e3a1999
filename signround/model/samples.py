"""Block arguments that differ between calibration samples (image-text data of a VLM).

Text samples give every block the same arguments (masks, rotary tables), captured once and broadcast
over any batch. Image-text samples do not: Qwen2-VL's M-RoPE positions follow each image's size and
place, Gemma 3's masks open an image's tokens to each other. Such an argument is a :class:`PerSample`
(one batch-1 value per sample, stored once per distinct value), and a forward over samples ``idx``
takes their rows (:func:`select_samples`). What a decoder's loop adds between blocks (Qwen3-VL's
deepstack image features) is kept per sample as the :data:`AFTER` entry of the blocks it follows.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ConfigError

# key of what the model's loop adds to a block's output before the next block sees it: Qwen3-VL's
# "deepstack" image features, added at the image positions after its first blocks. A (positions [B, L],
# features [n, H]) pair, per sample; :func:`block_forward` adds it to the block's output
AFTER = "__after__"
# the keywords a decoder takes those from (Qwen3-VL, Qwen3-VL-MoE, Qwen3-Omni)
_DEEPSTACK = ("visual_pos_masks", "deepstack_visual_embeds")


def map_nested(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn`` applied to each leaf of nested tuples, lists and dicts (a :class:`PerSample` is a leaf)."""
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_nested(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_nested(v, fn) for k, v in obj.items()}
    return fn(obj)


class PerSample:
    """A block argument that differs between calibration samples: one batch-1 tensor per sample;
    a forward over samples ``idx`` gets their rows concatenated (the batch dimension is the first)."""

    __slots__ = ("values",)

    def __init__(self, values: list[torch.Tensor]):
        self.values = values

    def take(self, idx: slice | torch.Tensor | list[int]) -> torch.Tensor:
        rows = range(len(self.values))[idx] if isinstance(idx, slice) else (
            idx.tolist() if isinstance(idx, torch.Tensor) else idx)
        return torch.cat([self.values[i] for i in rows])

    def map(self, fn) -> "PerSample":
        done: dict[int, torch.Tensor] = {}  # a value shared by several samples is mapped once
        out = []
        for v in self.values:
            if id(v) not in done:
                done[id(v)] = fn(v)
            out.append(done[id(v)])
        return PerSample(out)

    def distinct(self) -> int:
        return len({id(v) for v in self.values})


def _per_sample_in(obj: Any) -> bool:
    if isinstance(obj, PerSample):
        return True
    if isinstance(obj, (tuple, list)):
        return any(_per_sample_in(o) for o in obj)
    if isinstance(obj, dict):
        return any(_per_sample_in(o) for o in obj.values())
    return False


def select_samples(kwargs: dict[str, Any], idx: slice | torch.Tensor | None) -> dict[str, Any]:
    """``kwargs`` for the samples ``idx``: each :class:`PerSample` argument replaced by their rows."""
    if not _per_sample_in(kwargs):
        return kwargs
    if idx is None:
        raise ValueError("block arguments differ between samples: the forward must say which samples it runs")

    return map_nested(kwargs, lambda o: o.take(idx) if isinstance(o, PerSample) else o)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and (a.data_ptr() == b.data_ptr() or torch.equal(a, b)))
    return a == b


def _plain_positions(t: Any) -> bool:
    return (isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == 1 and not t.is_floating_point()
            and torch.equal(t[0], torch.arange(t.shape[1], device=t.device)))


def merge_samples(records: list[Any], where: str = "") -> Any:
    """One sample's recorded arguments each (same structure): what all samples share stays as it is,
    a tensor that differs becomes :class:`PerSample`."""
    first = records[0]
    if isinstance(first, dict):
        return {k: merge_samples([r[k] for r in records], f"{where}.{k}" if where else k) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(merge_samples([r[i] for r in records], f"{where}[{i}]") for i in range(len(first)))
    if all(_same(first, r) for r in records[1:]):
        return first
    present = [r for r in records if r is not None]
    if len(present) < len(records) and all(_plain_positions(r) for r in present):
        # Qwen3-VL passes its blocks no text positions for image samples and 0..L-1 for text ones: the
        # same to a block (transformers' layers read them only to tell packed sequences apart)
        return None
    if not all(isinstance(r, torch.Tensor) and r.shape == first.shape and r.shape[:1] == (1,) for r in records):
        raise ValueError(f"block argument {where!r} differs between calibration samples in a way that cannot be "
                         "batched; calibrate on text (leave the image-text dataset out)")
    # samples that agree share one tensor: an image mask or rotary table is stored once per distinct
    # value (images of one size at one place), not once per sample
    distinct: list[torch.Tensor] = []
    values = []
    for r in records:
        same = next((d for d in distinct if _same(d, r)), None)
        if same is None:
            distinct.append(r)
        values.append(r if same is None else same)
    return PerSample(values)


@contextlib.contextmanager
def deepstack_recorded(model: nn.Module, block_names: list[str], store_device: torch.device | str):
    """Inside, a forward's deepstack inputs of the blocks' decoder are put in the yielded list's one
    slot (None: the forward had none); a decoder that takes other deepstack inputs is refused."""
    decoder = model.get_submodule(block_names[0].rsplit(".", 2)[0])
    params = inspect.signature(decoder.forward).parameters
    unknown = [p for p in params if "deepstack" in p and p not in _DEEPSTACK]
    if unknown:
        raise ConfigError(f"{type(decoder).__name__} adds image features between its blocks ({', '.join(unknown)}), "
                         "which calibration on images does not reproduce for it; calibrate on text (leave the "
                         "image-text dataset out)")
    seen: list[tuple[torch.Tensor, list[torch.Tensor]] | None] = [None]

    def record(_m, _args, kwargs):
        mask, embeds = (kwargs.get(k) for k in _DEEPSTACK)
        seen[0] = None if mask is None or embeds is None else (
            mask.detach().to(store_device), [e.detach().to(store_device) for e in embeds])

    handle = decoder.register_forward_pre_hook(record, with_kwargs=True) if _DEEPSTACK[1] in params else None
    try:
        yield seen
    finally:
        if handle is not None:
            handle.remove()


def add_after(kwargs: dict[str, dict[str, Any]], block_names: list[str], added: list, length: int) -> None:
    """Each sample's deepstack features, as an :data:`AFTER` entry of the blocks they follow (by the
    block's index in the decoder, as the model's loop counts them); a sample without images adds none."""
    if not any(a is not None for a in added):
        return
    hidden = next(a[1][0].shape[-1] for a in added if a is not None)
    depth = max(len(a[1]) for a in added if a is not None)
    for name in block_names:
        index = int(name.rsplit(".", 1)[1])
        if index >= depth:
            continue
        masks, feats = [], []
        for a in added:
            if a is None:
                masks.append(torch.zeros(1, length, dtype=torch.bool))
                feats.append(torch.zeros(0, hidden))
            else:
                masks.append(a[0])
                feats.append(a[1][index])
        kwargs[name][AFTER] = (PerSample(masks), PerSample(feats))
