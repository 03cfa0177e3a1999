"""Round-to-nearest, plain and optimized.

Optimized RTN searches, per group, the clipping ratio of the range that minimizes the
importance-weighted squared weight error, with importance = sum of x^2 of the layer's calibration
inputs per input channel (how much each column of W matters to the output).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..model.layers import attach_act_quant, get_weight, set_weight
from ..qdq import QParams, qdq
from ..qdq.common import to_groups
from ..schemes import QuantSpec

CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 ... 0.5
# A start for SignRound, which tunes the clipping further: a quarter of the candidates.
COARSE_CLIP_GRID = CLIP_GRID[::4]  # 1.0, 0.9, ..., 0.5


def compact(qp: QParams) -> QParams:
    """Keep QParams off the accelerator and codes as uint8 (1 byte per weight until export)."""
    return dataclasses.replace(
        qp,
        scale=qp.scale.cpu(),
        zero=qp.zero.cpu(),
        codes=qp.codes.to("cpu", torch.uint8),
        **{f: getattr(qp, f).cpu() for f in ("global_scale", "input_amax", "super_scale", "super_min")
           if getattr(qp, f) is not None},
    )


def rtn_layer(module: nn.Module, spec: QuantSpec, min_scale=None, max_scale=None) -> QParams:
    """Replace the module's weight by its qdq value; return compact QParams."""
    w_qdq, qp = qdq(get_weight(module).detach(), spec, min_scale=min_scale, max_scale=max_scale)
    set_weight(module, w_qdq)
    attach_act_quant(module, spec, None)  # dynamic activation scales only: static ones need calibration
    return compact(qp)


@torch.no_grad()
def search_clip(
    w: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None, grid: tuple[float, ...] = CLIP_GRID
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (min_scale, max_scale) minimizing sum_j imp_j * (w_ij - qdq(w)_ij)^2.

    A shared ratio is searched first; asymmetric schemes then refine max and min separately.
    """
    w = w.float()
    imp = torch.ones(w.shape[1], device=w.device) if importance is None else importance.float().to(w.device)
    imp = imp / imp.mean().clamp_min(1e-12) + 1e-6  # never ignore a channel completely
    impg = to_groups(imp.expand_as(w), spec.group_size)
    wg = to_groups(w, spec.group_size)
    shape = wg.shape[:2]

    def err(mn: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
        dq, _ = qdq(w, spec, min_scale=mn, max_scale=mx)
        return ((to_groups(dq.float(), spec.group_size) - wg) ** 2 * impg).sum(-1)

    def search(mn: torch.Tensor, mx: torch.Tensor, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        best_err = err(mn, mx)
        best_mn, best_mx = mn.clone(), mx.clone()
        for r in grid:
            rr = torch.full(shape, r, device=w.device)
            cand_mn = rr if which in ("both", "min") else mn
            cand_mx = rr if which in ("both", "max") else mx
            e = err(cand_mn, cand_mx)
            better = e < best_err
            best_err = torch.where(better, e, best_err)
            best_mn = torch.where(better, cand_mn, best_mn)
            best_mx = torch.where(better, cand_mx, best_mx)
        return best_mn, best_mx

    ones = torch.ones(shape, device=w.device)
    mn, mx = search(ones, ones, "both")
    if not spec.sym:
        mn, mx = search(mn, mx, "max")
        mn, mx = search(mn, mx, "min")
    return mn, mx
