"""``load_quantized``: build a model from a saved auto_round directory with QuantLinear layers."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ..devices import resolve_compute_dtype
from ..errors import ModelError
from ..export.packing import PACKINGS
from ..model.layers import QUANTIZABLE_TYPES, in_out_features, set_module
from ..model.loading import check_model_path, parse_dtype
from ..export.sink import config_names
from ..model.moe import UnfusedExperts, unfuse_experts
from ..model.source import loaded_namer
from ..schemes import QuantSpec
from .backends import BACKENDS
from .compressed import is_dequantized_format
from .qlinear import QuantLinear, assign_backends

logger = logging.getLogger(__name__)


def _regex_match(key: str, name: str) -> bool:
    try:
        return re.fullmatch(key, name) is not None
    except re.error:
        return False


def _gptq_dynamic(dynamic: dict[str, dict], name: str) -> dict | None:
    """GPTQModel ``dynamic``: ``-:regex`` skips a layer ({"bits": 16}), ``+:regex``/``regex`` overrides it."""
    for key, value in dynamic.items():
        sign, pattern = (key[0], key[2:]) if key[:2] in ("+:", "-:") else ("+", key)
        if re.match(pattern, name):
            return {"bits": 16} if sign == "-" else value
    return None


QUANT_METHODS = ("auto-round", "auto_round", "gptq", "awq")
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def _format_of(qc: dict[str, Any], path: Path) -> tuple[str, QuantSpec]:
    """(packing, default spec) of a quantization_config from signround, upstream auto-round, GPTQ or AWQ."""
    method = str(qc.get("quant_method", "")).replace("_", "-").lower()
    bits, gs = int(qc.get("bits", 4)), int(qc.get("group_size", 128))
    if method == "auto-round":
        packing = qc.get("packing_format", "auto_round:auto_gptq").replace("auto_round:gptq", "auto_round:auto_gptq")
        if packing not in PACKINGS:
            raise ModelError(f"{path}: packing_format {packing!r} is not supported; supported: {sorted(PACKINGS)}")
        if qc.get("data_type", "int") != "int":
            raise ModelError(f"{path}: data_type {qc.get('data_type')!r} is not supported yet")
        return packing, QuantSpec(bits, gs, bool(qc.get("sym", True)))
    if method == "gptq":
        if qc.get("desc_act") and not qc.get("static_groups"):
            raise ModelError(f"{path}: GPTQ with desc_act (act-order g_idx) is not supported; re-quantize with desc_act=False")
        v2 = str(qc.get("checkpoint_format", "gptq")).lower() == "gptq_v2"
        return ("auto_round" if v2 else "auto_round:auto_gptq"), QuantSpec(bits, gs, bool(qc.get("sym", True)))
    if method == "awq":
        if str(qc.get("version", "gemm")).lower() != "gemm":
            raise ModelError(f"{path}: AWQ version {qc.get('version')!r} is not supported; only gemm")
        return "auto_round:auto_awq", QuantSpec(4, gs, bool(qc.get("sym", not qc.get("zero_point", True))))
    raise ModelError(
        f"{path}: quant_method {qc.get('quant_method')!r} is not supported; signround loads auto-round, gptq, awq "
        "and compressed-tensors checkpoints"
    )


def layer_override(qc: dict[str, Any], name: str) -> dict | None:
    """A layer's entry in ``extra_config`` (exact name, then regex) or GPTQModel's ``dynamic``."""
    extra: dict[str, dict] = qc.get("extra_config") or {}
    override = extra.get(name)
    if override is None:
        override = next((v for k, v in extra.items() if _regex_match(k, name)), None)
    if override is None and qc.get("dynamic"):
        override = _gptq_dynamic(qc["dynamic"], name)
    return override


def _layer_specs(qc: dict[str, Any], default: QuantSpec, quantized: list[str]) -> dict[str, QuantSpec]:
    """Spec of each layer that has a ``qweight`` in the checkpoint: global settings + per-layer entries."""
    specs: dict[str, QuantSpec] = {}
    for name in quantized:
        override = layer_override(qc, name)
        keys = ("bits", "group_size", "sym")
        specs[name] = default.with_overrides(**{k: v for k, v in (override or {}).items() if k in keys})
    return specs


def _read_config(path: Path) -> dict[str, Any]:
    cfg = json.loads((path / "config.json").read_text())
    qc = cfg.get("quantization_config")
    if not qc:
        raise ModelError(
            f"{path} has no quantization_config; it is a full-precision model: load it with "
            "transformers.AutoModelForCausalLM.from_pretrained"
        )
    return qc




def file_namer(model: nn.Module):
    """A quantized checkpoint's tensor name -> the model's: transformers' renamings (Mixtral's
    block_sparse_moe is mlp), and expert projections under the generic gate_proj / up_proj /
    down_proj names where the architecture's checkpoints use others (upstream auto-round 0.16.1,
    loading a Mixtral whole, writes its w1 / w3 / w2 under those names)."""
    rename = loaded_namer(model)
    layout = next((m[0].layout for m in model.modules() if isinstance(m, UnfusedExperts) and len(m)), None)
    generic = {"gate_proj": layout.gate, "up_proj": layout.up, "down_proj": layout.down} if layout else {}
    if all(k == v for k, v in generic.items()):
        return rename
    pattern = re.compile(r"(.*\.experts\.\d+\.)(gate_proj|up_proj|down_proj)(\..*)")

    def name(key: str) -> str:
        key = rename(key)
        m = pattern.fullmatch(key)
        return m.group(1) + generic[m.group(2)] + m.group(3) if m else key

    return name


def _empty_model(p: Path, dtype: torch.dtype | None, device) -> tuple[nn.Module, torch.dtype]:
    """The architecture of ``p`` with weights on the meta device, and the dtype it will compute in
    (``dtype``, or chosen for ``device``: see :func:`signround.devices.default_compute_dtype`)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from ..model.vlm import auto_class

    config = AutoConfig.from_pretrained(str(p))
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    stored = getattr(config, "dtype", None) or torch.float32
    if isinstance(stored, str):
        stored = getattr(torch, stored)
    dtype = resolve_compute_dtype(device, stored, dtype)
    with init_empty_weights(include_buffers=False):
        model = auto_class(config).from_config(config, dtype=dtype)
    unfuse_experts(model)  # experts are stored per expert, as signround quantized them
    return model, dtype


