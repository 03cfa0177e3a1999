"""Pure quantize-dequantize functions, registered by data type.

Every function has the signature ``(w, spec, v=None, min_scale=None, max_scale=None) -> (w_qdq, QParams)``
where ``w`` is a weight in Linear layout ``[out, in]``. They are differentiable in ``v``,
``min_scale`` and ``max_scale`` (rounding uses a straight-through estimator) so the tuner can use them.
"""

from __future__ import annotations

import dataclasses
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


# data types whose groups (and super-blocks) lie within one row and that have no tensor-wide scale:
# a weight can be quantized a few rows at a time with bit-identical results
ROW_LOCAL = ("int", "int_min", "int_sym_dq", "int_asym_dq")


def qdq_in_rows(
    w: torch.Tensor,
    spec: QuantSpec,
    v: Optional[torch.Tensor] = None,
    min_scale: Optional[torch.Tensor] = None,
    max_scale: Optional[torch.Tensor] = None,
    rows: int = 512,
) -> "tuple[torch.Tensor, QParams]":
    """:func:`qdq` of a row-local data type ``rows`` rows at a time, codes kept as uint8: the float32
    temporaries of a chunk instead of a whole weight's (six of them: 280 MB for a 5632 x 2048
    layer), the same values. Other data types (NVFP4's global scale, per-tensor FP8) in one piece."""
    out_f = w.shape[0]
    if spec.data_type not in ROW_LOCAL or out_f <= rows or spec.bits > 8:
        return qdq(w, spec, v=v, min_scale=min_scale, max_scale=max_scale)
    parts = []
    for i in range(0, out_f, rows):
        sl = slice(i, i + rows)
        wq, qp = qdq(w[sl], spec, v=None if v is None else v[sl],
                     min_scale=None if min_scale is None else min_scale[sl],
                     max_scale=None if max_scale is None else max_scale[sl])
        qp.codes = qp.codes.to(torch.uint8)
        parts.append((wq, qp))
    first = parts[0][1]

    def cat(field: str) -> Optional[torch.Tensor]:
        ts = [getattr(qp, field) for _, qp in parts]
        return None if ts[0] is None else torch.cat(ts)

    fields = {f.name: getattr(first, f.name) for f in dataclasses.fields(first)}
    fields.update({f: cat(f) for f in ("scale", "zero", "codes", "super_scale", "super_min")})
    return torch.cat([wq for wq, _ in parts]), QParams(**fields)


__all__ = ["QParams", "QDQ_REGISTRY", "qdq", "qdq_in_rows", "qdq_int", "to_groups", "from_groups", "n_groups"]
