"""Pure quantize-dequantize functions, registered by data type.

Every function has the signature ``(w, spec, v=None, min_scale=None, max_scale=None) -> (w_qdq, QParams)``
where ``w`` is a weight in Linear layout ``[out, in]``. They are differentiable in ``v``,
``min_scale`` and ``max_scale`` (rounding uses a straight-through estimator) so the tuner can use them.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..errors import ConfigError
from ..schemes import QuantSpec
from .common import QParams, from_groups, n_groups, to_groups
from .fp import qdq_fp8, qdq_mx, qdq_nv
from .int import qdq_int, qdq_int_min
from .kquant import qdq_int_asym_dq, qdq_int_sym_dq

QdqFn = Callable[..., "tuple[torch.Tensor, QParams]"]

# data_type -> qdq function; the names are upstream AutoRound's data_type values
QDQ_REGISTRY: dict[str, QdqFn] = {
    "int": qdq_int,
    "int_min": qdq_int_min,  # GGUF Q4_1 / Q5_1
    "int_asym_dq": qdq_int_asym_dq,  # GGUF q2_k / q4_k / q5_k
    "int_sym_dq": qdq_int_sym_dq,  # GGUF q3_k / q6_k
    "mx_fp": qdq_mx,
    "nv_fp": qdq_nv,
    "fp": qdq_fp8,
}


def qdq(
    w: torch.Tensor,
    spec: QuantSpec,
    v: Optional[torch.Tensor] = None,
    min_scale: Optional[torch.Tensor] = None,
    max_scale: Optional[torch.Tensor] = None,
) -> "tuple[torch.Tensor, QParams]":
    """Quantize-dequantize ``w`` as ``spec`` says, using the registered function for its data type."""
    fn = QDQ_REGISTRY.get(spec.data_type)
    if fn is None:
        raise ConfigError(f"no qdq function for data_type {spec.data_type!r}; known: {sorted(QDQ_REGISTRY)}")
    return fn(w, spec, v=v, min_scale=min_scale, max_scale=max_scale)


__all__ = ["QParams", "QDQ_REGISTRY", "qdq", "qdq_int", "to_groups", "from_groups", "n_groups"]
