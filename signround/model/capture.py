"""Capture what the first decoder block receives, without editing transformers.

Hidden states for every calibration sample come from running the model up to block 0 (a pre-hook
stops the forward there). The other arguments each block gets (attention mask, position ids,
rotary embeddings, cache position; keyword or positional) are recorded per block during one
single-sample forward in which only block 0 computes, so architectures whose blocks get different
masks (sliding-window layers) are served too. Samples are all full-length and unpadded, so
single-sample arguments broadcast over any batch.

Image-text samples (a VLM calibrated on images) make some arguments differ between samples (Qwen2-VL's
M-RoPE rotary tables, Gemma 3's bidirectional image masks): they are recorded sample by sample, and an
argument that differs is kept as :class:`PerSample`, whose rows a forward over samples ``idx`` takes
(:func:`block_forward`'s ``idx``).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, NamedTuple

import torch
from torch import nn

from .layers import get_module
from .samples import AFTER, PerSample, add_after, deepstack_recorded, map_nested, merge_samples, select_samples


logger = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


# key of a block's positional arguments after the hidden states (GPT-2 passes cache, mask and
# encoder states that way) among its captured keyword arguments
POSITIONAL = "__positional__"


def _no_cache(arg: Any) -> Any:
    """Blocks run without a KV cache while quantizing; a positional cache object becomes None."""
    return None if hasattr(arg, "get_seq_length") else arg


def _hidden_from(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _detach(obj: Any, device: torch.device | str, memo: dict) -> Any:
    """``obj`` detached onto ``device``; ``memo`` (within one forward) makes the blocks' shared
    arguments (one rotary table for all of them) one stored tensor, not one copy per block. It keeps
    each source alive too, so no later tensor can take a recorded one's address."""
    def leaf(o: Any) -> Any:
        if not isinstance(o, torch.Tensor):
            return o
        key = (o.data_ptr(), o.shape, o.stride(), o.dtype)
        if key not in memo:
            memo[key] = (o, o.detach().to(device))
        return memo[key][1]

    return map_nested(obj, leaf)


def _model_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    p = emb.weight if emb is not None else next(model.parameters())
    return p.device


class Captured(NamedTuple):
    hidden: torch.Tensor  # what enters block 0, float32 [N, L, H]
    kwargs: dict[str, dict[str, Any]]  # each block's other arguments
    output_len: int | None  # blocks return a tensor (None) or a tuple of this length


@contextlib.contextmanager
def float32_hidden(model: nn.Module):
    """Inside, the input embedding's output is float32, so what the model derives from the hidden
    states before its blocks (rotary tables, masks) and after them (final norm) is float32 too:
    the self-check's reference must not carry a half-precision model's rounding."""
    emb = model.get_input_embeddings()
    handle = emb.register_forward_hook(lambda _m, _a, out: out.float())
    try:
        yield
    finally:
        handle.remove()


def _sample_inputs(input_ids: torch.Tensor, extras: list[dict[str, Any]] | None, i: int, j: int,
                   device: torch.device) -> dict[str, Any]:
    """The model's inputs for samples ``i:j``: token ids, and an image-text sample's other inputs
    (pixel values, image grids, token types; such samples go one at a time)."""
    out: dict[str, Any] = {"input_ids": input_ids[i:j].to(device)}
    if extras is not None:
        assert j - i == 1, "image-text samples are forwarded one at a time"
        out.update({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in extras[i].items()})
    return out


