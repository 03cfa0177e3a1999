"""What the compute device can do: native bf16/fp16 on CPUs, and the dtype to compute in by default.

On CPUs without native half-precision arithmetic PyTorch converts to float32 and back around
every op, which is several times slower than computing in float32 throughout; CPUs with
AVX512-BF16 or AMX compute bf16 at about twice the float32 rate.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

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


@dataclass(frozen=True)
class DeviceMap:
    """Where tuning runs: ``devices[0]`` holds the block's inputs and outputs; a block's layers are
    spread over all ``devices`` (round robin by size) or placed by ``modules`` (name or regex of a
    module inside a block -> device)."""

    devices: tuple[torch.device, ...]
    modules: tuple[tuple[str, torch.device], ...] = ()

    @property
    def primary(self) -> torch.device:
        return self.devices[0]

    @property
    def spread(self) -> bool:
        return len(self.devices) > 1 or bool(self.modules)


def _one_device(text: str | int | torch.device, what: str) -> torch.device:
    from .errors import ConfigError

    if isinstance(text, torch.device):
        dev = text
    else:
        t = str(text).strip().lower()
        if t.isdigit():
            t = f"cuda:{t}"
        try:
            dev = torch.device(t)
        except RuntimeError as e:
            raise ConfigError(f"{what}: {text!r} is not a device; use cpu, cuda, cuda:N, N (a GPU index) or auto") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{what}: {text!r} needs a CUDA GPU and this machine has none; use --device_map cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{what}: GPU {dev.index} does not exist (this machine has "
                              f"{torch.cuda.device_count()}); use 0..{torch.cuda.device_count() - 1} or cpu")
    elif dev.type not in ("cpu", "xpu", "mps"):
        raise ConfigError(f"{what}: device type {dev.type!r} is not supported; use cpu or cuda")
    return dev


def parse_device_map(device_map: str | int | dict | torch.device | None) -> DeviceMap:
    """``None``/"auto": every visible GPU (else the CPU); "cpu", "cuda", "cuda:1", "1" or 1 (a GPU
    index, as upstream's guide writes it); "0,1,2": several GPUs; a dict: modules inside a block
    (exact name or regex, e.g. ``{"self_attn": 0, "mlp.experts": 1}``) -> device. Checked against
    the machine before anything is loaded."""
    from .errors import ConfigError

    what = "--device_map"
    if device_map is None or (isinstance(device_map, str) and device_map.strip().lower() == "auto"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return DeviceMap(tuple(torch.device(f"cuda:{i}") for i in range(n)) or (torch.device("cpu"),))
    if isinstance(device_map, dict):
        if not device_map:
            raise ConfigError(f"{what}: an empty dict places nothing; give module name -> device entries")
        modules = tuple((str(k), _one_device(v, f"{what} entry {k!r}")) for k, v in device_map.items())
        devs = tuple(dict.fromkeys(d for _, d in modules))
        return DeviceMap(devs, modules)
    if isinstance(device_map, str) and "," in device_map:
        devs = tuple(dict.fromkeys(_one_device(p, what) for p in device_map.split(",") if p.strip()))
        if not devs:
            raise ConfigError(f"{what}: {device_map!r} names no device")
        return DeviceMap(devs)
    return DeviceMap((_one_device(device_map, what),))
