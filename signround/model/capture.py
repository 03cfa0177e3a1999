"""Capture what the first decoder block receives, without editing transformers.

Hidden states for every calibration sample come from running the model up to block 0 (a pre-hook
stops the forward there). The other arguments each block gets (attention mask, position ids,
rotary embeddings, cache position) come from one single-sample forward through all blocks, so
architectures whose blocks get different masks (sliding-window layers) are served too. Samples are
all full-length and unpadded, so single-sample arguments broadcast over any batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layers import get_module


class _StopForward(Exception):
    pass


def _hidden_from(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _detach(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device)
    if isinstance(obj, tuple):
        return tuple(_detach(o, device) for o in obj)
    if isinstance(obj, list):
        return [_detach(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _detach(v, device) for k, v in obj.items()}
    return obj


def _model_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    p = emb.weight if emb is not None else next(model.parameters())
    return p.device


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    block_names: list[str],
    input_ids: torch.Tensor,
    batch_size: int,
    store_device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, dict[str, dict[str, Any]]]:
    """Return (hidden states entering block 0 as float32 ``[N, L, H]``, per-block keyword arguments)."""
    device = _model_device(model)
    first = get_module(model, block_names[0])
    chunks: list[torch.Tensor] = []

    def stop_hook(_mod, args, kwargs):
        chunks.append(_hidden_from(args, kwargs).detach().to(store_device, torch.float32))
        raise _StopForward

    handle = first.register_forward_pre_hook(stop_hook, with_kwargs=True)
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids=input_ids[i : i + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()

    block_kwargs: dict[str, dict[str, Any]] = {}
    handles = []
    for name in block_names:
        def kw_hook(_mod, args, kwargs, name=name):
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if len(args) > 1:
                raise RuntimeError(f"block {name} takes positional arguments besides hidden states; not supported")
            kw["use_cache"] = False
            kw.pop("past_key_values", None)
            kw.pop("past_key_value", None)
            kw.pop("layer_past", None)
            block_kwargs[name] = _detach(kw, store_device)

        handles.append(get_module(model, name).register_forward_pre_hook(kw_hook, with_kwargs=True))
    try:
        model(input_ids=input_ids[:1].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return torch.cat(chunks), block_kwargs


def cast_kwargs(kwargs: dict[str, Any], device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
    """Move arguments to the compute device; floating tensors (masks, rotary tables) to the compute dtype."""

    def conv(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            return o.to(device, dtype) if o.is_floating_point() else o.to(device)
        if isinstance(o, (tuple, list)):
            return type(o)(conv(x) for x in o)
        if isinstance(o, dict):
            return {k: conv(v) for k, v in o.items()}
        return o

    return {k: conv(v) for k, v in kwargs.items()}


def block_forward(block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out
