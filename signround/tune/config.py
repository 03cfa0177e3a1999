"""Tuning settings, with upstream AutoRound's names and defaults, and the recipes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass
class TuneConfig:
    iters: int = 200
    lr: float | None = None  # default 1/iters
    minmax_lr: float | None = None  # default lr
    batch_size: int = 8
    gradient_accumulate_steps: int = 1
    nsamples: int = 128
    seqlen: int = 2048
    enable_minmax_tuning: bool = True
    enable_quanted_input: bool = True
    not_use_best_mse: bool = False
    low_gpu_mem_usage: bool = False
    amp: bool = True
    enable_torch_compile: bool = True  # compiles the qdq kernels (falls back to eager when unavailable)
    disable_opt_rtn: bool = False
    seed: int = 42

    @property
    def mode(self) -> str:
        if self.iters > 0:
            return "signround"
        return "rtn" if self.disable_opt_rtn else "opt_rtn"

    @property
    def needs_data(self) -> bool:
        return self.mode != "rtn"

    @property
    def lr_value(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.iters, 1)

    @property
    def minmax_lr_value(self) -> float:
        return self.minmax_lr if self.minmax_lr is not None else self.lr_value

    def validate(self) -> "TuneConfig":
        for name in ("iters", "gradient_accumulate_steps", "batch_size", "nsamples", "seqlen"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "iters" else 1):
                raise ConfigError(f"{name} must be a {'non-negative' if name == 'iters' else 'positive'} integer, got {v!r}")
        for name in ("lr", "minmax_lr"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"{name} must be positive, got {v!r}")
        return self


# Recipes: upstream's auto-round-best / auto-round / auto-round-light settings.
RECIPES: dict[str, dict] = {
    "best": {"iters": 1000, "nsamples": 512},
    "default": {},
    "light": {"iters": 50, "lr": 5e-3},
}


def tune_config(recipe: str = "default", **overrides) -> TuneConfig:
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    fields = {f.name for f in dataclasses.fields(TuneConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ConfigError(f"unknown tuning option(s) {sorted(unknown)}; known: {sorted(fields)}")
    values = {**RECIPES[recipe], **{k: v for k, v in overrides.items() if v is not None}}
    return TuneConfig(**values).validate()
