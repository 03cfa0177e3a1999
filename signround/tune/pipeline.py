"""The block loop: quantize blocks in order, then layers outside blocks (lm_head).

For each block: fp targets = block(fp inputs); quantize its layers (RTN, optimized RTN or
SignRound on quantized inputs); the tuned block's outputs on quantized inputs feed the next block
(the quantized chain), the fp outputs are the next block's fp inputs.

The loop asks its :class:`~signround.model.source.WeightSource` for each block's tensors and gives
them back when the block is done, hands the finished block to a sink (the exporters, which write
its packed tensors at once), and records after each block what a resumed run needs. A small probe
batch rides along the quantized chain so the saved files can be checked against what was tuned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..devices import DeviceMap, cpu_has_native_bf16
from ..errors import ConfigError
from ..memory import drop_file_pages, gc_frozen_scope, release_memory
from ..model import kvcache
from ..model.capture import (block_forward, capture_block_inputs, cast_kwargs, float32_hidden, inputs_after_blocks,
                             run_to_first_block)
from ..model.layers import QUANTIZABLE_TYPES, Conv1D, get_module, get_weight
from ..model.moe import RoutedTokens, set_calibrate_all
from ..model.source import InMemorySource, WeightSource
from ..plan import QuantPlan, untie_output_embedding
from ..qdq import QParams
from .config import TuneConfig
from .estimate import log_estimate, time_sample_forward
from .placement import place_block
from .rtn import CLIP_GRID, COARSE_CLIP_GRID, REFIT_GRID, opt_rtn_grids, opt_rtn_layer, rtn_layer, search_clip
from .signround import UnitResult, tune_unit

logger = logging.getLogger(__name__)


@dataclass
class QuantResult:
    """What export needs: QParams of quantized layers, plus per-unit statistics."""

    qparams: dict[str, QParams] = field(default_factory=dict)
    block_stats: dict[str, dict] = field(default_factory=dict)
    # layers whose in-memory weight was released after tuning (meta now), and its device
    released: dict[str, torch.device] = field(default_factory=dict)
    # the quantized model's logits on the probe batch: "exact" (the tuned qdq values) and, when asked,
    # "stored" (weights rounded to the model's dtype, as the fake format keeps them)
    probe_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    cache_bytes: int = 0  # the activation cache (both chains and a block's outputs)
    resumed_from: int = 0  # blocks already done by an interrupted run


class BlockSink(Protocol):
    """Receives each finished block (its tuned weights still in place) with its layers' QParams."""

    def block(self, model: nn.Module, block_name: str, qparams: dict[str, QParams]) -> None: ...


@dataclass
class ResumePoint:
    blocks_done: int
    x_fp: torch.Tensor | None
    x_q: torch.Tensor | None
    probes: dict[str, torch.Tensor]
    generator_state: torch.Tensor
    block_stats: dict[str, dict]


class Checkpointer(Protocol):
    def resume_point(self) -> ResumePoint | None: ...

    def save(self, point: ResumePoint) -> None: ...


def release_weights(model: nn.Module, names: list[str], result: QuantResult) -> None:
    """Replace the tuned weights of ``names`` by meta tensors: export reads those layers from their
    QParams alone, and keeping a model-sized copy of weights nobody reads until the run ends is what
    made peak RSS grow block after block (upstream packs each block as it goes, to the same end)."""
    for name in names:
        module = get_module(model, name)
        w = module.weight
        result.released[name] = w.device
        module.weight = nn.Parameter(torch.empty_like(w, device="meta"), requires_grad=w.requires_grad)


def restore_weights(model: nn.Module, result: QuantResult, names: list[str] | None = None) -> None:
    """Put released weights back, dequantized from their QParams: the values a loader reads from
    the saved file (the baked qdq weights up to float rounding order)."""
    for name in list(result.released) if names is None else names:
        device = result.released.pop(name, None)
        module = get_module(model, name)
        meta = module.weight
        w = result.qparams[name].dequantize(meta.dtype)
        w = (w.t() if isinstance(module, Conv1D) else w).contiguous()  # Conv1D keeps [in, out]
        module.weight = nn.Parameter(w.to(device or "cpu"), requires_grad=meta.requires_grad)


