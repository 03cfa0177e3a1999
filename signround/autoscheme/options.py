"""``AutoScheme``: the request (a budget and the candidate schemes) and bit accounting.

Bits are counted as upstream AutoRound counts them, so a budget means the same thing in both: a
quantized layer costs ``bits`` per weight plus, per group, a 16-bit scale and a ``bits``-wide zero
point for integer types (8-bit shared exponents / FP8 scales for MX and NV types, a 16-bit scale
per row for FP8); ``ignore_scale_zp_bits`` counts the weights alone. GGUF block types cost what
their ggml blocks take on disk. A layer kept in floating point costs 16 bits per weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import ConfigError
from ..schemes import FP_BITS, GGML_SPECS, GGUF_FTYPES, QuantSpec, preset

# bytes of one ggml block / weights in it (ggml-common.h): what a GGUF tensor of that type takes
_GGML_BLOCK = {"q4_0": (18, 32), "q4_1": (20, 32), "q5_0": (22, 32), "q5_1": (24, 32), "q8_0": (34, 32),
               "q2_k": (84, 256), "q3_k": (110, 256), "q4_k": (144, 256), "q5_k": (176, 256), "q6_k": (210, 256)}


@dataclass
class AutoScheme:
    """Mixed per-layer schemes at an average-bit budget (pass as ``AutoRound(scheme=AutoScheme(...))``).

    ``options``: candidate schemes (preset names such as ``W2A16G64``, ``MXFP4``, ``BF16``, or
    QuantSpecs / dicts), a comma-separated string or a list. ``shared_layers``: extra groups of
    layers that must share a scheme, each a list of names or patterns (a pattern groups the layers
    it matches within each block; full layer names group those layers across blocks). q/k/v,
    gate/up and the experts of one MoE layer share a scheme without being asked. ``device_map`` /
    ``batch_size``: where and in what batches scoring runs (default: the run's). ``nsamples`` /
    ``seqlen`` / ``dataset``: scoring data other than the run's calibration data. ``method``,
    ``enable_torch_compile`` and ``low_cpu_mem_usage`` are upstream's fields, accepted so its calls
    run: there is one method, and the run's own compile and streaming settings apply to scoring.
    """

    avg_bits: float
    options: str | Sequence[str | QuantSpec | Mapping[str, Any]]
    ignore_scale_zp_bits: bool = False
    shared_layers: Sequence[Sequence[str] | str] | None = None
    device_map: str | dict | None = None
    batch_size: int | None = None
    low_gpu_mem_usage: bool = True
    nsamples: int | None = None
    seqlen: int | None = None
    dataset: Any = None
    method: str = "default"
    enable_torch_compile: bool | None = None
    low_cpu_mem_usage: bool = True
    specs: list[tuple[str, QuantSpec]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.avg_bits, bool) or not isinstance(self.avg_bits, (int, float)) or not math.isfinite(self.avg_bits):
            raise ConfigError(f"AutoScheme avg_bits must be a number of bits such as 3.0, got {self.avg_bits!r}")
        if self.method != "default":
            raise ConfigError(f"AutoScheme method {self.method!r} is not offered; use method='default'")
        self.specs = parse_options(self.options)
        self.shared_layers = parse_shared_layers(self.shared_layers)
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ConfigError(f"AutoScheme batch_size must be a positive integer, got {self.batch_size!r}")

    def describe(self) -> str:
        return f"AutoScheme {self.avg_bits:g} bits over {', '.join(n for n, _ in self.specs)}"


def parse_options(options: str | Sequence[Any]) -> list[tuple[str, QuantSpec]]:
    """(name, spec) per distinct option, in the order given; options that resolve to the same
    scheme are kept once."""
    items = [o for o in options.replace(" ", "").split(",") if o] if isinstance(options, str) else list(options or [])
    out: list[tuple[str, QuantSpec]] = []
    for item in items:
        name, spec = _option(item)
        if any(spec == s for _, s in out):
            continue
        out.append((name, spec))
    if len(out) < 2:
        raise ConfigError(
            f"AutoScheme needs at least two different options to choose from, got {[n for n, _ in out] or items}; "
            "example: options='W2A16G64,W3A16G64,W4A16G64'"
        )
    gguf = [n for n, s in out if s.ggml_type is not None]
    other = [n for n, s in out if s.quantized and s.ggml_type is None]
    if gguf and other:
        raise ConfigError(
            f"AutoScheme options {gguf[0]} and {other[0]}: a GGUF file holds GGUF block types and floating point "
            "only, and other formats hold no GGUF types; choose GGUF options (BF16 may join them) or none"
        )
    return out


# llama.cpp file types, cheapest first (llama-quantize's sizes): the dearest GGUF option is the file type
_FTYPE_ORDER = ["q2_k_s", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_0", "q4_k_s", "q4_k_m", "q4_1", "q5_0",
                "q5_k_s", "q5_k_m", "q5_1", "q6_k", "q8_0"]


def base_spec(specs: list[tuple[str, QuantSpec]]) -> QuantSpec:
    """The scheme the run's plan starts from (and layer_config entries without a scheme of their own
    build on): the first quantized option; with GGUF options the dearest, whose file type sets the
    token embedding's and output's types as llama.cpp's mix of it does."""
    gguf = [s for _, s in specs if s.ggml_type is not None]
    if gguf:
        return max(gguf, key=lambda s: _FTYPE_ORDER.index(s.ggml_type))
    return next(s for _, s in specs if s.quantized)


