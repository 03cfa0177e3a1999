"""QuantLinear: holds packed int weights and computes ``x @ W^T + b`` from them.

It supports every packing signround writes (GPTQ layout with zero offset 0 or -1, AWQ layout) and
any group size, including a short last group; how it computes is its backend's job (backends.py:
the reference "torch" backend unpacks and dequantizes on every call).
"""

from __future__ import annotations

import logging
import math
from collections import Counter

import torch
from torch import nn

from ..export.packing import PACKINGS, packed_len, unpack_awq, unpack_cols, unpack_rows
from ..qdq.common import effective_group_size
from .backends import BACKENDS, Backend, choose

logger = logging.getLogger(__name__)


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        packing: str,
        bias: bool = False,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        scale_dtype: torch.dtype = torch.float16,
    ):
        super().__init__()
        if packing not in PACKINGS:
            raise ValueError(f"unknown packing {packing!r}; known: {sorted(PACKINGS)}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.packing = bits, packing
        self.group_size = effective_group_size(group_size, in_features)
        n_groups = math.ceil(in_features / self.group_size)
        layout = PACKINGS[packing].layout
        if layout == "gptq":
            qw_shape = (packed_len(in_features, bits), out_features)
            qz_shape = (n_groups, packed_len(out_features, bits))
        else:
            qw_shape = (in_features, math.ceil(out_features / 8))
            qz_shape = (n_groups, math.ceil(out_features / 8))
        kw = {"device": device}
        self.register_buffer("qweight", torch.zeros(qw_shape, dtype=torch.int32, **kw))
        self.register_buffer("qzeros", torch.zeros(qz_shape, dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros((n_groups, out_features), dtype=scale_dtype, **kw))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw))
        else:
            self.bias = None
        # the compute backend (see backends.py) and its prepared state for one (device, dtype)
        self.backend = "torch"
        self._impl = None
        self._state: dict = {}
        self._state_key: tuple | None = None

    def set_backend(self, backend: str | Backend) -> None:
        """Use this backend (a name or a backends.Backend); prepared state is rebuilt lazily."""
        self._impl = BACKENDS[backend] if isinstance(backend, str) else backend
        self.backend = self._impl.name
        self._state, self._state_key = {}, None

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer codes ``[in, out]`` and zero points ``[n_groups, out]``."""
        p = PACKINGS[self.packing]
        if p.layout == "gptq":
            codes = unpack_rows(self.qweight, self.bits, self.in_features)
            zeros = unpack_cols(self.qzeros, self.bits, self.out_features)
        else:
            codes = unpack_awq(self.qweight, self.out_features)
            zeros = unpack_awq(self.qzeros, self.out_features)
        return codes, zeros - p.zero_offset

    def dequantize_weight(self) -> torch.Tensor:
        """The weight as ``[out, in]`` float32."""
        codes, zeros = self.unpack()
        if self.in_features % self.group_size == 0:  # whole groups: broadcast, no [in, out] gathers
            c = codes.float().view(-1, self.group_size, self.out_features)
            w = (c - zeros.float().unsqueeze(1)) * self.scales.float().unsqueeze(1)
            return w.view(self.in_features, self.out_features).t()
        g = torch.arange(self.in_features, device=codes.device) // self.group_size
        w = (codes.float() - zeros.float()[g]) * self.scales.float()[g]
        return w.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        impl = self._impl or BACKENDS[self.backend]
        if x.device.type not in impl.devices:  # moved to a device this backend does not run on
            new = choose(self, x.device)
            logger.info("%s runs on %s only; using %s on %s", impl.name, "/".join(impl.devices), new.name, x.device.type)
            self.set_backend(new)
            impl = new
        key = (x.device, x.dtype)
        if self._state_key != key:
            self._state, self._state_key = impl.prepare(self, x.device, x.dtype), key
        return impl.compute(self, self._state, x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, packing={self.packing}"
        )


def assign_backends(model: nn.Module, device: torch.device | str, wanted: str = "auto") -> Counter:
    """Pick a backend for every QuantLinear in ``model``; logs one line with the counts."""
    counts: Counter = Counter()
    dev = torch.device(device).type
    # backends for this device whose package is absent -> what to install (checked once, not per layer)
    absent = {b.name: need for b in BACKENDS.values() if dev in b.devices and (need := b.requires()) is not None}
    missing: dict[str, str] = {}  # those that would have beaten a chosen backend
    for m in model.modules():
        if isinstance(m, QuantLinear):
            chosen = choose(m, device, wanted)
            m.set_backend(chosen)
            counts[m.backend] += 1
            for name, need in absent.items():
                b = BACKENDS[name]
                if b.priority > chosen.priority and m.bits in b.bits:
                    missing[name] = need
    if counts:
        hint = "".join(f"; backend {n} needs {need}" for n, need in missing.items())
        logger.info("QuantLinear backends on %s: %s%s", dev, ", ".join(f"{n} x{c}" for n, c in counts.most_common()),
                    hint)
    return counts
