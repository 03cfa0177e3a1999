"""What the compute device can do: native bf16/fp16 on CPUs, and the dtype to compute in by default.

On CPUs without native half-precision arithmetic PyTorch converts to float32 and back around
every op, which is several times slower than computing in float32 throughout; CPUs with
AVX512-BF16 or AMX compute bf16 at about twice the float32 rate.
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)


def _cpu_flag(name: str) -> bool:
    check = getattr(getattr(torch, "cpu", None), name, None)
    return bool(check()) if check is not None else False


@functools.cache  # asked on every block forward; the CPU does not change
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX tiles: bf16 matmuls at about twice the fp32 rate."""
    return _cpu_flag("_is_avx512_bf16_supported") or _cpu_flag("_is_amx_tile_supported")


@functools.cache
def cpu_has_native_fp16() -> bool:
    """AMX-FP16 (Granite Rapids and newer)."""
    return _cpu_flag("_is_amx_fp16_supported")


def default_compute_dtype(device: torch.device | str, stored: torch.dtype) -> torch.dtype:
    """The dtype to run a model in on ``device`` when the user gave none.

    GPUs (and other accelerators) compute in the checkpoint's dtype. CPUs keep a half-precision
    checkpoint in half precision only where they compute it natively (fp16 with AMX-FP16, else
    bf16 with AVX512-BF16/AMX) and use float32 otherwise.
    """
    dev = torch.device(device).type
    if dev != "cpu" or stored not in (torch.float16, torch.bfloat16):
        return stored
    if stored == torch.float16 and cpu_has_native_fp16():
        return torch.float16
    if cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def resolve_compute_dtype(device: torch.device | str, stored: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    """``requested`` when given, else :func:`default_compute_dtype`, logged when it differs from ``stored``."""
    if requested is not None:
        return requested
    chosen = default_compute_dtype(device, stored)
    if chosen != stored:
        why = "native on this CPU" if chosen != torch.float32 else "this CPU has no native half-precision arithmetic"
        logger.info("computing in %s on %s (checkpoint %s; %s; pass dtype= to choose)",
                    str(chosen).replace("torch.", ""), torch.device(device).type, str(stored).replace("torch.", ""), why)
    return chosen
