"""``AutoRound``: the entry point that mirrors upstream AutoRound's Python API."""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from . import export
from .errors import ConfigError
from .model.loading import load_model_and_tokenizer
from .plan import QuantPlan, build_plan
from .report import bits_summary, format_summary, peak_gpu_bytes, peak_rss_bytes
from .schemes import QuantSpec, resolve_scheme
from .tune.pipeline import QuantResult, quantize_rtn

logger = logging.getLogger(__name__)


class AutoRound:
    """Quantize a causal LM block by block and save it.

    ``model`` is a local model directory or an already-loaded ``PreTrainedModel``. ``scheme`` is a
    preset name (``W4A16``, ``W2A16G64``, ...) that ``bits`` / ``group_size`` / ``sym`` override.
    ``layer_config`` maps exact layer names, substrings or regexes to a preset name or a dict of
    overrides (``{"bits": 16}`` keeps a layer in full precision).
    """

    def __init__(
        self,
        model: str | nn.Module,
        tokenizer: Any = None,
        scheme: str | QuantSpec | Mapping[str, Any] = "W4A16",
        bits: int | None = None,
        group_size: int | None = None,
        sym: bool | None = None,
        layer_config: Mapping[str, Any] | None = None,
        ignore_layers: str | Iterable[str] | None = None,
        quant_lm_head: bool = False,
        iters: int = 200,
        disable_opt_rtn: bool = False,
        to_quant_block_names: str | Iterable[str] | None = None,
        device_map: str | dict | None = None,
        dtype: str | torch.dtype | None = "auto",
        trust_remote_code: bool = False,
        seed: int = 42,
    ):
        self.start_time = time.time()
        self.spec = resolve_scheme(scheme, bits, group_size, sym)
        if not isinstance(iters, int) or iters < 0:
            raise ConfigError(f"iters must be a non-negative integer, got {iters!r}")
        if iters > 0 or not disable_opt_rtn:
            raise ConfigError(
                "this version implements plain round-to-nearest only: pass iters=0 and "
                "disable_opt_rtn=True (CLI: --iters 0 --disable_opt_rtn)"
            )
        self.iters = iters
        self.disable_opt_rtn = disable_opt_rtn
        self.seed = seed
        _seed_everything(seed)
        self.model, self.tokenizer, self.source_dir = load_model_and_tokenizer(
            model, tokenizer, device_map=device_map, dtype=dtype, trust_remote_code=trust_remote_code
        )
        self.plan: QuantPlan = build_plan(
            self.model, self.spec, layer_config, ignore_layers, quant_lm_head, to_quant_block_names
        )
        self.result: QuantResult | None = None
        self.summary: dict[str, Any] = {}

    @property
    def layer_config(self) -> dict[str, dict[str, Any]]:
        """The resolved spec of every candidate layer, as plain dicts."""
        return {
            n: {"bits": s.bits, "group_size": s.group_size, "sym": s.sym, "data_type": s.data_type}
            for n, s in self.plan.specs.items()
        }

    def quantize(self) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
        """Quantize in place; returns ``(model, layer_config)`` like upstream."""
        if self.result is not None:
            return self.model, self.layer_config
        self.result = quantize_rtn(self.model, self.plan)
        return self.model, self.layer_config

    def save_quantized(
        self, output_dir: str | os.PathLike, format: str = "auto_round", inplace: bool = True, **kwargs: Any
    ) -> Path:
        """Write the quantized model to exactly ``output_dir`` in ``format`` (auto_round or fake)."""
        if self.result is None:
            raise ConfigError("call quantize() before save_quantized(), or use quantize_and_save()")
        out = export.save(
            output_dir, format, self.model, self.plan, self.result.qparams, self.tokenizer, self.source_dir,
            extra_config={"iters": self.iters}, **kwargs,
        )
        self._finish_summary(out)
        return out

    def quantize_and_save(
        self, output_dir: str | os.PathLike = "tmp_autoround", format: str = "auto_round", **kwargs: Any
    ) -> tuple[nn.Module, Path]:
        """Check the output target, quantize, save; returns ``(model, output path)``."""
        exporter = export.get_exporter(format)
        exporter.check(self.plan)
        export.check_output_dir(output_dir, exporter.estimate_bytes(self.model, self.plan))
        self.quantize()
        return self.model, self.save_quantized(output_dir, format, **kwargs)

    def _finish_summary(self, out: Path) -> None:
        self.summary = {
            **bits_summary(self.model, self.plan),
            "output_dir": str(out),
            "output_bytes": export.dir_size(out),
            "seconds": time.time() - self.start_time,
            "peak_rss_bytes": peak_rss_bytes(),
            "peak_gpu_bytes": peak_gpu_bytes(),
        }
        logger.info("%s", format_summary(self.summary))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
