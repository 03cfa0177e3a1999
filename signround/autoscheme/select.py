"""AutoScheme end to end: what is chosen and what is fixed, the budget check, scoring, the choice."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..devices import DeviceMap
from ..errors import ConfigError
from ..model.layers import get_module, in_out_features
from ..model.source import WeightSource
from ..plan import QuantPlan
from ..schemes import QuantSpec
from ..tune.config import TuneConfig
from .groups import scheme_groups
from .options import AutoScheme, layer_bits, spec_dict
from .score import score_groups
from .solve import choose

logger = logging.getLogger(__name__)

LAYER_CONFIG_FILE = "layer_config.json"


@dataclass
class Request:
    """The layers AutoScheme chooses for, in groups, and the bits of everything counted."""

    auto: AutoScheme
    groups: list[list[str]]
    costs: np.ndarray  # [groups, options] bits
    fixed_bits: float  # layers fixed by layer_config, a quantized lm_head (the best option), GGUF's embedding / output
    params: int  # weights counted
    budget: float  # avg_bits (snapped to the range when within 1e-3 of an end)
    group_numel: list[int] = field(default_factory=list)
    fixed: dict[str, QuantSpec] = field(default_factory=dict)  # set here: lm_head
    # each chosen layer's spec under each option: the option itself, or for a GGUF option the block
    # type llama.cpp's mix of that file type gives the layer
    layer_specs: dict[str, list[QuantSpec]] = field(default_factory=dict)

    @property
    def options(self) -> list[QuantSpec]:
        return [s for _, s in self.auto.specs]

    def avg_bits(self, chosen: list[int]) -> float:
        total = self.fixed_bits + sum(self.costs[g, o] for g, o in enumerate(chosen))
        return total / self.params

    def specs_for(self, chosen: list[int]) -> dict[str, QuantSpec]:
        out = dict(self.fixed)
        for g, o in enumerate(chosen):
            out.update({n: self.layer_specs[n][o] for n in self.groups[g]})
        return out


def prepare(auto: AutoScheme, model: nn.Module, plan: QuantPlan, default: QuantSpec) -> Request:
    """Everything checked before scoring: the layers to choose for (those the plan gave ``default``,
    i.e. not fixed by layer_config / ignore_layers), the groups, and the budget against the range
    the options span."""
    options = [s for _, s in auto.specs]
    free = set(plan.defaulted)
    searched = [n for b in plan.block_names for n in plan.block_layers[b] if n in free]
    if plan.ggml_ftype:  # GGUF options: each layer's type is what the option's mix gives it
        from ..export.gguf.mixes import Mix

        mix = Mix(model)
        layer_specs = {n: [mix.spec(s.ggml_type, n) if s.ggml_type else s for s in options] for n in searched}
    else:
        layer_specs = {n: list(options) for n in searched}
    searched = [n for n in searched if any(s.quantized for s in layer_specs[n])]  # rows no GGUF type divides
    if not searched:
        raise ConfigError("AutoScheme has no layer to choose for: layer_config / ignore_layers fix every block layer")
    shape = {n: in_out_features(get_module(model, n)) for n in [*plan.specs, *plan.ggml_extras]}

    def bits(name: str, spec: QuantSpec) -> float:
        in_f, out_f = shape[name]
        return layer_bits(spec, out_f, in_f, auto.ignore_scale_zp_bits)

    fixed: dict[str, QuantSpec] = {}
    head = plan.lm_head
    if head and plan.specs.get(head) is default:  # --quant_lm_head: not searched, the best option
        fixed[head] = max(options, key=lambda s: bits(head, s))
    counted = {n: fixed.get(n, s) for n, s in plan.specs.items() if n not in layer_specs and (s.quantized or n in fixed)}
    counted.update(plan.ggml_extras)  # GGUF's token embedding / output, typed by the file type (the dearest option)
    fixed_bits = sum(bits(n, s) for n, s in counted.items())
    params = sum(shape[n][0] * shape[n][1] for n in [*searched, *counted])
    groups = scheme_groups(plan.block_layers, searched, auto.shared_layers)
    costs = np.array([[sum(bits(n, layer_specs[n][o]) for n in g) for o in range(len(options))] for g in groups])
    lo, hi = (fixed_bits + costs.min(1).sum()) / params, (fixed_bits + costs.max(1).sum()) / params
    target = float(auto.avg_bits)
    target = lo if abs(target - lo) < 1e-3 else hi if abs(target - hi) < 1e-3 else target
    if not lo <= target <= hi:
        per = ", ".join(f"{name} {(fixed_bits + costs[:, i].sum()) / params:.3f}" for i, (name, _) in enumerate(auto.specs))
        raise ConfigError(
            f"AutoScheme avg_bits {auto.avg_bits:g} is outside what the options reach on this model: "
            f"{lo:.3f} ... {hi:.3f} bits (every chosen layer at one option: {per}"
            f"{'; scale and zero-point bits included, --ignore_scale_zp_bits leaves them out' if not auto.ignore_scale_zp_bits else ''}"
            f"{'; fixed layers count too: ' + ', '.join(list(counted)[:3]) if counted else ''}); pick a budget inside that range or "
            "other options"
        )
    numel = [sum(shape[n][0] * shape[n][1] for n in g) for g in groups]
    return Request(auto, groups, costs, fixed_bits, params, target, numel, fixed,
                   {n: layer_specs[n] for n in searched})


def trial_plans(plan: QuantPlan, req: Request) -> list[tuple[str, QuantPlan]]:
    """Plans the chosen formats must be able to hold whatever the choice: every layer at each
    option, and the options mixed (groups taking them in turn)."""
    out = []
    for o, (label, _) in enumerate(req.auto.specs):
        out.append((label, dataclasses.replace(plan, specs={**plan.specs, **req.specs_for([o] * len(req.groups))})))
    mixed = [g % len(req.options) for g in range(len(req.groups))]
    out.append(("a mix of " + ", ".join(n for n, _ in req.auto.specs),
                dataclasses.replace(plan, specs={**plan.specs, **req.specs_for(mixed)})))
    return out


@dataclass
class Selection:
    specs: dict[str, QuantSpec]
    avg_bits: float
    budget: float
    rows: list[dict[str, Any]]
    seconds: float

    def record(self) -> dict[str, Any]:
        return {"budget": self.budget, "avg_bits": round(self.avg_bits, 4), "seconds": round(self.seconds, 3),
                "groups": self.rows}

    def layer_config(self) -> dict[str, dict[str, Any]]:
        return {n: spec_dict(s) for n, s in self.specs.items()}


def units_by_block(req: Request, plan: QuantPlan) -> dict[str, list[tuple[int, list[str]]]]:
    """Per block: (group index, the group's layers in that block)."""
    units: dict[str, list[tuple[int, list[str]]]] = {}
    for g, members in enumerate(req.groups):
        for block in plan.block_names:
            inside = [n for n in members if n.startswith(block + ".")]
            if inside:
                units.setdefault(block, []).append((g, inside))
    return units


def select(req: Request, model: nn.Module, plan: QuantPlan, calib_ids: torch.Tensor, cfg: TuneConfig,
           devmap: DeviceMap, source: WeightSource, calib_extras: list[dict] | None = None) -> Selection:
    """Score every group at every option block by block, then the exact budgeted choice
    (``calib_extras``: image-text samples' other model inputs)."""
    t0 = time.time()
    bs = req.auto.batch_size or cfg.batch_size
    scores = score_groups(model, plan.block_names, units_by_block(req, plan), len(req.groups), req.options,
                          req.layer_specs, calib_ids, cfg, devmap, source, min(bs, calib_ids.shape[0]),
                          calib_extras=calib_extras)
    chosen = choose(req.costs, scores, req.budget * req.params - req.fixed_bits)
    sel = _selection(req, chosen, scores, time.time() - t0)
    logger.info("%s", format_table(sel, [n for n, _ in req.auto.specs]))
    return sel


def _selection(req: Request, chosen: list[int], scores: np.ndarray, seconds: float) -> Selection:
    names = [n for n, _ in req.auto.specs]
    rows = []
    for g, o in enumerate(chosen):
        rows.append({"layers": req.groups[g], "option": names[o], "bits": round(float(req.costs[g, o]) / req.group_numel[g], 4),
                     "score": float(scores[g, o]), "scores": {names[i]: float(scores[g, i]) for i in range(len(names))}})
    return Selection(req.specs_for(chosen), req.avg_bits(chosen), req.budget, rows, seconds)


def restore(req: Request, record: dict[str, Any]) -> Selection:
    """The choice an interrupted run made (its ``Selection.record()``), for a resumed run: no scoring."""
    names = [n for n, _ in req.auto.specs]
    rows = {tuple(r["layers"]): r for r in record.get("groups", [])}
    picked = [rows.get(tuple(g)) for g in req.groups]
    if any(r is None or r["option"] not in names for r in picked):
        raise ConfigError("--resume: the interrupted run's AutoScheme choice does not cover this run's layers and "
                          "options; rerun with its settings, or use --start_over to discard it")
    chosen = [names.index(r["option"]) for r in picked]
    scores = np.array([[r["scores"][n] for n in names] for r in picked])
    sel = _selection(req, chosen, scores, float(record.get("seconds", 0.0)))
    logger.info("AutoScheme: the interrupted run's choice is reused (%.3f average bits, no scoring)", sel.avg_bits)
    return sel


def format_table(sel: Selection, names: list[str]) -> str:
    lines = [f"AutoScheme: {sel.avg_bits:.3f} average bits (budget {sel.budget:g}), chosen in {sel.seconds:.1f} s",
             f"  {'layers':<48} {'scheme':<12} {'bits':>6}  score"]
    for r in sel.rows:
        first = r["layers"][0]
        label = first + (f" (+{len(r['layers']) - 1})" if len(r["layers"]) > 1 else "")
        lines.append(f"  {label:<48} {r['option']:<12} {r['bits']:>6.3f}  {r['score']:.4g}")
    counts = {n: sum(len(r["layers"]) for r in sel.rows if r["option"] == n) for n in names}
    lines.append("  layers per option: " + ", ".join(f"{n} {c}" for n, c in counts.items()))
    return "\n".join(lines)
