"""torch.compile'd copies of the elementwise-heavy functions tuning calls thousands of times
(qdq, the clipping search's weighted error): eager, their many full-size temporaries cost more
than the block's matmuls. Each is compiled once per key (the spec fixes the code), for fixed
shapes; after any compile failure everything runs eager for the rest of the process."""

from __future__ import annotations

import logging
from typing import Any, Callable, Hashable

import torch

logger = logging.getLogger(__name__)

_COMPILED: dict[Hashable, Callable] = {}
_BROKEN: list[str] = []


def _configure() -> None:
    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # keep the fp16 rounding of scales: without it inductor drops the fp32->fp16->fp32 round trip
    torch._inductor.config.emulate_precision_casts = True
    # compile in-process: a pool of compile workers costs hundreds of MB of RSS for a few kernels
    torch._inductor.config.compile_threads = 1


def compiled(key: Hashable, fn: Callable) -> Callable | None:
    """The compiled copy of ``fn`` kept under ``key`` (compiled on first use), or None when
    compiling has failed in this process."""
    if _BROKEN:
        return None
    if key not in _COMPILED:
        _configure()
        _COMPILED[key] = torch.compile(fn, dynamic=False)
    return _COMPILED[key]


def call(key: Hashable, fn: Callable, *args: Any) -> Any:
    """``fn(*args)``, through its compiled copy when compiling works here."""
    cfn = compiled(key, fn)
    if cfn is not None:
        try:
            return cfn(*args)
        except Exception as e:  # no compiler toolchain, unsupported backend, ...
            logger.warning("torch.compile failed (%s: %s); running eager", type(e).__name__, str(e)[:200])
            _BROKEN.append(str(e))
    return fn(*args)
