"""``AutoRound``: the entry point that mirrors upstream AutoRound's Python API."""

from __future__ import annotations

import json
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
from .calib import DEFAULT_DATASET, build_calibration
from .tune.config import TuneConfig, tune_config
from .tune.pipeline import QuantResult, quantize_calibrated, quantize_rtn, restore_weights

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
        data_type: str | None = None,
        act_bits: int | None = None,
        act_data_type: str | None = None,
        act_group_size: int | None = None,
        act_dynamic: bool | None = None,
        layer_config: Mapping[str, Any] | None = None,
        ignore_layers: str | Iterable[str] | None = None,
        quant_lm_head: bool = False,
        dataset: Any = None,
        iters: int | None = None,
        lr: float | None = None,
        minmax_lr: float | None = None,
        batch_size: int | None = None,
        gradient_accumulate_steps: int | None = None,
        nsamples: int | None = None,
        seqlen: int | None = None,
        enable_minmax_tuning: bool | None = None,
        enable_quanted_input: bool | None = None,
        not_use_best_mse: bool | None = None,
        low_gpu_mem_usage: bool | None = None,
        amp: bool | None = None,
        enable_torch_compile: bool | None = None,
        disable_opt_rtn: bool | None = None,
        recipe: str = "default",
        to_quant_block_names: str | Iterable[str] | None = None,
        device_map: str | dict | None = None,
        dtype: str | torch.dtype | None = "auto",
        trust_remote_code: bool = False,
        seed: int = 42,
    ):
        self.start_time = time.time()
        self.spec = resolve_scheme(
            scheme, bits, group_size, sym, data_type=data_type, act_bits=act_bits, act_data_type=act_data_type,
            act_group_size=act_group_size, act_dynamic=act_dynamic,
        )
        self.cfg: TuneConfig = tune_config(
            recipe, iters=iters, lr=lr, minmax_lr=minmax_lr, batch_size=batch_size,
            gradient_accumulate_steps=gradient_accumulate_steps, nsamples=nsamples, seqlen=seqlen,
            enable_minmax_tuning=enable_minmax_tuning, enable_quanted_input=enable_quanted_input,
            not_use_best_mse=not_use_best_mse, low_gpu_mem_usage=low_gpu_mem_usage, amp=amp,
            enable_torch_compile=enable_torch_compile, disable_opt_rtn=disable_opt_rtn, seed=seed,
        )
        self._seqlen_given = seqlen is not None
        self.dataset = DEFAULT_DATASET if dataset is None else dataset
        self.device_map = device_map
        self.seed = seed
        _seed_everything(seed)
        self._model, self.tokenizer, self.source_dir = load_model_and_tokenizer(
            model, tokenizer, device_map=device_map, dtype=dtype, trust_remote_code=trust_remote_code
        )
        self.plan: QuantPlan = build_plan(
            self._model, self.spec, layer_config, ignore_layers, quant_lm_head, to_quant_block_names
        )
        self._check_seqlen()
        self.result: QuantResult | None = None
        self.summary: dict[str, Any] = {}

    @property
    def iters(self) -> int:
        return self.cfg.iters

    def _check_seqlen(self) -> None:
        if not self.cfg.needs_data:
            return
        text_cfg = self._model.config.get_text_config()
        ctx = getattr(text_cfg, "max_position_embeddings", None) or getattr(text_cfg, "n_positions", None)
        if ctx and self.cfg.seqlen > ctx:
            if self._seqlen_given:
                raise ConfigError(f"seqlen {self.cfg.seqlen} is longer than the model's context ({ctx}); lower --seqlen")
            logger.warning("default seqlen %d is longer than the model's context: using %d", self.cfg.seqlen, ctx)
            self.cfg.seqlen = ctx

    def calibration_ids(self) -> torch.Tensor:
        """Tokenized calibration samples ``[n, seqlen]`` (validated: at least one sample)."""
        ids = build_calibration(self.dataset, self.tokenizer, self.cfg.seqlen, self.cfg.nsamples, self.seed)
        if ids.shape[0] < self.cfg.batch_size:
            logger.warning("only %d calibration samples: batch_size lowered from %d", ids.shape[0], self.cfg.batch_size)
            self.cfg.batch_size = ids.shape[0]
        return ids

    @property
    def layer_config(self) -> dict[str, dict[str, Any]]:
        """The resolved spec of every candidate layer, as plain dicts."""
        return {
            n: {"bits": s.bits, "group_size": s.group_size, "sym": s.sym, "data_type": s.data_type,
                "act_bits": s.act_bits}
            for n, s in self.plan.specs.items()
        }

    @property
    def model(self) -> nn.Module:
        """The model, quantized in place once quantized. Weights released while saving come back
        (dequantized from their QParams) on first access."""
        if self.result is not None and self.result.released:
            restore_weights(self._model, self.result)
        return self._model

    def quantize(self) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
        """Quantize in place; returns ``(model, layer_config)`` like upstream."""
        self._quantize(keep_weights=True)
        return self.model, self.layer_config

    def _quantize(self, keep_weights: bool) -> None:
        if self.result is not None:
            return
        if self.cfg.needs_data or self.plan.needs_act_range:
            ids = self.calibration_ids()
            device = _compute_device(self._model, self.device_map)
            # the steps are logged because recipes and data types choose them, not only --lr
            steps = ", lr %g, minmax_lr %g" % self.cfg.lrs_for(self.spec) if self.cfg.iters else ""
            logger.info(
                "%s on %s: %d samples x %d tokens, %d iters, batch %d%s", self.cfg.mode, device, ids.shape[0],
                ids.shape[1], self.cfg.iters, self.cfg.batch_size, steps,
            )
            self.result = quantize_calibrated(self._model, self.plan, self.cfg, ids, device, keep_weights=keep_weights)
        else:
            self.result = quantize_rtn(self._model, self.plan)

    def save_quantized(
        self, output_dir: str | os.PathLike, format: str = "auto_round", inplace: bool = True, **kwargs: Any
    ) -> Path:
        """Write the quantized model to exactly ``output_dir`` in ``format``.

        ``format`` is auto_round, auto_gptq, auto_awq or fake, or several comma-separated (one
        subdirectory each, from the same tuning).
        """
        if self.result is None:
            raise ConfigError("call quantize() before save_quantized(), or use quantize_and_save()")
        model = self.model if _reads_weights(format) else self._model
        out = export.save(
            output_dir, format, model, self.plan, self.result.qparams, self.tokenizer, self.source_dir,
            extra_config=self._config_record(), extra_files=self._log_files(), **kwargs,
        )
        self._finish_summary(out)
        return out

    def quantize_and_save(
        self, output_dir: str | os.PathLike = "tmp_autoround", format: str = "auto_round", **kwargs: Any
    ) -> tuple[nn.Module, Path]:
        """Check the output target, quantize, save; returns ``(model, output path)``.

        Formats written from QParams alone (all but fake) release the quantized layers' in-memory
        weights while tuning; the model gets them back (dequantized from the saved codes) on its first
        forward call or through ``ar.model``.
        """
        export.check_formats(format, self._model, self.plan, output_dir)
        # formats written from QParams alone let tuned blocks release their weights as they go;
        # restoring them here would put the peak memory right back, so they return when used:
        # through ``ar.model`` or on the returned model's first forward call
        self._quantize(keep_weights=_reads_weights(format))
        out = self.save_quantized(output_dir, format, **kwargs)
        if self.result is not None and self.result.released:
            self._restore_on_forward()
        return self._model, out

    def _restore_on_forward(self) -> None:
        handle = None

        def restore(module: nn.Module, args: Any) -> None:
            restore_weights(module, self.result)
            handle.remove()

        handle = self._model.register_forward_pre_hook(restore)

    def _log_files(self) -> dict[str, str]:
        """Per-block losses (RTN, start, final) and settings, saved next to the model."""
        if not self.result or not self.result.block_stats:
            return {}
        log = {"mode": self.cfg.mode, "settings": self._config_record(), "blocks": self.result.block_stats}
        return {"quantization_log.json": json.dumps(log, indent=2) + "\n"}

    def _config_record(self) -> dict[str, Any]:
        c = self.cfg
        rec: dict[str, Any] = {"iters": c.iters}
        if c.needs_data:
            rec.update(nsamples=c.nsamples, seqlen=c.seqlen, batch_size=c.batch_size)
        if c.iters:
            lr, minmax_lr = c.lrs_for(self.spec)
            rec.update(lr=lr, minmax_lr=minmax_lr, enable_minmax_tuning=c.enable_minmax_tuning,
                       enable_quanted_input=c.enable_quanted_input)
        return rec

    def _finish_summary(self, out: Path) -> None:
        self.summary = {
            **bits_summary(self._model, self.plan),
            "output_dir": str(out),
            "output_bytes": export.dir_size(out),
            "seconds": time.time() - self.start_time,
            "peak_rss_bytes": peak_rss_bytes(),
            "peak_gpu_bytes": peak_gpu_bytes(),
        }
        logger.info("%s", format_summary(self.summary))


def _reads_weights(formats: str | list[str]) -> bool:
    """Whether a format stores the in-memory weights of quantized layers (not just their QParams)."""
    return any(getattr(e, "reads_weights", False) for e in export.get_exporters(formats))


def _compute_device(model: nn.Module, device_map: Any) -> torch.device:
    if isinstance(device_map, str) and device_map not in ("auto",):
        return torch.device(device_map)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