def _option(item: Any) -> tuple[str, QuantSpec]:
    if isinstance(item, QuantSpec):
        return item.label(), item.validate(f"AutoScheme option {item.label()}")
    if isinstance(item, Mapping):
        spec = QuantSpec().with_overrides(**dict(item))
        return spec.label(), spec.validate(f"AutoScheme option {dict(item)}")
    if isinstance(item, str):
        name = item.strip().upper()
        try:
            spec = preset(name)
        except ConfigError as e:
            raise ConfigError(f"AutoScheme option {item!r}: {e}") from None
        return name, spec.validate(f"AutoScheme option {name}")
    raise ConfigError(f"AutoScheme option {item!r} is not a preset name, dict or QuantSpec")


def parse_shared_layers(value: Any) -> list[list[str]]:
    """Groups of names/patterns; a group may be given as one comma-separated string."""
    if not value:
        return []
    if isinstance(value, str):
        value = [value]
    groups = []
    for g in value:
        names = [p.strip() for p in g.split(",")] if isinstance(g, str) else [str(p).strip() for p in g]
        names = [n for n in names if n]
        if names:
            groups.append(names)
    return groups


def layer_bits(spec: QuantSpec, out_features: int, in_features: int, ignore_scale_zp_bits: bool = False) -> float:
    """Bits one layer of this shape takes under ``spec`` (see the module docstring)."""
    n = out_features * in_features
    if not spec.quantized:
        return float(FP_BITS * n)
    if spec.ggml_type is not None:
        t = GGUF_FTYPES.get(spec.ggml_type, spec.ggml_type)
        if ignore_scale_zp_bits:
            return float(GGML_SPECS[t].bits * n)
        size, per = _GGML_BLOCK[t]
        return float(out_features * math.ceil(in_features / per) * size * 8)
    weights = float(spec.bits * n)
    if ignore_scale_zp_bits:
        return weights
    gs = spec.group_size
    groups = out_features * math.ceil(in_features / gs) if gs > 0 else out_features if gs == -1 else 1
    if spec.data_type in ("mx_fp", "nv_fp"):
        return weights + groups * 8
    if spec.data_type == "fp":
        return weights + groups * 16
    return weights + groups * (16 + spec.bits)


def spec_dict(spec: QuantSpec) -> dict[str, Any]:
    """A spec as a ``layer_config`` entry (what ``--layer_config FILE`` reads back)."""
    d = {k: getattr(spec, k) for k in ("bits", "group_size", "sym", "data_type")}
    if spec.ggml_type is not None:
        d["ggml_type"] = spec.ggml_type
    if spec.act_quantized:
        d.update({k: getattr(spec, k) for k in ("act_bits", "act_data_type", "act_group_size", "act_dynamic")})
    return d


__all__ = ["AutoScheme", "base_spec", "layer_bits", "parse_options", "parse_shared_layers", "spec_dict"]
