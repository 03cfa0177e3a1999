"""Round-to-nearest, plain and optimized.

Optimized RTN searches, per group, the clipping ratio of the range that minimizes the
importance-weighted squared weight error, with importance = sum of x^2 of the layer's calibration
inputs per input channel (how much each column of W matters to the output). Integer types then
also try, per candidate range, the weighted least-squares scale (and min) for the codes that range
gives, as llama.cpp's quantizers do; for k-quants, whose sub-blocks share a quantized super-block
scale, the choice is checked per super-block.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from ..model.layers import attach_act_quant, get_weight, set_weight
from ..qdq import QParams, qdq
from ..qdq.common import PACKABLE_BITS, PackedQParams, grouped_range, to_groups
from ..qdq.kquant import SUPER_BLOCK
from ..schemes import QuantSpec
from . import kernels

CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 ... 0.5
# A start for SignRound, which tunes the clipping further: a quarter of the candidates.
COARSE_CLIP_GRID = CLIP_GRID[::4]  # 1.0, 0.9, ..., 0.5
# Candidate ranges for the least-squares refit: llama.cpp also starts from ranges wider than the
# weights' own (its rmin < 0), since the refit then shrinks the scale to where the codes sit.
REFIT_GRID = tuple(1.2 - 0.05 * i for i in range(15))  # 1.2 ... 0.5


def compact(qp: QParams) -> QParams:
    """Keep QParams off the accelerator until export, codes as small as they go: bit-packed for
    1, 2 and 4 bits (a W4 model's codes in half the bytes), one byte per weight otherwise."""
    codes = qp.codes.to("cpu", torch.uint8)
    packable = qp.bits in PACKABLE_BITS and (codes.numel() == 0 or int(codes.max()) < 1 << qp.bits)
    fields = {f.name: getattr(qp, f.name) for f in dataclasses.fields(qp)}
    fields.update(
        scale=qp.scale.cpu(),
        zero=qp.zero.cpu(),
        codes=codes,
        **{f: getattr(qp, f).cpu() for f in ("global_scale", "input_amax", "super_scale", "super_min")
           if getattr(qp, f) is not None},
    )
    return (PackedQParams if packable else QParams)(**fields)


def rtn_layer(module: nn.Module, spec: QuantSpec, min_scale=None, max_scale=None) -> QParams:
    """Replace the module's weight by its qdq value; return compact QParams."""
    w_qdq, qp = qdq(get_weight(module).detach(), spec, min_scale=min_scale, max_scale=max_scale)
    set_weight(module, w_qdq)
    attach_act_quant(module, spec, None)  # dynamic activation scales only: static ones need calibration
    return compact(qp)


def opt_rtn_layer(module: nn.Module, spec: QuantSpec, importance: torch.Tensor | None = None,
                  clip_grid: tuple[float, ...] = CLIP_GRID) -> QParams:
    """Optimized RTN of one layer on its own: the clipping searched (errors weighted by the input
    channels' ``importance``, uniform without), then the weight rounded in place."""
    grid, refit_grid = opt_rtn_grids(spec, clip_grid)
    mn, mx = search_clip(get_weight(module).detach(), spec, importance, grid, refit_grid=refit_grid)
    return rtn_layer(module, spec, mn, mx)


class _Best:
    """The lowest-error candidate per unit: a group (``per == 0``) or ``per`` consecutive groups
    (a k-quant super-block, compared by the sum of its groups' errors)."""

    def __init__(self, per: int):
        self.per = per
        self.err: torch.Tensor | None = None
        self.mn: torch.Tensor | None = None
        self.mx: torch.Tensor | None = None

    def _units(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1, self.per) if self.per else x

    def _score(self, e: torch.Tensor) -> torch.Tensor:
        return e.sum(-1, keepdim=True) if self.per else e

    def reset(self, e: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor) -> None:
        self.err, self.mn, self.mx = (self._units(t).clone() for t in (e, mn, mx))

    def offer(self, e: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor) -> None:
        if self.err is None:
            self.reset(e, mn, mx)
            return
        e, mn, mx = (self._units(t) for t in (e, mn, mx))
        better = self._score(e) < self._score(self.err)
        self.err = torch.where(better, e, self.err)
        self.mn = torch.where(better, mn, self.mn)
        self.mx = torch.where(better, mx, self.mx)

    def best(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(errors, min_scale, max_scale) in group layout ``[out, n_groups]``."""
        return tuple(t.reshape(t.shape[0], -1) for t in (self.err, self.mn, self.mx))


@torch.no_grad()
def search_clip(
    w: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None, grid: tuple[float, ...] = CLIP_GRID,
    refit: bool = True, compile: bool = False, refit_grid: tuple[float, ...] = REFIT_GRID,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (min_scale, max_scale) minimizing sum_j imp_j * (w_ij - qdq(w)_ij)^2.

    A shared ratio is searched first; asymmetric schemes then refine max and min separately.
    With ``refit``, integer types also try, per candidate range, the weighted least-squares scale
    (and min) for the codes that range gives (llama.cpp's refit), mapped back to clipping ratios.
    ``compile``: each candidate's error through one compiled kernel (per spec and shape) instead
    of eager qdq and error ops (SmolLM2-135M W2G64 start search: ~40 ms a block instead of 275).
    ``refit_grid`` holds the refit's candidate ranges.
    """
    w = w.float()
    imp = torch.ones(w.shape[1], device=w.device) if importance is None else importance.float().to(w.device)
    imp = imp / imp.mean().clamp_min(1e-12) + 1e-6  # never ignore a channel completely
    impg = to_groups(imp.expand_as(w).contiguous(), spec.group_size)  # a broadcast view makes every product 5x slower
    wg = to_groups(w, spec.group_size)
    shape = wg.shape[:2]

    error = _weighted_error(spec)

    def err(mn: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
        return kernels.call(("clip_error", spec), error, w, mn, mx, impg) if compile else error(w, mn, mx, impg)

    groups = _Best(0)
    # k-quants share a super-block scale between sub-blocks, so a mix of per-group winners can be
    # worse than any single candidate; the best whole candidate per super-block is kept as well
    supers = _Best(SUPER_BLOCK // spec.group_size) if spec.data_type.endswith("_dq") else None

    def consider(mn: torch.Tensor, mx: torch.Tensor) -> None:
        e = err(mn, mx)
        groups.offer(e, mn, mx)
        if supers is not None:
            supers.offer(e, mn, mx)

    def settle() -> tuple[torch.Tensor, torch.Tensor]:
        """The per-group winners, or per super-block the best whole candidate where that is better;
        the result (with its errors) is where the next search starts."""
        e, mn, mx = groups.best()
        if supers is None:
            return mn, mx
        supers.offer(err(mn, mx), mn, mx)
        e, mn, mx = supers.best()
        groups.reset(e, mn, mx)
        return mn, mx

    def search(mn: torch.Tensor, mx: torch.Tensor, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        for r in grid:
            rr = torch.full(shape, r, device=w.device)
            consider(rr if which in ("both", "min") else mn, rr if which in ("both", "max") else mx)
        return settle()

    ones = torch.ones(shape, device=w.device)
    consider(ones, ones)  # plain RTN: every later candidate must beat it
    mn, mx = search(ones, ones, "both")
    if not spec.sym:
        mn, mx = search(mn, mx, "max")
        mn, mx = search(mn, mx, "min")
    refit_fn = _REFIT.get((spec.data_type, spec.sym)) if refit else None
    if refit_fn is not None:
        for r in refit_grid:
            consider(*refit_fn(wg, impg, spec, r))
        mn, mx = settle()
    return mn, mx


def _weighted_error(spec: QuantSpec) -> Callable:
    def error(w: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, impg: torch.Tensor) -> torch.Tensor:
        """Per group: sum_j imp_j * (qdq(w)_ij - w_ij)^2 for clipping scales (mn, mx)."""
        dq = qdq(w, spec, min_scale=mn, max_scale=mx)[0]
        return ((to_groups(dq.float(), spec.group_size) - to_groups(w, spec.group_size)) ** 2 * impg).sum(-1)

    return error


def llama_refit_grid(bits: int) -> tuple[float, ...]:
    """llama.cpp's make_qx_quants candidates for a symmetric type: the extreme weight at code
    -(nmax + 0.1 i), i = -9..9, nmax = 2^(bits-1); each is then refit."""
    nmax = 2 ** (bits - 1)
    return tuple(nmax / (nmax + 0.1 * i) for i in range(-9, 10))


# GGML types searched like llama.cpp does (its refit candidates only, no clipping without a
# refit) rather than with the wide search, which clips harder: it wins on importance-weighted
# weight error yet lost on perplexity. SmolLM2-135M, llama-perplexity WikiText-2 / held-out:
# q4_0 (Q2_K_S attention and gate/up) 31.38 / 27.07 -> 30.92 / 26.69, the loss had been mostly
# in attn_v; q6_k (Q4_K_M's ffn_down with more bits) 23.61 / 20.77 -> 23.46 / 20.68, found by
# swapping in llama.cpp's tensors (its q6_k helped, its q4_k did not). q5_0 (Q4_K_M) and q4_k keep
# the wide search: a narrowed q5_0 search scored worse.
LLAMA_SEARCHED = ("q4_0", "q6_k")


def opt_rtn_grids(spec: QuantSpec, clip_grid: tuple[float, ...]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(clipping candidates, refit candidates) of the optimized-RTN search."""
    if spec.ggml_type in LLAMA_SEARCHED:
        return (1.0,), llama_refit_grid(spec.bits)
    return clip_grid, REFIT_GRID


def _refit_sym(wg: torch.Tensor, impg: torch.Tensor, spec: QuantSpec, r: float):
    """Full-range symmetric: codes from the range shrunk by r, then s = sum(w x q) / sum(w q^2)."""
    half = 2 ** (spec.bits - 1)
    wmin, wmax = grouped_range(wg, None, None)
    s0 = torch.where(wmax < -wmin, -wmin, -wmax) / half  # signed, as qdq_int has it
    safe = torch.where(s0 == 0, torch.ones_like(s0), s0)
    q = torch.clamp(torch.round(wg / (safe * r).unsqueeze(-1)), -half, half - 1)
    s = (impg * wg * q).sum(-1) / (impg * q * q).sum(-1).clamp_min(1e-20)
    ratio = torch.where(s0 == 0, torch.ones_like(s0), (s / safe)).clamp(0.0, 1.0)
    return ratio, ratio


def _refit_asym_dq(wg: torch.Tensor, impg: torch.Tensor, spec: QuantSpec, r: float):
    """k-quant asymmetric (w = s q - m, m >= 0): codes from the range shrunk by r, then the
    weighted least-squares (s, m) for those codes, m clamped to >= 0 (then s refit alone)."""
    maxq = 2**spec.bits - 1
    wmin, wmax = grouped_range(wg, None, None)
    lo, hi = wmin * r, wmax * r
    s0 = ((hi - lo) / maxq).clamp_min(1e-20)
    q = torch.clamp(torch.round((wg - lo.unsqueeze(-1)) / s0.unsqueeze(-1)), 0, maxq)
    sw, sq, sqq = impg.sum(-1), (impg * q).sum(-1), (impg * q * q).sum(-1)
    sx, sxq = (impg * wg).sum(-1), (impg * wg * q).sum(-1)
    det = (sw * sqq - sq * sq)
    ok = det.abs() > 1e-20
    det = torch.where(ok, det, torch.ones_like(det))
    s = (sw * sxq - sx * sq) / det
    b = (sqq * sx - sq * sxq) / det  # w ~ s q + b
    pos = b > 0
    s = torch.where(pos, sxq / sqq.clamp_min(1e-20), s)
    b = torch.where(pos, torch.zeros_like(b), b)
    s = torch.where(ok, s, s0).clamp_min(0)
    b = torch.where(ok, b, lo)
    # back to clipping ratios: wmin' = b, wmax' = s * maxq + b
    one = torch.ones_like(wmin)
    mn = torch.where(wmin < 0, b / torch.where(wmin < 0, wmin, -one), one)
    mx = torch.where(wmax > 0, (s * maxq + b) / torch.where(wmax > 0, wmax, one), one)
    return mn.clamp(0.0, 1.0), mx.clamp(0.0, 1.0)


_REFIT = {("int", True): _refit_sym, ("int_sym_dq", True): _refit_sym, ("int_asym_dq", False): _refit_asym_dq}
