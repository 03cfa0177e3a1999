"""Tuning settings, with upstream AutoRound's names and defaults, and the recipes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ConfigError
from ..schemes import QuantSpec


# Automatic step sizes where 1/iters overshoots, as (lr * iters, minmax_lr / lr): nv_fp and GGUF
# (ggml) layers (see TuneConfig.lrs_for).
NV_FP_STEPS = (0.25, 0.2)
GGML_STEPS = (0.25, 1.0)


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
    cache_dtype: str = "auto"  # cached activations: auto, float32, bfloat16, float16
    enable_adam: bool = False  # AdamW instead of signed steps (upstream's --adam; default lr 5e-3)
    momentum: float = 0.0  # momentum of the signed steps (upstream's --momentum)
    enable_deterministic_algorithms: bool = False
    nblocks: int = 1  # consecutive blocks tuned as one unit (upstream's --nblocks)
    enable_norm_bias_tuning: bool = False  # upstream's: norm weights and Linear biases tuned too (offsets)
    enable_alg_ext: bool = False  # SignRoundV2's tuning extensions (see tune/signround.py: alg_ext)
    calibrate_all_experts: bool = False  # MoE: experts also compute the tokens not routed to them
    min_expert_tokens: int = 32  # MoE: experts routed fewer calibration tokens keep their optimized-RTN start
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
        if self.lr is not None:
            return self.lr
        return 5e-3 if self.enable_adam else 1.0 / max(self.iters, 1)  # upstream's AdamW default

    @property
    def minmax_lr_value(self) -> float:
        return self.minmax_lr if self.minmax_lr is not None else self.lr_value

    def lrs_for(self, spec: QuantSpec) -> tuple[float, float]:
        """(lr, minmax_lr) for layers of this spec; explicit settings always win.

        NVFP4's FP8 group scales and E2M1 grid make the default steps overshoot: measured on
        SmolLM2-135M W4A4 blocks 2 and 20 (50 iters, held-out WikiText-2 block loss), lr 1/iters and
        minmax_lr = lr end worse than the optimized-RTN start (0.090 / 0.60 vs 0.080 / 0.54), while a
        quarter of that, with minmax_lr a fifth of lr, ends at 0.059 / 0.49.

        GGUF types start from llama.cpp-style refit ranges, and the default steps overfit the
        calibration texts: SmolLM2-135M Q2_K_S, 16 x 256 calibration tokens, 50 iters, block-output
        MSE on WikiText-2 text disjoint from the benchmark's windows, blocks 3 / 14 / 26:
        lr 1/iters 0.070 / 0.168 / 2.66, half that 0.065 / 0.158 / 2.45, a quarter 0.060 / 0.146 /
        2.27 (calibration loss about the same for all three); with the default, llama-perplexity
        WikiText-2 rose from 30.92 (optimized RTN) to 33.18.
        """
        steps = NV_FP_STEPS if spec.data_type == "nv_fp" else GGML_STEPS if spec.ggml_type else None
        if steps is None:
            return self.lr_value, self.minmax_lr_value
        lr = self.lr if self.lr is not None else steps[0] / max(self.iters, 1)
        return lr, self.minmax_lr if self.minmax_lr is not None else lr * steps[1]

    def validate(self) -> "TuneConfig":
        for name in ("iters", "gradient_accumulate_steps", "batch_size", "nsamples", "seqlen", "min_expert_tokens",
                     "nblocks"):
            v = getattr(self, name)
            lowest = 0 if name in ("iters", "min_expert_tokens") else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < lowest:
                raise ConfigError(f"{name} must be a {'non-negative' if lowest == 0 else 'positive'} integer, got {v!r}")
        if self.cache_dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
            raise ConfigError(f"cache_dtype {self.cache_dtype!r} is not one of auto, float32, bfloat16, float16")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.momentum and self.enable_adam:
            raise ConfigError("momentum applies to the signed steps; AdamW keeps its own moments: drop --momentum "
                              "or --adam")
        for name in ("lr", "minmax_lr"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"{name} must be positive, got {v!r}")
        return self


# Recipes: upstream's auto-round-best / auto-round / auto-round-light settings, and "fast": few
# iterations want smaller steps than 1/iters, the clipping scales (which start from the searched
# optimized-RTN ranges) smaller still; measured on SmolLM2-135M, see the README's "Smaller steps for
# short runs".
RECIPES: dict[str, dict] = {
    "best": {"iters": 1000, "nsamples": 512},
    "default": {},
    "light": {"iters": 50, "lr": 5e-3},
    "fast": {"iters": 30, "lr": 0.01, "minmax_lr": 0.0025},
}


def describe_recipes() -> str:
    """The recipes in one line for the CLI help, built from the registry so the two cannot disagree."""
    default_iters = TuneConfig().iters
    parts = [f"{name}: " + (", ".join(f"{k} {v:g}" for k, v in values.items()) or f"upstream's defaults (iters {default_iters})")
             for name, values in RECIPES.items()]
    return "; ".join(parts)


def tune_config(recipe: str = "default", **overrides) -> TuneConfig:
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    fields = {f.name for f in dataclasses.fields(TuneConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ConfigError(f"unknown tuning option(s) {sorted(unknown)}; known: {sorted(fields)}")
    values = {**RECIPES[recipe], **{k: v for k, v in overrides.items() if v is not None}}
    return TuneConfig(**values).validate()