def _batched(fn: Callable[[torch.Tensor, slice], torch.Tensor], x: torch.Tensor, bs: int, device, store) -> torch.Tensor:
    """``fn(batch, its samples)`` over ``x`` in batches, computed in float32, stored like ``x`` (the cache dtype)."""
    with torch.no_grad():
        return torch.cat([fn(x[i : i + bs].to(device, torch.float32), slice(i, i + bs)).to(store, x.dtype)
                          for i in range(0, x.shape[0], bs)])


def amp_dtype(device: torch.device, cfg: TuneConfig) -> torch.dtype | None:
    """The autocast dtype tuning runs its block forward/backward in (None: fp32): bf16 where the
    device computes it natively (upstream's rule too: on CPUs it checks CPUID for AVX512-BF16).
    The tuned parameters, the loss and the cached activations stay fp32."""
    if not cfg.amp:
        return None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


CACHE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}


def cache_dtype(cfg: TuneConfig, device: torch.device) -> torch.dtype:
    """The dtype of the cached activations (``--cache_dtype``): "auto" is bf16 where the device
    computes it natively, fp16 on other GPUs, fp32 on CPUs without native bf16 (a half-precision
    cache there costs conversions on every step). Losses are computed in float32 either way."""
    if cfg.cache_dtype != "auto":
        return CACHE_DTYPES[cfg.cache_dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def _autocast(device: torch.device, cfg: TuneConfig):
    dtype = amp_dtype(device, cfg)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@contextlib.contextmanager
def flush_denormals():
    """Treat subnormal floats (below 1.2e-38) as zero on the CPU while tuning: they turn up in the
    block's gradients and x86 computes them on a slow path. On a SmolLM2-135M block (W2 and W4,
    50 iters, alternating runs) every loss came out identical and three of four pairs ran 10-18%
    faster (the fourth 2%); whole runs vary more than that between occasions on this machine."""
    changed = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if changed:
            torch.set_flush_denormal(False)


@torch.no_grad()
def quantize_ggml_extras(model: nn.Module, plan: QuantPlan, result: QuantResult) -> None:
    """The token embedding / output tensors a GGUF file type quantizes (llama.cpp's mix), with
    a clipping search (no activations reach an embedding table); a tied pair is one tensor."""
    for name, spec in plan.ggml_extras.items():
        result.qparams[name] = opt_rtn_layer(get_module(model, name), spec, None, COARSE_CLIP_GRID)


@torch.no_grad()
def round_nontext(model: nn.Module, plan: QuantPlan, blocks: list[str], calib_ids: torch.Tensor | None,
                  calib_extras: list[dict[str, Any]] | None, cfg: TuneConfig, result: QuantResult) -> None:
    """A VLM's vision tower and projector layers (``--quant_nontext_module``). With image-text data and
    optimized rounding, each layer's clipping is searched weighting every input channel by its energy
    on the calibration images (what optimized RTN does for the language model's layers; the forward
    runs up to the first text block, where the images have gone through the tower); otherwise RTN."""
    energy: dict[str, torch.Tensor] = {}
    images = [i for i, e in enumerate(calib_extras or []) if e]  # text samples never reach the tower
    if plan.nontext and images and cfg.mode != "rtn":
        handles = []
        for name in plan.nontext:
            def hook(_m, args, name=name):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                energy[name] = energy.get(name, 0) + (x * x).sum(0).cpu()
            handles.append(get_module(model, name).register_forward_pre_hook(hook))
        try:
            run_to_first_block(model, blocks, calib_ids[images], 1, "cpu", [calib_extras[i] for i in images])
        finally:
            for h in handles:
                h.remove()
    for name in plan.nontext:
        module, spec = get_module(model, name), plan.specs[name]
        result.qparams[name] = opt_rtn_layer(module, spec, energy[name]) if name in energy else rtn_layer(module, spec)
    if energy:
        logger.info("vision tower: %d layers rounded with clipping searched on the calibration images", len(energy))


@torch.no_grad()
def head_logits(head: nn.Module, x: torch.Tensor, rows: int = 8192) -> torch.Tensor:
    """float32 logits of ``head`` on its inputs ``x``; a Linear head is applied in float32 a slice
    of the vocabulary at a time (no float32 copy of a large head)."""
    x = x.float()
    if isinstance(head, nn.Linear) and not head.weight.is_meta:
        w, b = head.weight, head.bias
        parts = [F.linear(x, w[i : i + rows].float(), None if b is None else b[i : i + rows].float())
                 for i in range(0, w.shape[0], rows)]
        return torch.cat(parts, dim=-1)
    p = next(head.parameters(), None)
    return head(x.to(p.dtype) if p is not None and p.is_floating_point() else x).float()


def probe_ids_for(model: nn.Module, n: int = 2, length: int = 32, seed: int = 0) -> torch.Tensor:
    """Token ids of the self-check probe: seeded and independent of the tokenizer."""
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


@flush_denormals()
@gc_frozen_scope()
def quantize_model(
    model: nn.Module,
    plan: QuantPlan,
    cfg: TuneConfig,
    calib_ids: torch.Tensor | None = None,
    device: torch.device | str | DeviceMap | None = None,
    source: WeightSource | None = None,
    sink: BlockSink | None = None,
    keep_weights: bool = True,
    probe_ids: torch.Tensor | None = None,
    checkpoint: Checkpointer | None = None,
    probe_stored: bool = False,
    show_progress: bool = True,
    calib_extras: list[dict[str, Any]] | None = None,
) -> QuantResult:
    """Quantize every block in order, then the layers outside blocks (lm_head).

    ``calib_ids`` None: plain RTN, no calibration passes. ``sink`` gets each block as soon as it is
    done; with a sink, block QParams are not kept (they are in the sink's files). ``keep_weights``
    False (in-memory models): tuned weights are released after the sink took them, restored from
    QParams by :func:`restore_weights`. ``probe_ids``: a small batch carried through the quantized
    chain; its logits (``result.probe_logits``) are the reference for checking saved files
    (``probe_stored``: also with the weights rounded to the model's dtype, what ``fake`` stores).
    ``checkpoint``: resume state, read before the loop and written after each block.
    ``calib_extras``: each calibration sample's model inputs besides its ids (image-text data).
    """
    source = source or InMemorySource()
    devmap = device if isinstance(device, DeviceMap) else DeviceMap((torch.device(device or (
        "cuda" if torch.cuda.is_available() else "cpu")),))
    device = devmap.primary
    store = torch.device("cpu") if cfg.low_gpu_mem_usage or device.type == "cpu" else device
    cache = cache_dtype(cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    result = QuantResult()
    blocks = plan.block_names
    keep_qparams = sink is None or not source.streamed
    release = not keep_weights and not source.streamed and not plan.outside_blocks()
    calibrated = calib_ids is not None
    bs = min(cfg.batch_size, calib_ids.shape[0]) if calibrated else 1
    if calibrated and amp_dtype(device, cfg) is not None:
        logger.info("tuning the block forward/backward in bf16 autocast on %s (--disable_amp: fp32)", device.type)

    source.materialize_outside(model, blocks)
    untie_output_embedding(model, plan)
    if plan.static_attention:
        if not calibrated:
            raise ConfigError("static FP8 attention / KV-cache scales are measured on calibration data; "
                              "pass calibration ids")
        kvcache.route(model)
    source.materialize(model, blocks[0])
    point = checkpoint.resume_point() if checkpoint is not None else None
    x_fp = x_q = None
    block_kwargs: dict[str, dict[str, Any]] = {}
    out_len = None
    if calibrated:
        # a resumed run has the chains on disk; the per-block arguments come from one sample (from
        # every one when they differ between samples: image-text data)
        cap = capture_block_inputs(model, blocks, calib_ids[:1] if point and calib_extras is None else calib_ids, bs,
                                   store, extras=calib_extras, hidden=not point)
        x_fp = x_q = cap.hidden.to(cache)
        block_kwargs, out_len = cap.kwargs, cap.output_len
        # inputs and targets of both chains, and a block's outputs, held at once
        chain = point.x_fp if point is not None else x_fp
        result.cache_bytes = 3 * chain.numel() * chain.element_size()
        logger.info("activation cache: %.1f MB in %s on %s (--cache_dtype)", result.cache_bytes / 1e6,
                    str(cache).replace("torch.", ""), store.type)
        if not source.streamed:
            # a capture that fell back to a full single-sample forward read the whole memory-mapped
            # checkpoint in; let its unmodified pages go until each block's turn (SmolLM2-135M
            # W2G64, 5 iters: peak RSS 1115 -> 953 MiB)
            drop_file_pages([p.data for p in model.parameters() if not p.is_meta], still_used=set(), live=True)
    quantize_ggml_extras(model, plan, result)  # weights only; the probe sees them as the file stores them
    probes: dict[str, torch.Tensor] = {}  # "exact": tuned qdq values; "stored": rounded to the model's dtype
    probe_kwargs: dict[str, Any] = {}
    if probe_ids is not None:
        if not calibrated:  # the blocks' output structure, from block 0 on one probe sample
            out_len = capture_block_inputs(model, blocks, probe_ids[:1], 1, "cpu").output_len
        with float32_hidden(model):  # the reference in float32 end to end (rotary tables, masks, norms)
            pcap = capture_block_inputs(model, blocks, probe_ids, probe_ids.shape[0], "cpu", output_len=out_len)
        probe_kwargs = pcap.kwargs
        probes["exact"] = pcap.hidden
        if probe_stored and next(p.dtype for p in model.parameters() if p.is_floating_point()) != torch.float32:
            probes["stored"] = pcap.hidden.clone()
    # the embeddings and head are needed again only after the last block: a streamed run without
    # layers outside the blocks to quantize lets them go meanwhile (re-read from the checkpoint then)
    park_outside = source.streamed and not plan.ggml_extras and not plan.outside_blocks() and not plan.untie_lm_head
    if park_outside:
        source.release_outside(model, blocks)
    start = 0
    if point is not None:
        start = point.blocks_done
        x_fp, x_q = point.x_fp, point.x_q
        probes.update({k: v for k, v in point.probes.items() if k in probes})
        gen.set_state(point.generator_state)
        result.block_stats.update(point.block_stats)
        result.resumed_from = start
        logger.info("resuming after block %d of %d (%s)", start, len(blocks), blocks[start - 1] if start else "-")

    bar = tqdm(blocks, desc=f"{cfg.mode} blocks", disable=not show_progress, initial=start, total=len(blocks))
    # --nblocks N: N consecutive blocks are tuned as one unit (their layers together, the loss on the
    # last one's output); a resumed run starts at a group boundary (resume refuses another N)
    step = cfg.nblocks if calibrated else 1
    for index in range(start, len(blocks), step):
        group = blocks[index:index + step]
        t0 = time.time()
        blks, old_weights, origs = [], [], []
        for block_name in group:
            source.materialize(model, block_name)
            blk = get_module(model, block_name)
            blks.append(blk)
            # in-memory weights of a memory-mapped checkpoint: their file pages are dropped after the block
            old_weights += [] if source.streamed else [p.data for p in blk.parameters()]
            orig_param = next(blk.parameters())
            origs.append((orig_param.device, orig_param.dtype))
        # the unit tuned: the block itself, or the group with its layers named "<i>.<name in block i>"
        unit = blks[0] if len(blks) == 1 else BlockGroup(blks)
        unit_names: dict[str, str] = {}
        for i, b in enumerate(group):
            for n in plan.layers_of(b):
                rel = n[len(b) + 1:]
                unit_names[rel if len(blks) == 1 else f"{i}.{rel}"] = n
        qparams: dict[str, QParams] = {}
        stats: dict[str, Any] = {}
        hooks: list = []
        routed = None
        if calibrated:
            # under autocast the layers to quantize keep the checkpoint's dtype: their matmuls run
            # in it anyway and qdq upcasts exactly, so a float32 copy of the block is not needed
            keep = tuple(get_module(model, n) for n in unit_names.values()) if amp_dtype(device, cfg) is not None else ()
            for blk in blks:
                hooks += place_block(blk, devmap, torch.float32, keep)
                set_calibrate_all(blk, cfg.calibrate_all_experts)
            kws = [cast_kwargs(block_kwargs[b], device, torch.float32) for b in group]

            def run(u: nn.Module, xb: torch.Tensor, idx: slice | torch.Tensor, kws=kws) -> torch.Tensor:
                with _autocast(device, cfg):
                    for blk_i, kw_i in zip(u if isinstance(u, BlockGroup) else (u,), kws):
                        xb = block_forward(blk_i, xb, kw_i, idx)
                    return xb

            if index == start:
                sample_s = time_sample_forward(lambda xb: run(unit, xb, slice(0, 1)), x_fp, device) / len(blks)
                log_estimate(cfg, sample_s, x_fp.shape[0], len(blocks) - start, device)
            with RoutedTokens(unit) as routed:  # MoE: the tokens each expert is tuned on
                y_fp = _batched(lambda xb, sl: run(unit, xb, sl), x_fp, bs, device, store)
            if unit_names:
                layers = {rel: (get_module(model, n), plan.specs[n]) for rel, n in unit_names.items()}
                bar_step = _live_loss(bar, cfg)
                frozen = routed.layers_below(cfg.min_expert_tokens, layers)
                res = _quantize_unit(unit, layers, run, x_q, lambda idx, xb: y_fp[idx].to(device), cfg, device, bs,
                                     gen, keep_outputs=cfg.enable_quanted_input, on_step=bar_step, frozen=frozen)
                qparams = {unit_names[rel]: qp for rel, qp in res.qparams.items()}
                stats = res.stats.as_dict()
            if plan.static_attention:  # FP8 attention scales of the tuned blocks, on their quantized inputs
                attn = [m for b in group for _, m in kvcache.attention_modules(model, b)]
                kvcache.observe(attn, plan.static_attention)
                with torch.no_grad():
                    _batched(lambda xb, sl: run(unit, xb, sl), x_q, bs, device, store)
                kvcache.freeze(attn)
            if not cfg.enable_quanted_input:
                x_q = y_fp
            elif unit_names:
                x_q = res.outputs.to(store, cache)  # the tuned unit's outputs, from its final loss pass
            else:
                x_q = _batched(lambda xb, sl: run(unit, xb, sl), x_q, bs, device, store)
            x_fp = y_fp
            for blk in blks:
                set_calibrate_all(blk, False)
        else:
            hooks = place_block(blks[0], devmap, origs[0][1])  # on the tuning device, in its own dtype
            with torch.no_grad():
                qparams = {n: rtn_layer(get_module(model, n), plan.specs[n]) for n in unit_names.values()}
        for blk, block_name, (_, own_dtype) in zip(blks, group, origs):
            prefix = block_name + "."
            names = plan.layers_of(block_name)
            for kind in list(probes):
                # "exact": each quantized layer's weight dequantized from its QParams (what the packed
                # formats hold); "stored": the weights as the model's dtype keeps them (fake)
                exact = {n[len(prefix):]: qparams[n] for n in names} if kind == "exact" else {}
                if kind == "stored" and calibrated:
                    blk.to(dtype=own_dtype)  # the tuned block is float32; round as the saved weights are
                probes[kind] = _probe_forward(blk, probes[kind], probe_kwargs[block_name], device, exact)
        for h in hooks:
            h.remove()
        hooks = []
        for blk, (orig_device, orig_dtype) in zip(blks, origs):
            blk.to(device=orig_device, dtype=orig_dtype)
        if plan.static_attention and calibrated:  # the FP8 scales stay float32, in memory and in the files
            kvcache.keep_float32([m for b in group for _, m in kvcache.attention_modules(model, b)])
        if calibrated and routed.counts:
            stats["expert_tokens"] = dict(routed.counts)
            few = routed.starved(cfg.min_expert_tokens)
            if few and cfg.mode == "signround":
                stats["experts_kept_at_start"] = few
                logger.info("%s: %d of %d experts were routed fewer than %d calibration tokens: kept at optimized RTN "
                            "(--min_expert_tokens; more --nsamples routes more)", ", ".join(group), few,
                            sum(len(c) for c in routed.counts.values()), cfg.min_expert_tokens)
        if unit_names:
            stats["seconds"] = round(time.time() - t0, 3)
            if len(group) > 1:
                stats["tuned_with"] = list(group)
            for block_name in group:
                if plan.layers_of(block_name):
                    result.block_stats[block_name] = stats
            if "loss_final" in stats:  # None: not finite (logged by the tuning loop)
                bar.set_postfix_str("loss " + " -> ".join("nan" if stats[k] is None else f"{stats[k]:.3g}"
                                                          for k in ("loss_rtn", "loss_final")))
            logger.debug("%s: %s", ", ".join(group), stats)
        for block_name in group:
            block_q = {n: qparams[n] for n in plan.layers_of(block_name)}
            if sink is not None:
                sink.block(model, block_name, block_q)
            if keep_qparams:
                result.qparams.update(block_q)
            if source.streamed:
                source.release(model, block_name)
            elif release and block_q:
                release_weights(model, list(block_q), result)
        del qparams
        if not source.streamed:
            in_use = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers()) if not t.is_meta}
            drop_file_pages(old_weights, in_use)
        del old_weights
        if checkpoint is not None:
            checkpoint.save(ResumePoint(index + len(group), x_fp, x_q, dict(probes), gen.get_state(),
                                        dict(result.block_stats)))
        bar.update(len(group))
        release_memory(freeze=True)  # what survives a block (model, caches) lives to the end
    bar.close()

    if park_outside:
        source.materialize_outside(model, blocks)
    round_nontext(model, plan, blocks, calib_ids, calib_extras, cfg, result)
    for name in plan.outside_blocks():
        t0 = time.time()
        if name in plan.nontext:
            continue
        if not calibrated:
            with torch.no_grad():
                result.qparams[name] = rtn_layer(get_module(model, name), plan.specs[name])
            continue
        res = _quantize_outside_layer(model, name, plan, cfg, calib_ids, x_q, out_len, device, store, bs, gen)
        result.qparams[name] = res.qparams[""]
        stats = res.stats.as_dict()
        stats["seconds"] = round(time.time() - t0, 3)
        result.block_stats[name] = stats
    head = model.get_output_embeddings()
    for kind, h in probes.items():
        with float32_hidden(model):
            x = inputs_after_blocks(model, blocks, h, probe_ids, head, out_len, probe_ids.shape[0])
        result.probe_logits[kind] = head_logits(head, x)
    return result


