"""``AutoRound``: the entry point that mirrors upstream AutoRound's Python API.

A run is a short sequence of steps, each a function of its own module:

1. settings: scheme and tuning config resolved and validated (``schemes``, ``tune.config``);
2. model: a meta-device skeleton with weights streamed from safetensors, or a whole model
   (``model.loading``), and the per-layer plan with its up-front checks (``plan``);
3. output: formats checked against the plan, the hidden partial directory opened, resume state
   read (``export``, ``resume``);
4. calibration data and the block loop, which writes each block as it finishes (``tune.pipeline``,
   ``export.sink``);
5. finish: the rest of each file, report.json, rename into place, self-check (``selfcheck``).
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from .autoscheme import LAYER_CONFIG_FILE, AutoScheme, Selection, base_spec, prepare, restore, select, trial_plans
from .calib import DEFAULT_DATASET, build_calibration, build_image_text_calibration, uses_images
from .errors import ConfigError, ExportError, SignRoundError
from .export.writer import write_error, write_failure
from .devices import parse_device_map
from .model.hub import resolve_model
from .model.kvcache import parse_fp8
from .model.vlm import auto_class, check_vlm_options, image_token_id, load_processor
from .model.loading import check_model_path, load_config, load_model_and_tokenizer, load_tokenizer
from .memory import release_memory, tune_allocator
from .model.source import InMemorySource, WeightSource
from .plan import QuantPlan, build_plan, untie_output_embedding
from .upstream_only import API_ONLY as UPSTREAM_ONLY
from .report import (PLOT_FILE, REPORT_FILE, bits_summary, format_summary, layer_table, peak_gpu_bytes,
                     peak_rss_bytes, render_plot, write_report)
from .schemes import QuantSpec, resolve_scheme
from .tune.config import TuneConfig, tune_config
from .tune.pipeline import QuantResult, probe_ids_for, quantize_model, restore_weights

logger = logging.getLogger(__name__)


class SelfCheckFailed(SignRoundError):
    """The saved files, loaded back, do not compute what was quantized."""


class AutoRound:
    """Quantize a causal LM block by block and save it.

    ``model`` is a local model directory or an already-loaded ``PreTrainedModel``; of a vision-language
    model (detected from its config; ``mllm`` forces it) the language model is quantized, the vision
    tower and projector kept exact unless ``quant_nontext_module``. ``scheme`` is a
    preset name (``W4A16``, ``W2A16G64``, ...) that ``bits`` / ``group_size`` / ``sym`` override.
    ``layer_config`` maps exact layer names, substrings or regexes to a preset name or a dict of
    overrides (``{"bits": 16}`` keeps a layer in full precision). ``low_cpu_mem_usage`` (default)
    streams a local safetensors checkpoint block by block instead of loading it whole. A Hub id is
    downloaded into the Hugging Face cache (``platform="model_scope"``: ModelScope), or resolved from
    the cache when ``HF_HUB_OFFLINE=1``.
    """

    def __init__(
        self,
        model: str | nn.Module,
        tokenizer: Any = None,
        scheme: str | QuantSpec | Mapping[str, Any] | AutoScheme = "W4A16",
        bits: int | None = None,
        group_size: int | None = None,
        sym: bool | None = None,
        data_type: str | None = None,
        act_bits: int | None = None,
        act_data_type: str | None = None,
        act_group_size: int | None = None,
        act_dynamic: bool | None = None,
        scale_dtype: str | None = None,
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
        cache_dtype: str | None = None,
        enable_adam: bool | None = None,
        momentum: float | None = None,
        enable_deterministic_algorithms: bool | None = None,
        enable_alg_ext: bool | None = None,
        enable_norm_bias_tuning: bool | None = None,
        nblocks: int | None = None,
        calibrate_all_experts: bool | None = None,
        min_expert_tokens: int | None = None,
        static_kv_dtype: str | None = None,
        static_attention_dtype: str | None = None,
        recipe: str = "default",
        to_quant_block_names: str | Iterable[str] | None = None,
        mllm: bool = False,
        quant_nontext_module: bool = False,
        processor: Any = None,
        extra_data_dir: str | None = None,
        device_map: str | dict | None = None,
        dtype: str | torch.dtype | None = "auto",
        trust_remote_code: bool = False,
        low_cpu_mem_usage: bool = True,
        platform: str | None = None,
        revision: str | None = None,
        model_dtype: str | torch.dtype | None = None,
        seed: int = 42,
        **upstream_only: Any,
    ):
        self.start_time = time.time()
        tune_allocator()  # freed temporaries go back to the OS instead of piling up within a block
        _refuse_upstream_only(upstream_only)
        dtype = model_dtype or dtype  # upstream's name for the load dtype
        # 1. settings
        self.autoscheme = scheme if isinstance(scheme, AutoScheme) else None
        if self.autoscheme is not None:
            given = {k: v for k, v in dict(bits=bits, group_size=group_size, sym=sym, data_type=data_type,
                                           act_bits=act_bits, act_data_type=act_data_type, act_group_size=act_group_size,
                                           act_dynamic=act_dynamic).items() if v is not None}
            if given:
                raise ConfigError(f"{sorted(given)}: with AutoScheme the options set every layer's scheme; drop "
                                  "these settings or add an option that has them")
            # layer_config entries without a scheme of their own start from it; GGUF: the file type
            scheme = base_spec(self.autoscheme.specs)
        self.spec = resolve_scheme(
            scheme, bits, group_size, sym, data_type=data_type, act_bits=act_bits, act_data_type=act_data_type,
            act_group_size=act_group_size, act_dynamic=act_dynamic, scale_dtype=scale_dtype,
        )
        self.cfg: TuneConfig = tune_config(
            recipe, iters=iters, lr=lr, minmax_lr=minmax_lr, batch_size=batch_size,
            gradient_accumulate_steps=gradient_accumulate_steps, nsamples=nsamples, seqlen=seqlen,
            enable_minmax_tuning=enable_minmax_tuning, enable_quanted_input=enable_quanted_input,
            not_use_best_mse=not_use_best_mse, low_gpu_mem_usage=low_gpu_mem_usage, amp=amp,
            enable_torch_compile=enable_torch_compile, disable_opt_rtn=disable_opt_rtn, cache_dtype=cache_dtype,
            enable_adam=enable_adam, momentum=momentum, enable_deterministic_algorithms=enable_deterministic_algorithms,
            enable_alg_ext=enable_alg_ext, enable_norm_bias_tuning=enable_norm_bias_tuning, nblocks=nblocks,
            calibrate_all_experts=calibrate_all_experts,
            min_expert_tokens=min_expert_tokens, seed=seed,
        )
        # FP8 attention: the query too; the KV cache either way (its scales are what vLLM reads)
        attention_fp8 = parse_fp8(static_attention_dtype, "static_attention_dtype")
        self.static_attention = ("q", "k", "v") if attention_fp8 else (
            ("k", "v") if parse_fp8(static_kv_dtype, "static_kv_dtype") else ())
        self._seqlen_given = seqlen is not None
        self.dataset = DEFAULT_DATASET if dataset is None else dataset
        self.device_map = device_map
        self.seed = seed
        self.result: QuantResult | None = None
        self.summary: dict[str, Any] = {}
        self._calib: torch.Tensor | None = None
        self._calib_extras: list[dict[str, torch.Tensor]] | None = None  # image-text samples' other inputs
        self.processor = processor
        self.extra_data_dir = extra_data_dir
        self._mllm = mllm
        self._probe: torch.Tensor | None = None
        self._saved: tuple[Path, list] | None = None  # (output, exporters) of the last save
        self._loaded: nn.Module | None = None
        self.selection: Selection | None = None
        self._scoring_ids: torch.Tensor | None = None
        self._scoring_extras: list[dict[str, torch.Tensor]] | None = None
        _seed_everything(seed)
        # 2. everything that needs no weights is checked first: devices, the checkpoint's files,
        #    config, tokenizer and calibration data (a mistake costs seconds, not a model load)
        self.devmap = parse_device_map(device_map)
        if not isinstance(model, nn.Module):  # a Hub id: downloaded, or found in the cache offline
            model = resolve_model(model, revision, platform)
        self._config = load_config(model, trust_remote_code)
        self._model_path = None if isinstance(model, nn.Module) else str(model)
        self._trust_remote_code = trust_remote_code
        check_vlm_options(self._config, mllm, quant_nontext_module)  # before calibration data and weights
        self._check_seqlen()
        self.tokenizer = tokenizer
        if self.tokenizer is None and not isinstance(model, nn.Module):
            self.tokenizer = load_tokenizer(check_model_path(str(model)), trust_remote_code)
        if self.cfg.needs_data or self.spec.needs_act_range or self.static_attention:
            self.calibration_ids()
        self._autoscheme_ids()  # the run's data unless AutoScheme names its own
        # 3. model and plan
        self._model, self.tokenizer, self.source_dir, self.source = load_model_and_tokenizer(
            model, self.tokenizer, dtype=dtype, trust_remote_code=trust_remote_code,
            low_cpu_mem_usage=low_cpu_mem_usage, mllm=mllm,
        )
        self.plan: QuantPlan = build_plan(
            self._model, self.spec, layer_config, ignore_layers, quant_lm_head, to_quant_block_names,
            quant_nontext_module,
        )
        self.plan.static_attention = self.static_attention
        # AutoScheme: the layers it chooses for, their groups and the budget checked now; scoring
        # (which reads the weights) runs when quantizing starts
        self._request = prepare(self.autoscheme, self._model, self.plan, self.spec) if self.autoscheme else None

    @property
    def iters(self) -> int:
        return self.cfg.iters

    @property
    def streamed(self) -> bool:
        return self.source.streamed

    def _check_seqlen(self) -> None:
        if not self.cfg.needs_data and self.autoscheme is None:
            return
        text_cfg = self._config.get_text_config()
        ctx = getattr(text_cfg, "max_position_embeddings", None) or getattr(text_cfg, "n_positions", None)
        if ctx and self.cfg.seqlen > ctx:
            if self._seqlen_given:
                raise ConfigError(f"seqlen {self.cfg.seqlen} is longer than the model's context ({ctx}); lower --seqlen")
            logger.warning("default seqlen %d is longer than the model's context: using %d", self.cfg.seqlen, ctx)
            self.cfg.seqlen = ctx

    def _build_data(self, dataset: Any, seqlen: int, nsamples: int
                    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]] | None]:
        """Calibration ids, and for image-text data each sample's other model inputs (made by the
        model's processor; a vision-language model only)."""
        if not uses_images(dataset):
            if self.extra_data_dir:
                logger.warning("--extra_data_dir is ignored: the dataset names no image-text data (a JSON/JSONL "
                               "file whose records have an 'image')")
            return build_calibration(dataset, self.tokenizer, seqlen, nsamples, self.seed), None
        if auto_class(self._config, self._mllm).__name__ != "AutoModelForImageTextToText":
            raise ConfigError("the dataset names image-text data, but this model has no vision tower; pass a "
                              "text dataset (or leave --dataset out)")
        if self.processor is None:
            self.processor = load_processor(self._model_path, self._trust_remote_code)
        return build_image_text_calibration(dataset, self.processor, image_token_id(self._config), seqlen, nsamples,
                                            self.seed, self.extra_data_dir)

    def calibration_ids(self) -> torch.Tensor:
        """Tokenized calibration samples ``[n, seqlen]`` (validated: at least one sample); image-text
        samples' other model inputs are kept beside (``_calib_extras``)."""
        if self._calib is None:
            ids, self._calib_extras = self._build_data(self.dataset, self.cfg.seqlen, self.cfg.nsamples)
            if ids.shape[0] < self.cfg.batch_size:
                logger.warning("only %d calibration samples: batch_size lowered from %d", ids.shape[0],
                               self.cfg.batch_size)
                self.cfg.batch_size = ids.shape[0]
            self._calib = ids
        return self._calib

    def _autoscheme_ids(self) -> torch.Tensor | None:
        """AutoScheme's scoring data: the run's calibration data unless it names its own."""
        auto = self.autoscheme
        if auto is None:
            return None
        if self._scoring_ids is None:
            if auto.dataset is None and auto.nsamples is None and auto.seqlen is None:
                self._scoring_ids, self._scoring_extras = self.calibration_ids(), self._calib_extras
            else:
                self._scoring_ids, self._scoring_extras = self._build_data(
                    self.dataset if auto.dataset is None else auto.dataset,
                    auto.seqlen or self.cfg.seqlen, auto.nsamples or self.cfg.nsamples)
        return self._scoring_ids

    def choose_schemes(self) -> Selection | None:
        """AutoScheme's choice (scored once, then kept): each chosen layer's spec goes into the plan."""
        if self._request is None or self.selection is not None:
            return self.selection
        auto = self._request.auto
        devmap = parse_device_map(auto.device_map) if auto.device_map is not None else self.devmap
        cfg = dataclasses.replace(self.cfg, low_gpu_mem_usage=self.cfg.low_gpu_mem_usage or auto.low_gpu_mem_usage)
        with _deterministic(self.cfg.enable_deterministic_algorithms):
            self.selection = select(self._request, self._model, self.plan, self._autoscheme_ids(), cfg, devmap,
                                    self.source, self._scoring_extras)
        self.plan.specs.update(self.selection.specs)
        return self.selection

    def default_format(self, format: str | None = None) -> str:
        """``format``, or when none is given what the scheme implies, as upstream picks it: the GGUF
        file type of a GGUF scheme (an AutoScheme of GGUF options: the dearest), else auto_round."""
        if format is not None:
            return format
        return f"gguf:{self.plan.ggml_ftype}" if self.plan.ggml_ftype else "auto_round"

    def _check_formats(self, format: str, output_dir: str | os.PathLike) -> list:
        """The formats against the plan; before AutoScheme has chosen, against every option and a mix of
        them, so a format that cannot hold some choice is named before scoring."""
        if self._request is not None and self.selection is None:
            ftype = self.plan.ggml_ftype
            asked = {f.strip().lower() for f in format.split(",")}
            if ftype and asked != {f"gguf:{ftype}"}:
                raise ExportError(
                    f"AutoScheme over GGUF options writes one .gguf file of llama.cpp file type {ftype.upper()} (the "
                    f"dearest option, whose mix types the token embedding and output); format {format!r} cannot "
                    f"hold it: use --format gguf:{ftype}, or leave the format out")
            for label, trial in trial_plans(self.plan, self._request):
                try:
                    export.check_formats(format, self._model, trial, output_dir)
                except ExportError as e:
                    raise ExportError(f"AutoScheme option {label}: {e}") from None
        return export.check_formats(format, self._model, self.plan, output_dir)

    @property
    def needs_calibration(self) -> bool:
        return self.cfg.needs_data or self.plan.needs_act_range

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
        """The model, quantized in place once quantized (released weights come back, dequantized
        from their QParams, on first access). After a streamed quantize_and_save, whose model never
        existed whole in memory, the saved files loaded back."""
        if self.source.streamed and self._saved is not None:
            if self._loaded is None:
                self._loaded = self._returned_model(*self._saved)
            return self._loaded
        if self.result is not None and self.result.released:
            restore_weights(self._model, self.result)
        return self._model

    # -- quantize ---------------------------------------------------------------------------------
    def quantize(self) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
        """Quantize in place; returns ``(model, layer_config)`` like upstream. A streamed model
        keeps its QParams (compact codes) for ``save_quantized``; its blocks stay on the meta device."""
        if self.result is None:
            self.choose_schemes()
            self.result = self._run(sink=None, checkpoint=None, keep_weights=True)
            if self.source.streamed:
                self._load_whole()
        return self._model, self.layer_config

    def _load_whole(self) -> None:
        """After a streamed quantize(): every block back in memory with its qdq weights (the caller
        asked for the model), and the source no longer streams."""
        assert self.result is not None
        for block in self.plan.block_names:
            self.source.materialize(self._model, block)
            names = self.plan.layers_of(block)
            self.result.released.update({n: torch.device("cpu") for n in names})
            restore_weights(self._model, self.result, names)
        self.source = InMemorySource()

    def _run(self, sink: Any, checkpoint: Any, keep_weights: bool) -> QuantResult:
        device = self.devmap.primary
        if self.source.streamed:  # NaN/Inf in a weight: found before tuning, one tensor at a time
            self.source.scan_finite([n for n, s in self.plan.specs.items() if s.quantized])
        ids = self.calibration_ids() if self.needs_calibration else None
        self._probe = probe_ids_for(self._model, seed=self.seed)
        if ids is not None:
            steps = ", lr %g, minmax_lr %g" % self.cfg.lrs_for(self.spec) if self.cfg.iters else ""
            logger.info("%s on %s: %d samples x %d tokens, %d iters, batch %d%s", self.cfg.mode, device,
                        ids.shape[0], ids.shape[1], self.cfg.iters, self.cfg.batch_size, steps)
        with _deterministic(self.cfg.enable_deterministic_algorithms):
            return quantize_model(self._model, self.plan, self.cfg, ids, self.devmap, self.source, sink,
                                  keep_weights, self._probe, checkpoint, probe_stored=keep_weights,
                                  calib_extras=self._calib_extras if ids is not None else None)

    # -- save -------------------------------------------------------------------------------------
    def save_quantized(
        self, output_dir: str | os.PathLike, format: str | None = None, inplace: bool = True,
        max_shard_size: int | str | None = None, self_check: bool = True, **kwargs: Any
    ) -> Path:
        """Write the quantized model to exactly ``output_dir`` in ``format`` (several comma-separated:
        one subdirectory each, from the same tuning). ``inplace`` (upstream's meaning): the in-memory
        model's quantized layers become the packed QuantLinear layers of the first integer format
        (their float weights freed); ``inplace=False`` leaves the model as it is."""
        if self.result is None:
            raise ConfigError("call quantize() before save_quantized(), or use quantize_and_save()")
        _reject_unknown(kwargs)
        exporters = export.check_formats(self.default_format(format), self._model, self.plan, output_dir)
        partial = export.PartialDir(output_dir)
        with _guarded(partial, self._needed_bytes(exporters)):
            sink = export.ExportSink(exporters, partial.path, self._model, self.plan, self.source_dir,
                                     _shard_bytes(max_shard_size))
            self._replay(sink, reads_weights=_reads_weights(exporters))
            out = self._finish(sink, partial, exporters)
        self._saved, self._loaded = (out, exporters), None
        self._self_check(out, exporters, self_check)
        if inplace:
            self._pack_in_place(exporters)
        return out

    def _pack_in_place(self, exporters: list) -> None:
        """Upstream's ``inplace=True``: the quantized layers of the in-memory model become the packed
        layers the first integer format wrote (QuantLinear: the float weights are freed); other
        formats leave the model as it is, as ``inplace=False`` always does."""
        from .export.packing import pack_layer
        from .inference.qlinear import QuantLinear, assign_backends
        from .model.layers import get_module, in_out_features, set_module

        packed = next((e for e in exporters if hasattr(e, "packing")), None)
        if packed is None or self.result is None:
            return
        packing = packed.packing(self.plan)
        for name in [n for n in self.plan.quantized if n in self.result.qparams]:
            mod = get_module(self._model, name)
            in_f, out_f = in_out_features(mod)
            spec = self.plan.specs[name]
            dtype = next((p.dtype for p in self._model.parameters() if p.is_floating_point()), torch.float32)
            ql = QuantLinear(in_f, out_f, spec.bits, spec.group_size, packing, bias=mod.bias is not None, dtype=dtype)
            for key, value in pack_layer(self.result.qparams[name], packing).items():
                setattr(ql, key, value)
            if mod.bias is not None:
                ql.bias = mod.bias.detach().to(dtype)
            set_module(self._model, name, ql)
            self.result.released.pop(name, None)
        assign_backends(self._model, self.devmap.primary)

    def _replay(self, sink: Any, reads_weights: bool) -> None:
        """Hand the sink every block again, as the block loop would have (whole-model saves)."""
        assert self.result is not None
        for block in self.plan.block_names:
            names = self.plan.layers_of(block)
            if reads_weights:
                restore_weights(self._model, self.result, [n for n in names if n in self.result.released])
            sink.block(self._model, block, {n: self.result.qparams[n] for n in names})

    def quantize_and_save(
        self, output_dir: str | os.PathLike = "tmp_autoround", format: str | None = None, resume: bool = False,
        start_over: bool = False, self_check: bool = True, max_shard_size: int | str | None = None, **kwargs: Any
    ) -> tuple[nn.Module, Path]:
        """Check the output target, quantize while writing each block as it finishes, save.

        ``resume``: continue an interrupted run into the same ``output_dir`` after its last finished
        block (same settings required); ``start_over``: discard such a run. Returns ``(model, path)``;
        a streamed model comes back loaded from the saved files.
        """
        _reject_unknown(kwargs)
        out = self.run_and_save(output_dir, format, resume, start_over, self_check, max_shard_size)
        return self.model, out

    def run_and_save(self, output_dir: str | os.PathLike, format: str | None = None, resume: bool = False,
                     start_over: bool = False, self_check: bool = True, max_shard_size: int | str | None = None) -> Path:
        """:meth:`quantize_and_save` without loading a model to return (what the CLI runs)."""
        exporters = self._check_formats(self.default_format(format), output_dir)
        if resume and not self.source_dir:
            raise ConfigError("resume needs a model loaded from a directory (its checkpoint identifies the run)")
        partial = export.PartialDir(output_dir, resume=resume, start_over=start_over)
        checkpoint = None
        resumable = lambda: checkpoint is not None and (partial.path / "resume" / "state.json").is_file()  # noqa: E731
        with _guarded(partial, self._needed_bytes(exporters), resumable):
            if self.source_dir:
                checkpoint = self._checkpoint(partial, exporters)
                if checkpoint.autoscheme is not None and self._request is not None and self.selection is None:
                    self.selection = restore(self._request, checkpoint.autoscheme)
                    self.plan.specs.update(self.selection.specs)
            if self.choose_schemes() is not None:
                for e in exporters:
                    e.check(self.plan, self._model)
                if checkpoint is not None:
                    checkpoint.autoscheme = self.selection.record()
            self.source.materialize_outside(self._model, self.plan.block_names)
            untie_output_embedding(self._model, self.plan)
            sink = export.ExportSink(exporters, partial.path, self._model, self.plan, self.source_dir,
                                     _shard_bytes(max_shard_size), checkpoint.sink_state if checkpoint else None)
            if checkpoint is not None:
                checkpoint.sink = sink
            self.result = self._run(sink, checkpoint, keep_weights=_reads_weights(exporters))
            if checkpoint is not None:
                checkpoint.remove()
            out = self._finish(sink, partial, exporters)
        self._saved, self._loaded = (out, exporters), None
        if self.source.streamed:  # the run's own embeddings and head are not needed any more
            self.source.release_outside(self._model, self.plan.block_names)
            release_memory()
        self._self_check(out, exporters, self_check)
        return out

    def _needed_bytes(self, exporters: list) -> int:
        return sum(e.estimate_bytes(self._model, self.plan) for e in exporters)

    def _checkpoint(self, partial: Any, exporters: list) -> Any:
        from .resume import RunCheckpoint

        ids = self.calibration_ids() if self.needs_calibration else None  # AutoScheme's data: in "scheme"
        return RunCheckpoint(partial.path / "resume", self._fingerprint(exporters, ids), resume=partial.resumed)

    def _fingerprint(self, exporters: list, ids: torch.Tensor | None) -> dict[str, str]:
        """What must not change between an interrupted run and its resumption, by name."""
        from .resume import data_digest, file_digest, text_digest

        src = Path(self.source_dir)
        shards = sorted((p.name, p.stat().st_size) for p in src.glob("*.safetensors"))
        specs = sorted({s.label() for s in self.plan.quantized.values()})
        scheme = f"{self.plan.default.label()}; layers {len(self.plan.quantized)} ({', '.join(specs)})"
        if self.autoscheme is not None:  # taken before the choice, which the resume state keeps
            a, free = self.autoscheme, self._request.layer_specs
            fixed = sorted((n, s.label()) for n, s in self.plan.specs.items() if n not in free)
            scheme = (f"{a.describe()}; ignore_scale_zp_bits {a.ignore_scale_zp_bits}; shared {a.shared_layers}; "
                      f"fixed layers {text_digest(str(fixed))}; scoring data "
                      f"{data_digest(self._autoscheme_ids(), self._scoring_extras)}")
        return {
            "model": f"{src} config {file_digest(src / 'config.json')} shards {shards}",
            "scheme": scheme,
            "iters": str(self.cfg.iters),
            "tuning": str(sorted(self._config_record().items())),
            "data": data_digest(ids, self._calib_extras if ids is not None else None),
            "seed": str(self.seed),
            "formats": ",".join(e.name for e in exporters),
        }

    def _finish(self, sink: Any, partial: Any, exporters: list) -> Path:
        """The entries outside the blocks, configs, tokenizer and report; then rename into place."""
        assert self.result is not None
        report = self._report([e.name for e in exporters])
        dirs = sink.finish(self._model, self.result.qparams, self._config_record(), self.tokenizer)
        for d, e in zip(dirs, exporters):
            if self.selection is not None:  # what --layer_config FILE reuses
                (d / LAYER_CONFIG_FILE).write_text(json.dumps(self.selection.layer_config(), indent=1) + "\n")
            write_report(d, {**report, "format": e.name, "totals": self._totals(d)})
        out = partial.commit()
        self._finish_summary(out)
        return out

    def _self_check(self, out: Path, exporters: list, enabled: bool) -> None:
        """Load each saved format back and compare logits with the quantized model's."""
        from .report import read_report
        from .selfcheck import check_saved

        checks = []
        for e in exporters:
            d = out if len(exporters) == 1 else out / e.name.replace(":", "-")
            if not enabled:
                check = {"format": e.name, "status": "skipped", "reason": "--skip_self_check"}
            elif self.result is None or not self.result.probe_logits:
                check = {"format": e.name, "status": "skipped", "reason": "no probe"}
            else:
                logits = self.result.probe_logits
                # fake stores the weights in the model's dtype; the others the exact codes and scales
                ref = logits.get("stored", logits["exact"]) if getattr(e, "reads_weights", False) else logits["exact"]
                check = check_saved(d, e.name, self._probe, ref, self.plan.block_names)
            path, report = read_report(d / REPORT_FILE)
            report["self_check"] = [check]
            write_report(d, report)
            render_plot(report, d / PLOT_FILE)
            checks.append(check)
        failed = [c["format"] for c in checks if c["status"] == "failed"]
        if failed:
            raise SelfCheckFailed(
                f"self-check failed for {', '.join(failed)}: the saved files, loaded back, do not compute what was "
                f"quantized (details in {REPORT_FILE}; the output is kept at {out}). Please report this; "
                "--skip_self_check skips the check"
            )

    def _returned_model(self, out: Path, exporters: list) -> nn.Module | None:
        """The quantized model with real tensors: the in-memory one (released weights restored), or
        for a streamed run the first format's files loaded back (None for a GGUF file transformers
        cannot read)."""
        if not self.source.streamed:
            return self.model
        from .selfcheck import load_saved

        first = exporters[0]
        d = out if len(exporters) == 1 else out / first.name.replace(":", "-")
        if first.name in ("auto_round", "auto_gptq", "auto_awq", "llm_compressor"):
            from .inference.loader import load_quantized

            return load_quantized(str(d))
        if first.name.startswith("gguf:"):
            from .selfcheck import gguf_unreadable

            why = gguf_unreadable(d)
            if why is not None:  # no model to return: the file is for llama.cpp
                logger.warning("no model returned for %s: %s", d, why)
                return None
        return load_saved(d, first.name)

    # -- records ----------------------------------------------------------------------------------
    def _config_record(self) -> dict[str, Any]:
        c = self.cfg
        rec: dict[str, Any] = {"iters": c.iters}
        if c.needs_data:
            rec.update(nsamples=c.nsamples, seqlen=c.seqlen, batch_size=c.batch_size, cache_dtype=c.cache_dtype)
        if c.iters:
            lr, minmax_lr = c.lrs_for(self.spec)
            rec.update(lr=lr, minmax_lr=minmax_lr, enable_minmax_tuning=c.enable_minmax_tuning,
                       enable_quanted_input=c.enable_quanted_input)
            if c.enable_alg_ext:
                rec["enable_alg_ext"] = True
            if c.enable_norm_bias_tuning:
                rec["enable_norm_bias_tuning"] = True
            if c.nblocks != 1:
                rec["nblocks"] = c.nblocks
        return rec

    def _report(self, formats: list[str]) -> dict[str, Any]:
        from . import __version__

        assert self.result is not None
        return {
            "signround_version": __version__, "model": self.source_dir or type(self._model).__name__,
            "mode": self.cfg.mode, "settings": self._config_record(), "formats": formats,
            "streamed": self.source.streamed, "resumed_from_block": self.result.resumed_from,
            "blocks": self.result.block_stats, "layers": layer_table(self._model, self.plan),
            **({"autoscheme": self.selection.record()} if self.selection is not None else {}),
        }

    def _totals(self, directory: Path) -> dict[str, Any]:
        ids = self._calib
        return {
            **bits_summary(self._model, self.plan),
            "seconds": round(time.time() - self.start_time, 3),
            "peak_rss_bytes": peak_rss_bytes(),
            "peak_gpu_bytes": peak_gpu_bytes(),
            "calibration_tokens": int(ids.numel()) if ids is not None else 0,
            "activation_cache_bytes": self.result.cache_bytes if self.result is not None else 0,
            "output_bytes": export.dir_size(directory),
        }

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


