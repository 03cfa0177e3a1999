"""The budgeted choice: one option per group, least total loss, total bits within the budget.

A multiple-choice knapsack solved exactly by dynamic programming over the bits above each
group's cheapest option, in ``resolution`` steps of the spare budget. Costs are rounded up to
whole steps, so the choice never exceeds the budget; it can leave less than one step per group
unspent."""

from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError


def choose(costs: np.ndarray, losses: np.ndarray, budget: float, resolution: int = 20000) -> list[int]:
    """``costs`` and ``losses`` are ``[groups, options]``; returns the chosen option per group."""
    costs = np.asarray(costs, dtype=np.float64)
    losses = np.asarray(losses, dtype=np.float64)
    n_groups, n_opts = costs.shape
    base = costs.min(axis=1)
    spare = budget - base.sum()
    if spare < -1e-6 * max(abs(budget), 1.0):
        raise ConfigError("the bit budget is below what the cheapest options take")
    # keep the choice table (groups x steps bytes) modest for models with many groups
    steps = int(max(64, min(resolution, 4e8 // max(n_groups, 1))))
    unit = max(spare, 0.0) / steps
    if unit == 0.0:
        return [int(np.argmin(np.where(costs[g] <= base[g], losses[g], np.inf))) for g in range(n_groups)]
    extra = np.ceil((costs - base[:, None]) / unit - 1e-9).astype(np.int64)
    best = np.zeros(steps + 1)  # least loss with at most c steps spent, over the groups so far
    pick = np.zeros((n_groups, steps + 1), dtype=np.int16)
    for g in range(n_groups):
        new = np.full(steps + 1, np.inf)
        for o in range(n_opts):
            e = extra[g, o]
            if e > steps:
                continue
            cand = np.full(steps + 1, np.inf)
            cand[e:] = best[: steps + 1 - e] + losses[g, o]
            better = cand < new
            new[better] = cand[better]
            pick[g, better] = o
        best = new
    c = steps
    if not math.isfinite(best[c]):
        raise ConfigError("no choice of options fits the bit budget")
    chosen = [0] * n_groups
    for g in range(n_groups - 1, -1, -1):
        o = int(pick[g, c])
        chosen[g] = o
        c -= int(extra[g, o])
    return chosen
