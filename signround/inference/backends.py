"""QuantLinear compute backends: a declarative table and the per-layer automatic choice.

Each backend says where it runs (devices), what it holds (bits, packings, group sizes, shapes),
how it ranks (priority: higher wins), what it needs installed, and how much memory its weights
take (``packed``: the int codes stay the resident copy; ``float``: a dequantized float copy is
kept). ``backend="auto"`` picks, per layer, the highest-priority backend that supports it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import triton_kernel
from .packed import PackedLayer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...]
    bits: tuple[int, ...]
    priority: int
    memory: str  # "packed" | "float"
    description: str
    supports: Callable[[PackedLayer], bool]
    prepare: Callable[[PackedLayer, torch.device, torch.dtype], dict]
    compute: Callable[[PackedLayer, dict, torch.Tensor], torch.Tensor]
    requires: Callable[[], str | None] = lambda: None  # None, or what to install


def _bias(layer: PackedLayer, x: torch.Tensor) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.to(x.dtype)


# --- torch: unpack and dequantize on every call (the reference; every bits/packing/group) ---------

def _torch_compute(layer, state, x):
    return F.linear(x, layer.dequantize_weight().to(x.dtype), _bias(layer, x))


# --- dequant_once: dequantize at the first call, keep the float weight ---------------------------

def _dequant_prepare(layer, device, dtype):
    return {"w": layer.dequantize_weight().to(device, dtype)}


def _dequant_compute(layer, state, x):
    return F.linear(x, state["w"], _bias(layer, x))


# --- int8_cpu: PyTorch's weight-only int8 kernel (per-output-channel scales) ---------------------

def _int8_supported(layer) -> bool:
    # one group per row, symmetric full range: codes - 128 fit int8 and the scale is per channel.
    # torch 2.13's kernel crashes (segfault) on bf16 inputs when in_features % 8 != 0
    if layer.group_size < layer.in_features or layer.in_features % 8:
        return False
    _, zeros = layer.unpack()
    return bool((zeros == 128).all())


def _int8_prepare(layer, device, dtype):
    codes, _ = layer.unpack()  # [in, out]
    w = (codes.t().to(torch.int16) - 128).to(torch.int8).contiguous()  # [out, in]
    return {"w": w.to(device), "s": layer.scales[0].to(device, dtype).contiguous()}


def _int8_compute(layer, state, x):
    shape = x.shape
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).contiguous(), state["w"], state["s"].to(x.dtype))
    y = y.reshape(*shape[:-1], layer.out_features)
    return y if layer.bias is None else y + _bias(layer, x)


def _has_op(name: str) -> Callable[[], str | None]:
    def check() -> str | None:
        return None if hasattr(torch.ops.aten, name) else f"a PyTorch with aten::{name} (torch>=2.6)"

    return check


# --- int4_cpu: PyTorch's weight-only int4 kernel (tinygemm layout, groups of 32..256) -------------

_INT4_GROUPS = (32, 64, 128, 256)


def _int4_supported(layer) -> bool:
    return (layer.group_size in _INT4_GROUPS and layer.in_features % layer.group_size == 0
            and layer.out_features % 8 == 0)


def _int4_prepare(layer, device, dtype):
    codes, zeros = layer.unpack()  # [in, out], [groups, out]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous().to(torch.int32), 1)
    s = layer.scales.float()
    # the kernel computes (q - 8) * scale + zero; ours is (q - z) * scale, so zero = (8 - z) * scale
    sz = torch.stack([s, (8 - zeros.float()) * s], dim=-1).contiguous()  # [groups, out, 2]
    return {"w": packed.to(device), "sz": sz.to(device, dtype)}


def _int4_compute(layer, state, x):
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, state["w"], layer.group_size, state["sz"].to(x.dtype))
    y = y.reshape(*shape[:-1], layer.out_features)
    return y if layer.bias is None else y + _bias(layer, x)


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("torch", ("cpu", "cuda", "xpu", "mps"), (2, 3, 4, 8), 0, "packed",
                "reference: unpack and dequantize every call", lambda layer: True, lambda *a: {}, _torch_compute),
        Backend("dequant_once", ("cpu", "cuda", "xpu", "mps"), (2, 3, 4, 8), 30, "float",
                "dequantize at the first call and keep the float weight (fastest on CPU, fp-sized memory)",
                lambda layer: True, _dequant_prepare, _dequant_compute),
        Backend("int8_cpu", ("cpu",), (8,), 20, "packed",
                "aten::_weight_int8pack_mm, per-channel symmetric 8-bit", _int8_supported, _int8_prepare,
                _int8_compute, _has_op("_weight_int8pack_mm")),
        Backend("int4_cpu", ("cpu",), (4,), 20, "packed",
                "aten::_weight_int4pack_mm_for_cpu, 4-bit groups of 32/64/128/256", _int4_supported, _int4_prepare,
                _int4_compute, _has_op("_weight_int4pack_mm_for_cpu")),
        Backend("triton", ("cuda",), (2, 4, 8), 40, "packed",
                "Triton kernel fusing unpack, dequantize and matmul; 2/4/8 bits, any group size",
                lambda layer: True, triton_kernel.prepare, triton_kernel.matmul, triton_kernel.missing),
    )
}


def candidates(layer: PackedLayer, device: torch.device | str) -> list[Backend]:
    """Backends that can run this layer on this device, best first."""
    dev = torch.device(device).type
    ok = [b for b in BACKENDS.values()
          if dev in b.devices and layer.bits in b.bits and b.requires() is None and b.supports(layer)]
    return sorted(ok, key=lambda b: -b.priority)


def choose(layer: PackedLayer, device: torch.device | str, wanted: str = "auto") -> Backend:
    """``wanted``: "auto", a backend name, or "packed" (the best backend keeping weights packed)."""
    if wanted not in ("auto", "packed") and wanted not in BACKENDS:
        raise ValueError(f"unknown backend {wanted!r}; choose auto, packed or one of {', '.join(BACKENDS)}")
    cands = candidates(layer, device)
    if wanted == "auto":
        return cands[0]
    if wanted == "packed":
        return next(b for b in cands if b.memory == "packed")
    b = BACKENDS[wanted]
    if b not in cands:
        why = b.requires() or (f"it runs on {'/'.join(b.devices)} with bits {b.bits}" if torch.device(device).type
                               not in b.devices or layer.bits not in b.bits else "this layer's shape or zero points")
        raise ValueError(f"backend {wanted!r} cannot run {layer.extra_repr()} on {torch.device(device).type}: {why}; "
                         f"use backend='auto'")
    return b
