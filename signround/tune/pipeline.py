"""The block loop: quantize blocks in order, then layers outside blocks (lm_head).

For each block: fp targets = block(fp inputs); quantize its layers (RTN, optimized RTN or
SignRound on quantized inputs); the tuned block's outputs on quantized inputs feed the next block
(the quantized chain), the fp outputs are the next block's fp inputs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..model.capture import _StopForward, block_forward, capture_block_inputs, cast_kwargs
from ..model.layers import Conv1D, get_module, get_weight
from ..plan import QuantPlan, untie_output_embedding
from ..memory import drop_file_pages, gc_frozen_scope, release_memory
from ..qdq import QParams
from .config import TuneConfig
from .rtn import CLIP_GRID, COARSE_CLIP_GRID, REFIT_GRID, opt_rtn_grids, rtn_layer, search_clip
from .signround import UnitResult, tune_unit

logger = logging.getLogger(__name__)


@dataclass
class QuantResult:
    """What export needs: QParams of every quantized layer, plus per-unit statistics."""

    qparams: dict[str, QParams] = field(default_factory=dict)
    block_stats: dict[str, dict] = field(default_factory=dict)
    # layers whose in-memory weight was released after tuning (meta now), and its device
    released: dict[str, torch.device] = field(default_factory=dict)


def release_weights(model: nn.Module, names: list[str], result: QuantResult) -> None:
    """Replace the tuned weights of ``names`` by meta tensors: export reads those layers from their
    QParams alone, and keeping a model-sized copy of weights nobody reads until the run ends is what
    made peak RSS grow block after block (upstream packs each block as it goes, to the same end)."""
    for name in names:
        module = get_module(model, name)
        w = module.weight
        result.released[name] = w.device
        module.weight = nn.Parameter(torch.empty_like(w, device="meta"), requires_grad=w.requires_grad)


def restore_weights(model: nn.Module, result: QuantResult) -> None:
    """Put released weights back, dequantized from their QParams: the values a loader reads from
    the saved file (the baked qdq weights up to float rounding order)."""
    for name, device in list(result.released.items()):
        module = get_module(model, name)
        meta = module.weight
        w = result.qparams[name].dequantize(meta.dtype)
        w = (w.t() if isinstance(module, Conv1D) else w).contiguous()  # Conv1D keeps [in, out]
        module.weight = nn.Parameter(w.to(device), requires_grad=meta.requires_grad)
        del result.released[name]


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, bs: int, device, store) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[i : i + bs].to(device)).to(store, torch.float32) for i in range(0, x.shape[0], bs)])


@functools.cache  # asked on every block forward; the CPU does not change
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run at about twice the fp32 rate. Without them torch
    converts to fp32 and back around every op, which is slower than fp32 throughout."""
    cpu = getattr(torch, "cpu", None)
    checks = (getattr(cpu, "_is_avx512_bf16_supported", None), getattr(cpu, "_is_amx_tile_supported", None))
    return any(bool(f()) for f in checks if f is not None)


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


def _autocast(device: torch.device, cfg: TuneConfig):
    dtype = amp_dtype(device, cfg)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def quantize_rtn(model: nn.Module, plan: QuantPlan, show_progress: bool = True) -> QuantResult:
    """Plain round-to-nearest over all blocks, block by block, on whatever device the weights are."""
    untie_output_embedding(model, plan)
    result = QuantResult()
    for block in tqdm(plan.block_names, desc="quantizing blocks", disable=not show_progress):
        for name in plan.layers_of(block):
            result.qparams[name] = rtn_layer(get_module(model, name), plan.specs[name])
    for name in plan.outside_blocks():
        result.qparams[name] = rtn_layer(get_module(model, name), plan.specs[name])
    quantize_ggml_extras(model, plan, result)
    return result


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
        module = get_module(model, name)
        clip_grid, refit_grid = opt_rtn_grids(spec, COARSE_CLIP_GRID)
        mn, mx = search_clip(get_weight(module).detach(), spec, None, clip_grid, refit_grid=refit_grid)
        result.qparams[name] = rtn_layer(module, spec, mn, mx)