@contextlib.contextmanager
def _guarded(partial: Any, needed_bytes: int, resumable: Any = lambda: False):
    """Whatever ends a save early: a failed write (disk full, read-only, quota, permissions, I/O)
    becomes one message and leaves nothing behind; a bad setting leaves nothing behind; an
    interruption or crash keeps the finished blocks when they can be resumed."""
    try:
        yield
    except BaseException as e:
        keep = partial.resumed  # an earlier run's finished blocks are never thrown away by this one
        if write_failure(e) is not None:
            if not keep:
                partial.discard()
            raise write_error(e, partial.target, needed_bytes, kept=partial.path if keep else None) from e
        if isinstance(e, SignRoundError) and not keep or not resumable() and not keep:
            partial.discard()
            raise
        if isinstance(e, SignRoundError):
            raise
        logger.error("stopped; the finished blocks are kept in %s: run the same command with --resume to continue "
                     "(or --start_over to discard them)", partial.path)
        raise


def _refuse_upstream_only(kwargs: dict[str, Any]) -> None:
    for name in kwargs:
        if name in UPSTREAM_ONLY:
            raise ConfigError(f"{name}: {UPSTREAM_ONLY[name]}")
    if kwargs:
        raise ConfigError(f"unknown argument(s) {sorted(kwargs)} for AutoRound; see docs/compatibility.md")


@contextlib.contextmanager
def _deterministic(enabled: bool):
    """torch's deterministic algorithms for the tuning (upstream's --enable_deterministic_algorithms)."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _reject_unknown(kwargs: dict[str, Any]) -> None:
    if kwargs:
        raise ConfigError(f"unknown option(s) {sorted(kwargs)} for saving; known: format, max_shard_size, "
                          "self_check (and resume, start_over for quantize_and_save)")


def _shard_bytes(size: int | str | None) -> int | None:
    """``max_shard_size`` as save_pretrained takes it: bytes, or "5GB" / "500MB" / "2GiB"."""
    if size is None or isinstance(size, int):
        return size
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    text = str(size).strip().upper()
    for unit, mult in units.items():
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * mult)
            except ValueError:
                break
    raise ConfigError(f"max_shard_size {size!r} is not a size; use e.g. 5GB, 500MB or a number of bytes")


def _reads_weights(exporters: list) -> bool:
    """Whether a format stores the in-memory weights of quantized layers (not just their QParams)."""
    return any(getattr(e, "reads_weights", False) for e in exporters)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


__all__ = ["AutoRound", "SelfCheckFailed", "WeightSource", "ExportError"]
