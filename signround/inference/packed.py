"""What a compute backend needs from a quantized layer (the QuantLinear module implements it).

Backends and kernels are written against this protocol, not against the module class, so the
backend table does not import the module that uses it.
"""

from __future__ import annotations

from typing import Protocol

import torch


class PackedLayer(Protocol):
    in_features: int
    out_features: int
    bits: int
    group_size: int
    packing: str
    scales: torch.Tensor
    bias: torch.Tensor | None

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer codes ``[in, out]`` and zero points ``[n_groups, out]``."""
        ...

    def dequantize_weight(self) -> torch.Tensor:
        """The weight as ``[out, in]`` float32."""
        ...

    def extra_repr(self) -> str:
        ...
