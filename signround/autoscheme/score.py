"""Sensitivity of each layer group to each option: DeltaLoss (SignRoundV2), block by block.

The model's next-token loss on the calibration data changes, to first order, by
``sum |dL/dW * (Q(W) - W)|`` when a layer's weight ``W`` becomes ``Q(W)`` (plus
``sum |dL/dx * (Q(x) - x)|`` over its inputs for options that quantize activations). The
gradients are taken once, at full precision, for every option: with the absolute value taken per
element and per mini-batch, the sum over mini-batches factors into ``sum |dL/dW|`` (accumulated
once) times ``|Q(W) - W|`` (one per option), so scoring costs one forward and one backward pass over
the model whatever the number of options. ``Q(W)`` is optimized RTN (the clipping search weighted
by the layer's inputs), the start SignRound tunes from.

The backward pass runs block by block: a forward pass keeps each block's inputs (for the
calibration samples of one chunk), the model's own tail gives the loss gradient at the last
block's outputs, and each block, loaded again, turns the gradient at its outputs into the
gradient at its inputs and at its weights. One block is in memory at a time (streamed checkpoints
included); the stored inputs are bounded by ``max_cache_bytes``, more samples are scored in chunks.
"""

from __future__ import annotations

import contextlib
import logging
import time

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..devices import DeviceMap
from ..model.capture import block_forward, capture_block_inputs, cast_kwargs, loss_grad_after_blocks
from ..model.layers import Conv1D, get_module, get_weight
from ..memory import gc_frozen_scope, release_memory
from ..model.source import WeightSource
from ..qdq import qdq
from ..qdq.act import qdq_act
from ..schemes import QuantSpec
from ..tune.config import TuneConfig
from ..tune.pipeline import amp_dtype, cache_dtype, flush_denormals
from ..tune.placement import place_block
from ..tune.rtn import CLIP_GRID, opt_rtn_grids, search_clip

logger = logging.getLogger(__name__)

MAX_CACHE_BYTES = 2 << 30  # stored block inputs of one chunk of samples