class BlockGroup(nn.ModuleList):
    """Consecutive blocks tuned together (``--nblocks``); ``run`` chains their forwards."""


def _live_loss(bar, cfg: TuneConfig) -> Callable[[int, float], None] | None:
    """Show the current block's minibatch loss on the progress bar while it tunes."""
    if cfg.mode != "signround" or bar.disable:
        return None
    every = max(1, cfg.iters // 10)

    def step(it: int, loss: float) -> None:
        if it % every == 0:
            bar.set_postfix_str(f"iter {it}/{cfg.iters} loss {loss:.3g}")

    return step


# the forwards _probe_forward replaces by a float32 F.linear (a subclass's own forward is kept)
_PLAIN_FORWARDS = (nn.Linear.forward, Conv1D.forward)


@torch.no_grad()
def _probe_forward(blk: nn.Module, h: torch.Tensor, kwargs: dict[str, Any], device: torch.device,
                   exact: dict[str, QParams]) -> torch.Tensor:
    """The probe through a finished block in float32 without autocast: the self-check's reference.

    The block stays in its dtype: each Linear computes from a float32 weight made when it is
    called (dequantized from ``exact`` QParams where given, else its own weight upcast), and the
    other parameters (norms) are upcast for the call, so only one layer's float32 weight exists
    at a time."""
    restore: list[tuple[nn.Module, str, torch.Tensor]] = []
    for rel, mod in blk.named_modules():
        qp = exact.get(rel)
        if type(mod).forward in _PLAIN_FORWARDS:
            def fwd(x, mod=mod, qp=qp):
                w = qp.dequantize(torch.float32).to(x.device) if qp is not None else get_weight(mod).float()
                return F.linear(x.float(), w, None if mod.bias is None else mod.bias.float())

            mod.forward = fwd
            restore.append((mod, "forward", None))
        else:  # norms, and Linear subclasses with a forward of their own (Llama 4's router returns a tuple)
            for leaf, p in list(mod._parameters.items()):
                if p is not None and p.is_floating_point() and (p.dtype != torch.float32 or qp is not None):
                    restore.append((mod, leaf, p))
                    new = p.detach().float()
                    if leaf == "weight" and qp is not None:
                        w = qp.dequantize(torch.float32).to(p.device)
                        new = w.t() if isinstance(mod, Conv1D) else w
                    mod._parameters[leaf] = nn.Parameter(new, requires_grad=False)
    try:
        return block_forward(blk, h.to(device), cast_kwargs(kwargs, device, torch.float32)).float().cpu()
    finally:
        for mod, leaf, p in restore:
            if leaf == "forward":
                del mod.forward
            else:
                mod._parameters[leaf] = p


def _quantize_unit(unit, layers, run, x_q, target, cfg: TuneConfig, device, bs, gen, keep_outputs=False,
                   on_step=None, frozen: frozenset[str] = frozenset()) -> UnitResult:
    """One unit (block or single layer): optimized-RTN start, then SignRound when iters > 0."""
    def grids(spec) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(clipping candidates, refit candidates)."""
        if cfg.mode == "signround" and spec.data_type.startswith("int") and spec.ggml_type is None:
            # SignRound tunes the clipping further and integer types get a least-squares refit, so
            # their start needs only a coarse search; FP element grids get neither: the fine one.
            # GGUF types start from exactly the optimized-RTN file: their small steps stay close to
            # the start (SmolLM2 Q2_K_S WikiText-2: coarse start 31.74, optimized RTN 30.92)
            return COARSE_CLIP_GRID, REFIT_GRID
        return opt_rtn_grids(spec, CLIP_GRID)

    # compiled error kernels pay off when tuning follows (compile is on then, and the same shapes recur)
    compiled_search = cfg.mode == "signround" and cfg.enable_torch_compile

    def search(w: torch.Tensor, spec, importance: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        clip_grid, refit_grid = grids(spec)
        return search_clip(w, spec, importance, clip_grid, compile=compiled_search, refit_grid=refit_grid)

    def init(importance: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {rel: search(get_weight(m).detach().to(device).float(), spec, importance.get(rel))
                for rel, (m, spec) in layers.items()}

    iters_cfg = cfg if cfg.mode == "signround" else _zero_iters(cfg)
    # plain RTN reaches here only for static activation ranges: no clipping search
    return tune_unit(unit, layers, x_q, target, run, iters_cfg, device, None if cfg.mode == "rtn" else init, gen,
                     keep_outputs, on_step, amp_dtype(device, cfg), frozen)


def _zero_iters(cfg: TuneConfig) -> TuneConfig:
    return dataclasses.replace(cfg, iters=0)


def _quantize_outside_layer(model, name, plan, cfg, calib_ids, x_last, out_len, device, store, bs, gen):
    """lm_head and other layers outside blocks: their inputs come from the quantized chain's last
    outputs through the model's own tail (final norm), then the layer is tuned like a block."""
    mod = get_module(model, name)
    x = inputs_after_blocks(model, plan.block_names, x_last, calib_ids, mod, out_len, bs, store)
    orig_device, orig_dtype = mod.weight.device, mod.weight.dtype
    mod.to(device=device, dtype=torch.float32)
    w_fp = get_weight(mod).detach().clone()
    b_fp = None if mod.bias is None else mod.bias.detach().clone()

    def run(unit, xb, _idx):
        with _autocast(device, cfg):
            return unit(xb)

    def target(idx, xb):
        return F.linear(xb, w_fp, b_fp)

    try:
        return _quantize_unit(mod, {"": (mod, plan.specs[name])}, run, x, target, cfg, device, bs, gen)
    finally:
        mod.to(device=orig_device, dtype=orig_dtype)