@flush_denormals()
@gc_frozen_scope()
def quantize_calibrated(
    model: nn.Module,
    plan: QuantPlan,
    cfg: TuneConfig,
    calib_ids: torch.Tensor,
    device: torch.device | str | None = None,
    show_progress: bool = True,
    keep_weights: bool = True,
) -> QuantResult:
    """Optimized RTN (iters=0) or SignRound over all blocks, then the layers outside blocks.

    ``keep_weights=False``: release each tuned block's quantized weights (see :func:`release_weights`)
    when nothing later runs the whole model (no layers outside blocks to tune); :func:`restore_weights`
    brings them back.
    """
    untie_output_embedding(model, plan)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    store = torch.device("cpu") if cfg.low_gpu_mem_usage or device.type == "cpu" else device
    gen = torch.Generator().manual_seed(cfg.seed)
    bs = min(cfg.batch_size, calib_ids.shape[0])
    result = QuantResult()
    release = not keep_weights and not plan.outside_blocks()
    if amp_dtype(device, cfg) is not None:
        logger.info("tuning the block forward/backward in bf16 autocast on %s (--disable_amp: fp32)", device.type)

    x_fp, block_kwargs = capture_block_inputs(model, plan.block_names, calib_ids, bs, store)
    # a capture that fell back to a full single-sample forward read the whole memory-mapped
    # checkpoint in; let its unmodified pages go until each block's turn (SmolLM2-135M W2G64, 5 iters:
    # peak RSS 1115 -> 953 MiB)
    drop_file_pages([p.data for p in model.parameters()], still_used=set(), live=True)
    x_q = x_fp
    bar = tqdm(plan.block_names, desc=f"{cfg.mode} blocks", disable=not show_progress)
    for block_name in bar:
        t0 = time.time()
        blk = get_module(model, block_name)
        orig_param = next(blk.parameters())
        orig_device, orig_dtype = orig_param.device, orig_param.dtype
        old_weights = [p.data for p in blk.parameters()]
        blk.to(device=device, dtype=torch.float32)
        kw = cast_kwargs(block_kwargs[block_name], device, torch.float32)

        def run(unit: nn.Module, xb: torch.Tensor, kw=kw) -> torch.Tensor:
            with _autocast(device, cfg):
                return block_forward(unit, xb, kw)

        y_fp = _batched(lambda xb: run(blk, xb), x_fp, bs, device, store)
        names = plan.layers_of(block_name)
        if names:
            prefix = block_name + "."
            layers = {n[len(prefix):]: (get_module(model, n), plan.specs[n]) for n in names}
            res = _quantize_unit(blk, layers, run, x_q, lambda idx, xb: y_fp[idx].to(device), cfg, device, bs, gen,
                                 keep_outputs=cfg.enable_quanted_input)
            result.qparams.update({prefix + rel: qp for rel, qp in res.qparams.items()})
            stats = res.stats.as_dict()
            stats["seconds"] = round(time.time() - t0, 3)
            result.block_stats[block_name] = stats
            bar.set_postfix_str(f"loss {stats['loss_rtn']:.3g} -> {stats['loss_final']:.3g}")
            logger.debug("%s: %s", block_name, stats)
        if not cfg.enable_quanted_input:
            x_q = y_fp
        elif names:
            x_q = res.outputs.to(store)  # the tuned block's outputs, from its final loss pass
        else:
            x_q = _batched(lambda xb: run(blk, xb), x_q, bs, device, store)
        x_fp = y_fp
        blk.to(device=orig_device, dtype=orig_dtype)
        if release and names:
            release_weights(model, names, result)
        in_use = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        drop_file_pages(old_weights, in_use)
        del old_weights
        release_memory(freeze=True)  # what survives a block (model, caches) lives to the end

    for name in plan.outside_blocks():
        t0 = time.time()
        res = _quantize_outside_layer(model, name, plan, cfg, calib_ids, device, store, bs, gen)
        result.qparams[name] = res.qparams[""]
        stats = res.stats.as_dict()
        stats["seconds"] = round(time.time() - t0, 3)
        result.block_stats[name] = stats
    quantize_ggml_extras(model, plan, result)
    return result


def _quantize_unit(unit, layers, run, x_q, target, cfg: TuneConfig, device, bs, gen, keep_outputs=False) -> UnitResult:
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
                     keep_outputs)


def _zero_iters(cfg: TuneConfig) -> TuneConfig:
    import dataclasses

    return dataclasses.replace(cfg, iters=0)


def _quantize_outside_layer(model, name, plan, cfg, calib_ids, device, store, bs, gen):
    """lm_head and other layers outside blocks: capture their inputs on the quantized model, then tune."""
    mod = get_module(model, name)
    chunks: list[torch.Tensor] = []

    def stop(_m, args):
        chunks.append(args[0].detach().to(store, torch.float32))
        raise _StopForward

    h = mod.register_forward_pre_hook(stop)
    try:
        with torch.no_grad():
            for i in range(0, calib_ids.shape[0], bs):
                try:
                    model(input_ids=calib_ids[i : i + bs].to(mod.weight.device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        h.remove()
    x = torch.cat(chunks)
    orig_device, orig_dtype = mod.weight.device, mod.weight.dtype
    mod.to(device=device, dtype=torch.float32)
    w_fp = get_weight(mod).detach().clone()
    b_fp = None if mod.bias is None else mod.bias.detach().clone()

    def run(unit, xb):
        with _autocast(device, cfg):
            return unit(xb)

    def target(idx, xb):
        return F.linear(xb, w_fp, b_fp)

    try:
        return _quantize_unit(mod, {"": (mod, plan.specs[name])}, run, x, target, cfg, device, bs, gen)
    finally:
        mod.to(device=orig_device, dtype=orig_dtype)