def _finish(model: nn.Module, p: Path, qc: dict[str, Any], device) -> nn.Module:
    model.tie_weights()
    missing = [n for n, t in model.state_dict().items() if t.is_meta]
    if missing:
        raise ModelError(f"{p} lacks tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}; the checkpoint is incomplete")
    model.config.quantization_config = qc
    return model.to(device).eval()


def _load_compressed_tensors(p: Path, qc: dict[str, Any], shards: list[Path], device, dtype) -> nn.Module:
    from .compressed import load_compressed

    model, dtype = _empty_model(p, dtype, device)
    namer = file_namer(model)
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update({namer(k): v for k, v in load_file(str(shard)).items()})
    n = load_compressed(model, config_names(qc, namer), tensors, p, dtype)
    model = _finish(model, p, qc, device)
    logger.info("loaded %d %s layers from %s (dequantized once into float Linear layers)", n,
                qc.get("packing_format") or qc.get("quant_method"), p)
    return model


def quantized_skeleton(p: Path, qc: dict[str, Any], shards: list[Path], dtype: torch.dtype | None,
                       device: str | torch.device) -> tuple[nn.Module, torch.dtype, dict[str, QuantSpec], str]:
    """The architecture of a packed checkpoint on the meta device, its quantized layers already
    QuantLinear (buffers on meta too): (model, compute dtype, layer specs, packing)."""
    packing, default = _format_of(qc, p)
    model, dtype = _empty_model(p, dtype, device)
    namer = file_namer(model)  # the checkpoint's names (Mixtral's block_sparse_moe) -> the model's
    keys, scale_dtypes = [], {}
    for f in shards:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                keys.append(namer(k))
                if k.endswith(".scales"):  # float16, or bfloat16 / float32 (--scale_dtype)
                    scale_dtypes[namer(k)[: -len(".scales")]] = SAFETENSORS_DTYPES.get(h.get_slice(k).get_dtype())
    quantized = [k[: -len(".qweight")] for k in keys if k.endswith(".qweight")]
    specs = _layer_specs(config_names(qc, namer), default, quantized)
    modules = dict(model.named_modules())
    for name, spec in specs.items():
        mod = modules.get(name)
        if not isinstance(mod, QUANTIZABLE_TYPES):
            raise ModelError(f"{p}: {name}.qweight has no Linear layer to go with in this architecture")
        if not spec.quantized:
            raise ModelError(f"{p}: {name} holds packed weights but its config entry says bits={spec.bits}")
        in_f, out_f = in_out_features(mod)
        set_module(
            model, name,
            QuantLinear(in_f, out_f, spec.bits, spec.group_size, packing, bias=mod.bias is not None, dtype=dtype,
                        device="meta", scale_dtype=scale_dtypes.get(name) or torch.float16),
        )
    return model, dtype, specs, packing


def load_quantized(
    path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, backend: str = "auto"
) -> nn.Module:
    """Load a quantized checkpoint (auto_round from signround or upstream, GPTQ, AWQ, compressed-tensors)
    from a local directory.

    Needs no network and no upstream package; GPTQ/AWQ layers are converted to our QuantLinear.

    Quantized layers become :class:`QuantLinear` modules holding the packed tensors. ``backend``:
    ``auto`` picks per layer the best backend for the device (see ``signround.inference.backends``),
    ``packed`` the best one that keeps weights packed (memory-saving), or a backend by name.
    ``dtype`` None: the checkpoint's dtype on GPUs; on CPUs float32 unless the CPU computes the
    checkpoint's half precision natively (see :func:`signround.devices.default_compute_dtype`).
    """
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
        dtype = None if dtype == "auto" else dtype
    if backend not in ("auto", "packed", *BACKENDS):
        raise ModelError(f"unknown backend {backend!r}; choose auto, packed or one of {', '.join(BACKENDS)}")
    p = check_model_path(path)
    qc = _read_config(p)
    shards = sorted(p.glob("*.safetensors"))
    if is_dequantized_format(qc):
        return _load_compressed_tensors(p, qc, shards, device, dtype)
    model, dtype, specs, packing = quantized_skeleton(p, qc, shards, dtype, device)
    expected = set(model.state_dict().keys())
    namer = file_namer(model)
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            names = {key: namer(key) for key in f.keys()}
            unknown = {key for key, k in names.items() if k not in expected and not k.endswith(".g_idx")}
            if unknown:
                raise ModelError(f"{shard.name} holds tensors this model has no place for: {sorted(unknown)[:5]}")
            for key, k in names.items():  # one tensor at a time: memory stays the model's size
                if k not in expected:
                    continue
                v = f.get_tensor(key)
                # assign=True keeps the file's dtype; float tensors (except fp16 scales) follow the requested dtype
                v = v.to(dtype) if v.is_floating_point() and not k.endswith(".scales") else v
                model.load_state_dict({k: v}, strict=False, assign=True)
    model = _finish(model, p, qc, device)
    try:
        assign_backends(model, device, backend)
    except ValueError as e:
        raise ModelError(str(e)) from e
    logger.info("loaded %d quantized layers from %s (%s)", len(specs), p, packing)
    return model