@torch.no_grad()
def run_to_first_block(model: nn.Module, block_names: list[str], input_ids: torch.Tensor, batch_size: int,
                       store_device: torch.device | str = "cpu", extras: list[dict[str, Any]] | None = None
                       ) -> torch.Tensor:
    """The model's forward on every sample up to its first block (embeddings; a VLM's vision tower on
    the images of ``extras``): what enters block 0, float32 ``[N, L, H]``. No block runs."""
    device = _model_device(model)
    chunks: list[torch.Tensor] = []
    n = input_ids.shape[0]
    step = 1 if extras is not None else batch_size

    def stop_hook(_mod, args, kwargs):
        chunks.append(_hidden_from(args, kwargs).detach().to(store_device, torch.float32))
        raise _StopForward

    handle = get_module(model, block_names[0]).register_forward_pre_hook(stop_hook, with_kwargs=True)
    try:
        for i in range(0, n, step):
            try:
                model(**_sample_inputs(input_ids, extras, i, min(i + step, n), device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return torch.cat(chunks)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    block_names: list[str],
    input_ids: torch.Tensor,
    batch_size: int,
    store_device: torch.device | str = "cpu",
    output_len: int | None | bool = False,
    extras: list[dict[str, Any]] | None = None,
    hidden: bool = True,
) -> Captured:
    """Hidden states entering block 0 as float32 ``[N, L, H]``, per-block keyword arguments, and
    the shape of a block's output (needed to run the model's tail from stored hidden states).

    ``output_len`` known (None: blocks return a tensor; n: a tuple of n): no block runs at all,
    every one passes its input through while the arguments are recorded; ``False``: the first
    block runs once on one sample to find out. ``extras``: each sample's model inputs besides its
    ids (image-text data); the arguments are then recorded per sample and merged
    (:func:`merge_samples`). ``hidden`` False: the arguments alone (a resumed run has its chains)."""
    device = _model_device(model)
    first = get_module(model, block_names[0])
    n = input_ids.shape[0]
    states = (run_to_first_block(model, block_names, input_ids, batch_size, store_device, extras) if hidden
              else torch.empty(0))

    # text: one sample's arguments serve all; image-text: every sample's, with what the decoder adds
    # between blocks (deepstack), merged
    recording = (deepstack_recorded(model, block_names, store_device) if extras is not None
                 else contextlib.nullcontext([None]))
    with recording as seen:
        per, added = [], []
        for i in range(n if extras is not None else 1):
            seen[:] = [None]
            sample = _sample_inputs(input_ids, extras, i, i + 1, device)
            if output_len is False:  # the first sample's forward finds the blocks' output structure
                out_len: list[int | None] = []
                handle = first.register_forward_hook(
                    lambda _m, _a, out: out_len.append(len(out) if isinstance(out, (tuple, list)) else None))
                try:
                    per.append(_block_kwargs(model, block_names, sample, store_device))
                finally:
                    handle.remove()
                output_len = out_len[0] if out_len else None
            else:
                per.append(_block_kwargs(model, block_names, sample, store_device, output_len=output_len))
            added.append(seen[0])
    if extras is None:
        return Captured(states, per[0], output_len)
    kwargs = {name: merge_samples([p[name] for p in per], name) for name in block_names}
    add_after(kwargs, block_names, added, input_ids.shape[1])
    return Captured(states, kwargs, output_len)


def _block_kwargs(
    model: nn.Module, block_names: list[str], sample: dict[str, Any], store_device: torch.device | str,
    shortcut: bool = True, output_len: int | None | bool = False,
) -> dict[str, dict[str, Any]]:
    """Each block's arguments besides the hidden states, from one forward of ``sample`` (the model's
    inputs for one sample): keywords, and positional ones under :data:`POSITIONAL`.

    The arguments come from the model's forward before its block loop (masks, rotary tables), not
    from the hidden states, so only the first block computes: the others pass their input through,
    shaped like the first block's output, and the forward stops at the last block. A full forward of
    an fp16 model is slow on a CPU (1.9 s of SmolLM2-135M's 2 s capture; minutes for 7B models).
    Arguments computed from hidden states would differ, but they could not serve a batch of other
    samples either (captured arguments are broadcast, or per sample taken from the model's inputs),
    so the pipeline assumes none. A model whose
    loop fails on passed-through outputs gets the full forward instead."""
    known = output_len is not False  # every block passes through, block 0 included
    out_like: list[Any] = [None if output_len is None else (None,) * output_len] if known else []
    recorded: dict[str, dict[str, Any]] = {}
    memo: dict = {}  # the blocks share their masks and rotary tables: stored once

    def record(name: str, args: tuple, kwargs: dict[str, Any]) -> None:
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        if len(args) > 1:
            kw[POSITIONAL] = tuple(_no_cache(a) for a in args[1:])
        kw["use_cache"] = False
        for k in ("past_key_values", "past_key_value", "layer_past"):
            kw.pop(k, None)
        recorded[name] = _detach(kw, store_device, memo)

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        hidden = _hidden_from(args, kwargs)
        like = out_like[0]
        return (hidden, *like[1:]) if isinstance(like, tuple) else hidden

    def run(fast: bool) -> None:
        recorded.clear()
        handles, patched = [], []
        last = block_names[-1]
        for i, name in enumerate(block_names):
            block = get_module(model, name)

            def pre(_mod, args, kwargs, name=name):
                record(name, args, kwargs)
                if fast and name == last:
                    raise _StopForward

            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            if fast and i == 0 and not known:
                handles.append(block.register_forward_hook(lambda _m, _a, out: out_like.append(out)))
            elif fast:
                patched.append((block, block.__dict__.get("forward")))  # accelerate keeps its hook there
                block.forward = passthrough
        try:
            model(**sample, use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
            for block, own in patched:
                if own is None:
                    del block.forward
                else:
                    block.forward = own

    with torch.no_grad():
        fast = shortcut and (len(block_names) > 1 or known)
        if fast and known:
            run(fast=True)  # no block computes: nothing to fall back from
            return recorded
        if fast:
            try:
                run(fast=True)
                # stopped at the last block before reaching the others: the loop reorders blocks
                fast = set(recorded) == set(block_names)
            except Exception as e:  # noqa: BLE001 - any failure of the shortcut: do it the slow, sure way
                logger.debug("pass-through kwargs capture failed (%s); running the full forward", e)
                fast = False
        if not fast:
            run(fast=False)
    return recorded


def cast_kwargs(kwargs: dict[str, Any], device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
    """Move arguments to the compute device; floating tensors (masks, rotary tables) to the compute dtype."""

    def conv(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            return o.to(device, dtype) if o.is_floating_point() else o.to(device)
        return o.map(conv) if isinstance(o, PerSample) else o

    return map_nested(kwargs, conv)


def block_forward(block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any],
                  idx: slice | torch.Tensor | None = None) -> torch.Tensor:
    """The block's hidden-state output for ``x``, called as the model calls it (captured arguments);
    ``idx``: which calibration samples ``x`` holds, for arguments that differ between samples."""
    kw = dict(select_samples(kwargs, idx))
    after = kw.pop(AFTER, None)
    out = block(x, *kw.pop(POSITIONAL, ()), **kw)
    h = out[0] if isinstance(out, (tuple, list)) else out
    if after is not None:  # as the model's loop adds them (out of place: tuning backpropagates through)
        mask, feats = after
        h = h.clone()
        h[mask.to(h.device)] = h[mask.to(h.device)] + feats.to(h.device, h.dtype)
    return h



@contextlib.contextmanager
def _blocks_skipped(model: nn.Module, block_names: list[str], current: list[torch.Tensor], output_len: int | None):
    """Inside, the first block returns ``current[0]`` (in the dtype it was called with) and the
    others pass their input on: the model's forward runs its tail on given hidden states."""
    def first(*args: Any, **kwargs: Any) -> Any:
        h = current[0].to(_hidden_from(args, kwargs).dtype)
        return h if output_len is None else (h, *([None] * (output_len - 1)))

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        h = _hidden_from(args, kwargs)
        return h if output_len is None else (h, *([None] * (output_len - 1)))

    patched = []
    for i, name in enumerate(block_names):
        block = get_module(model, name)
        patched.append((block, block.__dict__.get("forward")))
        block.forward = first if i == 0 else passthrough
    try:
        yield
    finally:
        for block, own in patched:
            if own is None:
                del block.forward
            else:
                block.forward = own


@torch.no_grad()
def inputs_after_blocks(
    model: nn.Module,
    block_names: list[str],
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    target: nn.Module,
    output_len: int | None,
    batch_size: int,
    store_device: torch.device | str = "cpu",
) -> torch.Tensor:
    """What ``target`` (a module after the blocks, e.g. lm_head) receives when the last block's
    outputs are ``hidden``: the model's own forward runs with the first block returning ``hidden``
    and the others passing it on, so the final norm and whatever else the architecture does after
    its block loop are applied, without running (or loading) any block. ``input_ids`` only give
    the embedding pass its shape. Returns float32 inputs of ``target``."""
    chunks: list[torch.Tensor] = []
    current: list[torch.Tensor] = []

    def stop(_m, args):
        chunks.append(args[0].detach().to(store_device, torch.float32))
        raise _StopForward

    device = _model_device(model)
    handle = target.register_forward_pre_hook(stop)
    try:
        with _blocks_skipped(model, block_names, current, output_len):
            for i in range(0, hidden.shape[0], batch_size):
                current[:] = [hidden[i : i + batch_size].to(device)]
                try:
                    model(input_ids=input_ids[i : i + batch_size].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    if len(chunks) != -(-hidden.shape[0] // batch_size):
        raise RuntimeError(f"{type(target).__name__} was not reached by the model's forward after its blocks")
    return torch.cat(chunks)


def loss_grad_after_blocks(
    model: nn.Module,
    block_names: list[str],
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    output_len: int | None,
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, float]:
    """The gradient of the model's mean next-token loss on ``input_ids`` with respect to the last
    block's outputs ``hidden``, and the loss: the model's own tail (final norm, head, loss) runs on
    ``hidden`` in ``dtype`` as :func:`inputs_after_blocks` runs it, no block runs. Float32, shaped
    like ``hidden``."""
    grads: list[torch.Tensor] = []
    current: list[torch.Tensor] = []
    total = 0.0
    device = _model_device(model)
    n = hidden.shape[0]
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:  # the gradient is wanted at ``hidden`` alone
        p.requires_grad_(False)
    # the tail (norm, head) in ``dtype``: a float16 checkpoint's matmuls on a CPU without native
    # fp16 take seconds each (SmolLM2-135M's head: 15 s a sample instead of 0.1)
    inside = tuple(n + "." for n in block_names)
    recast = {id(p): (p, p.data) for name, p in model.named_parameters()
              if not name.startswith(inside) and p.is_floating_point() and not p.is_meta and p.dtype != dtype}
    for p, data in recast.values():
        p.data = data.to(dtype)
    try:
        with torch.enable_grad(), _blocks_skipped(model, block_names, current, output_len):
            for i in range(0, n, batch_size):
                h = hidden[i : i + batch_size].to(device, torch.float32).requires_grad_(True)
                current[:] = [h]
                ids = input_ids[i : i + batch_size].to(device)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss * (ids.shape[0] / n)
                (g,) = torch.autograd.grad(loss, h)
                grads.append(g.float().to(hidden.device))
                total += float(loss.detach())
    finally:
        for p, data in recast.values():
            p.data = data
        for p in frozen:
            p.requires_grad_(True)
    return torch.cat(grads), total
