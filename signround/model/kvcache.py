"""Static FP8 scales for attention: the KV cache (``--static_kv_dtype fp8``) and the query
(``--static_attention_dtype fp8``), measured on calibration data and applied as fake quantization.

The tensors an engine caches are the keys and values after rotary embedding, which only the
attention function sees: transformers 5 looks that function up by ``config._attn_implementation``
at every forward, so an attention module with a :class:`KVQuant` state routes through
:func:`_attention`, which observes the per-tensor absolute maxima or fake-quantizes with the
stored scales (``scale = amax / 448``, vLLM's ``k_scale`` / ``v_scale`` / ``q_scale``) and then
calls the model's own implementation. Modules without a state pass straight through.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..errors import ConfigError
from ..qdq.elements import E4M3_MAX, round_e4m3

IMPLEMENTATION = "signround_static_fp8"
FP8_NAMES = ("fp8", "float8", "float8_e4m3fn", "fp8_e4m3")
SCALE_NAMES = {"q": "q_scale", "k": "k_scale", "v": "v_scale"}
# compressed-tensors' args of a static per-tensor FP8 tensor: the kv_cache_scheme vLLM reads
FP8_TENSOR_ARGS = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "tensor",
                   "group_size": None}


def parse_fp8(value: str | None, flag: str) -> bool:
    """``--static_kv_dtype`` / ``--static_attention_dtype``: None or an FP8 spelling."""
    if value is None or str(value).lower() in ("", "none", "bf16", "bfloat16", "fp16", "float16", "auto"):
        return False
    if str(value).lower().replace("torch.", "") in FP8_NAMES:
        return True
    raise ConfigError(f"{flag} {value!r} is not supported; use fp8 (FP8 E4M3 with a static per-tensor scale)")


@dataclass
class KVQuant:
    """What one attention module does: observe maxima, or fake-quantize with the scales."""

    tensors: tuple[str, ...]  # of "q", "k", "v"
    observing: bool = True
    amax: dict[str, torch.Tensor] = field(default_factory=dict)
    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # float32, as measured

    def apply(self, module: nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
        if kind not in self.tensors:
            return x
        if self.observing:
            a = x.detach().abs().amax().float().cpu()
            self.amax[kind] = torch.maximum(self.amax[kind], a) if kind in self.amax else a
            return x
        # the module's buffer, so that the model computes with exactly what its files hold
        scale = getattr(module, SCALE_NAMES[kind]).to(x.device, torch.float32)
        return (round_e4m3(x.float() / scale) * scale).to(x.dtype)


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    state: KVQuant | None = getattr(module, "_signround_kv", None)
    if state is not None:
        query, key, value = (state.apply(module, "q", query), state.apply(module, "k", key),
                             state.apply(module, "v", value))
    base = getattr(module, "_signround_base", "sdpa")
    if base == "eager":  # each modeling file defines its own eager function
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", sdpa_attention_forward)
    else:
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(base, sdpa_attention_forward)
    return fn(module, query, key, value, *args, **kwargs)


def attention_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Attention modules: an "Attention" class with a layer index and a config (how transformers
    models' self-attention modules look), with their full names."""
    root = model.get_submodule(prefix) if prefix else model
    for name, m in root.named_modules():
        if "attention" in type(m).__name__.lower() and hasattr(m, "layer_idx") and hasattr(m, "config"):
            yield (f"{prefix}.{name}" if prefix and name else prefix or name), m


def route(model: nn.Module) -> None:
    """Send the model's attention through :func:`_attention` (modules without a state are untouched)."""
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, _attention)
    # every module's own implementation first: modules share a config, so switching as we go
    # would hide it from the next one
    for _, m in attention_modules(model):
        if m.config._attn_implementation != IMPLEMENTATION:
            m._signround_base = m.config._attn_implementation or "sdpa"
    for _, m in attention_modules(model):
        m.config._attn_implementation = IMPLEMENTATION
    if getattr(model, "config", None) is not None:
        model.config._attn_implementation = IMPLEMENTATION


def observe(modules: list[nn.Module], tensors: tuple[str, ...]) -> None:
    for m in modules:
        m._signround_kv = KVQuant(tensors)


def freeze(modules: list[nn.Module]) -> None:
    """Stop observing; the modules fake-quantize from now on with their scales, held as float32
    buffers (``k_scale`` ...) so the block's state dict carries them into the written files."""
    tiny = torch.finfo(torch.float32).tiny
    for m in modules:
        state: KVQuant = m._signround_kv
        if set(state.amax) != set(state.tensors):
            raise ConfigError(f"{type(m).__name__} saw no calibration tokens; static attention scales need some")
        for t in state.tensors:
            state.scales[t] = (state.amax[t].float() / E4M3_MAX).clamp_min(tiny).reshape(1)
            m.register_buffer(SCALE_NAMES[t], state.scales[t].clone())
        state.observing = False


def keep_float32(modules: list[nn.Module]) -> None:
    """The measured float32 scales back after the block was cast to the checkpoint's dtype (which
    rounded its buffers too): the values the model computed its probe with are what files hold."""
    for m in modules:
        state: KVQuant | None = getattr(m, "_signround_kv", None)
        for t, scale in (state.scales.items() if state is not None else ()):
            m.register_buffer(SCALE_NAMES[t], scale.clone())


def attach(module: nn.Module, scales: dict[str, torch.Tensor]) -> None:
    """A loaded module fake-quantizes with the checkpoint's scales."""
    for name, t in scales.items():
        module.register_buffer(name, t.float().reshape(1))
    module._signround_kv = KVQuant(tuple(t for t, n in SCALE_NAMES.items() if n in scales), observing=False)


__all__ = ["FP8_TENSOR_ARGS", "KVQuant", "SCALE_NAMES", "attach", "attention_modules", "freeze", "keep_float32",
           "observe", "parse_fp8", "route"]