class _LayerTaps:
    """Forward: per input channel sum of x^2 and |x| max of each layer's inputs (the clipping search's
    weights, static activation ranges). Backward, when options quantize activations: per option
    ``sum |dL/dx * (Q(x) - x)|`` of the layer's inputs."""

    def __init__(self, mods: dict[str, nn.Module], act_options: list[tuple[int, QuantSpec]]):
        self.sq: dict[str, torch.Tensor] = {}
        self.amax: dict[str, torch.Tensor] = {}
        self.act: dict[tuple[str, int], float] = {}
        self.act_options = act_options
        self.backward = False
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in mods.items()]

    def _hook(self, name: str):
        def hook(_m, args):
            x = args[0]
            if not self.backward:
                a = x.detach().float().reshape(-1, x.shape[-1])
                self.sq[name] = self.sq.get(name, 0) + (a * a).sum(0)
                m = a.abs().amax()
                self.amax[name] = torch.maximum(self.amax[name], m) if name in self.amax else m
            elif self.act_options and x.requires_grad:
                xd = x.detach()
                x.register_hook(lambda g, xd=xd: self._act_score(name, xd, g))

        return hook

    def _act_score(self, name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        xf, gf = x.float(), g.float()
        for o, spec in self.act_options:
            amax = self.amax.get(name) if spec.needs_act_range else None
            err = (qdq_act(xf, spec, amax) - xf).abs_().mul_(gf.abs()).sum().item()
            self.act[(name, o)] = self.act.get((name, o), 0.0) + err

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@flush_denormals()
@gc_frozen_scope()
def score_groups(
    model: nn.Module,
    block_names: list[str],
    units: dict[str, list[tuple[int, list[str]]]],
    n_groups: int,
    options: list[QuantSpec],
    layer_specs: dict[str, list[QuantSpec]],
    calib_ids: torch.Tensor,
    cfg: TuneConfig,
    devmap: DeviceMap,
    source: WeightSource,
    batch_size: int,
    max_cache_bytes: int = MAX_CACHE_BYTES,
    calib_extras: list[dict] | None = None,
) -> np.ndarray:
    """``[n_groups, n_options]`` DeltaLoss; ``units[block]`` lists (group index, its layers in the block);
    ``layer_specs[layer][o]`` is the layer's spec under option ``o`` (activation terms come from ``options``)."""
    device = devmap.primary
    store = torch.device("cpu") if cfg.low_gpu_mem_usage or device.type == "cpu" else device
    cache = cache_dtype(cfg, device)
    scores = np.zeros((n_groups, len(options)))
    n, length = calib_ids.shape
    hidden = model.config.get_text_config().hidden_size
    per_sample = len(block_names) * length * hidden * torch.empty((), dtype=cache).element_size()
    chunk = max(1, min(n, max_cache_bytes // max(per_sample, 1)))
    logger.info("AutoScheme: DeltaLoss of %d groups x %d options on %d x %d tokens (%d chunk%s)", n_groups,
                len(options), n, length, -(-n // chunk), "s" if chunk < n else "")
    t0 = time.time()
    sq: dict[str, torch.Tensor] = {}  # the clipping search's input weights, from the first chunk
    for start in range(0, n, chunk):
        ids = calib_ids[start : start + chunk]
        extras = None if calib_extras is None else calib_extras[start : start + chunk]
        _score_chunk(model, block_names, units, options, layer_specs, ids, extras, len(ids) / n, cfg, devmap, source,
                     min(batch_size, len(ids)), store, cache, scores, sq)
    logger.info("AutoScheme: scoring took %.1f s", time.time() - t0)
    return scores


def _score_chunk(model, block_names, units, options, layer_specs, ids, extras, share, cfg, devmap, source, bs, store,
                 cache, scores, sq) -> None:
    device = devmap.primary
    amp = amp_dtype(device, cfg)
    act_options = [(o, s) for o, s in enumerate(options) if s.quantized and s.act_quantized]

    def autocast():
        return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

    source.materialize_outside(model, block_names)
    source.materialize(model, block_names[0])
    cap = capture_block_inputs(model, block_names, ids, bs, store, extras=extras)
    if source.streamed:
        source.release(model, block_names[0])
    inputs = [cap.hidden.to(cache)]
    amax: dict[str, torch.Tensor] = {}
    with torch.no_grad():  # forward: every block's inputs, and each layer's input statistics
        for block in tqdm(block_names, desc="AutoScheme forward"):
            with _placed(model, block, units, devmap, source, amp, cap.kwargs) as (blk, mods, kw):
                taps = _LayerTaps(mods, [])
                try:
                    x = inputs[-1]
                    with autocast():
                        y = [block_forward(blk, x[i : i + bs].to(device, torch.float32), kw, slice(i, i + bs))
                             .to(store, cache) for i in range(0, x.shape[0], bs)]
                finally:
                    taps.close()
                for name, s in taps.sq.items():
                    sq.setdefault(name, s)
                amax.update(taps.amax)
                inputs.append(torch.cat(y))
    tail_dtype = amp or torch.float32  # bf16 where the device computes it natively
    g = loss_grad_after_blocks(model, block_names, inputs.pop().float(), ids, cap.output_len, dtype=tail_dtype)[0]
    g.mul_(share)  # the chunk's part of the mean loss over all samples
    if source.streamed:
        source.release_outside(model, block_names)
    for block in tqdm(list(reversed(block_names)), desc="AutoScheme backward"):
        x = inputs.pop()
        with _placed(model, block, units, devmap, source, amp, cap.kwargs) as (blk, mods, kw):
            taps = _LayerTaps(mods, act_options)
            taps.amax.update({k: v for k, v in amax.items() if k in mods})
            taps.backward = True
            absgrad = {name: torch.zeros_like(get_weight(m), dtype=torch.float32) for name, m in mods.items()}
            for m in mods.values():
                m.weight.requires_grad_(True)
            g_in = []
            try:
                for i in range(0, x.shape[0], bs):
                    xb = x[i : i + bs].to(device, torch.float32).requires_grad_(True)
                    with torch.enable_grad(), autocast():
                        out = block_forward(blk, xb, kw, slice(i, i + bs))
                    torch.autograd.backward(out.float(), g[i : i + bs].to(device))
                    g_in.append(xb.grad.float().to(g.device))
                    for name, m in mods.items():
                        if m.weight.grad is not None:  # None: an expert no token of this batch was routed to
                            absgrad[name].add_(_weight_grad(m).abs())
                        m.weight.grad = None
            finally:
                taps.close()
                for m in mods.values():
                    m.weight.requires_grad_(False)
            g = torch.cat(g_in)
            with torch.no_grad():
                for grp, members in units.get(block, []):
                    for name in members:
                        w = get_weight(mods[name]).detach().float()
                        done: list[tuple[QuantSpec, float]] = []  # GGUF options often give a layer one type
                        for o, spec in enumerate(layer_specs[name]):
                            err = next((e for s, e in done if s == spec), None)
                            if err is None:
                                err = _weight_error(w, spec, sq.get(name), absgrad[name])
                                done.append((spec, err))
                            scores[grp, o] += err + taps.act.get((name, o), 0.0)
            del absgrad


def _weight_error(w: torch.Tensor, spec: QuantSpec, sq: torch.Tensor | None, absgrad: torch.Tensor) -> float:
    """``sum |dL/dW| * |Q(W) - W|`` with ``Q`` optimized RTN under ``spec`` (0 for floating point)."""
    if not spec.quantized:
        return 0.0
    clip_grid, refit_grid = opt_rtn_grids(spec, CLIP_GRID)
    mn, mx = search_clip(w, spec, sq, clip_grid, refit_grid=refit_grid)
    wq, _ = qdq(w, spec, min_scale=mn, max_scale=mx)
    return float((wq - w).abs_().mul_(absgrad).sum())


def _weight_grad(m: nn.Module) -> torch.Tensor:
    """The weight's gradient in ``[out, in]`` layout, float32."""
    gw = m.weight.grad.float()
    return gw.t() if isinstance(m, Conv1D) else gw


@contextlib.contextmanager
def _placed(model, block, units, devmap, source, amp, kwargs):
    """The block loaded and on the device (float32, its scored layers in their dtype under autocast)."""
    source.materialize(model, block)
    blk = get_module(model, block)
    p = next(blk.parameters())
    orig_device, orig_dtype = p.device, p.dtype
    mods = {n: get_module(model, n) for _, members in units.get(block, []) for n in members}
    hooks = place_block(blk, devmap, torch.float32, tuple(mods.values()) if amp is not None else ())
    for q in blk.parameters():  # gradients are wanted for the scored weights alone
        q.requires_grad_(False)
    kw = cast_kwargs(kwargs[block], devmap.primary, torch.float32)
    try:
        yield blk, mods, kw
    finally:
        for h in hooks:
            h.remove()
        blk.to(device=orig_device, dtype=orig_dtype)
        if source.streamed:
            source.release(model, block)
        release_memory(freeze=True)  # the block's float32 copy, activations and gradients go back to the OS
