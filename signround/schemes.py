"""Quantization schemes: the `QuantSpec` that describes one Linear, presets, and per-layer resolution.

A `QuantSpec` is the only thing downstream code (qdq, tuning, export) reads about how a layer is
quantized; there are no global flags.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from .errors import ConfigError

FP_BITS = 16  # bits >= 16 means "keep this layer in floating point"
INT_BITS = (2, 3, 4, 8)

# Floating-point data types: the bits and group sizes each one is defined for (-1: per output
# channel, 0: per tensor), and the preset to suggest.
FP_TYPES: dict[str, dict[str, Any]] = {
    "mx_fp": {"bits": (4, 8), "group_size": (32,), "hint": "MXFP4 / MXFP8 (group 32)"},
    "nv_fp": {"bits": (4,), "group_size": (16,), "hint": "NVFP4 (group 16)"},
    "fp": {"bits": (8,), "group_size": (-1, 0), "hint": "FPW8A16 (per channel, -1) or per tensor (0)"},
}
# Activation data types: bits and group sizes (0: per tensor, -1: per token). ``mx_fp_rceil`` is
# MX with NVIDIA's rounding of the shared exponent, ``2**ceil(log2(amax / element_max))`` (no
# element saturates) instead of OCP's ``2**(floor(log2(amax)) - emax)``; ``int`` is symmetric int8.
ACT_TYPES: dict[str, dict[str, Any]] = {
    "mx_fp": {"bits": (4, 8), "group_size": (32,)},
    "mx_fp_rceil": {"bits": (4, 8), "group_size": (32,)},
    "nv_fp": {"bits": (4,), "group_size": (16,)},
    "fp": {"bits": (8,), "group_size": (0, -1)},
    "int": {"bits": (8,), "group_size": (-1,)},
}
# upstream AutoRound's other spellings of data types -> ours
DATA_TYPE_ALIASES = {
    "nv_fp4_with_static_gs": "nv_fp", "nv_fp4": "nv_fp", "nvfp": "nv_fp", "nvfp4": "nv_fp",
    "mxfp": "mx_fp", "mx_fp4": "mx_fp", "mx_fp8": "mx_fp", "mxfp_rceil": "mx_fp_rceil",
    "fp8": "fp", "fp8_e4m3": "fp", "int8": "int",
}


@dataclass(frozen=True)
class QuantSpec:
    """How one layer's weight is quantized.

    group_size: columns (input features) that share one scale; -1 means one group per output
    channel. The last group of a row is shorter when in_features % group_size != 0.
    sym: full-range symmetric (no zero point) when True, asymmetric with a zero point otherwise.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    data_type: str = "int"
    act_bits: int = 16
    act_data_type: str = "fp"
    act_group_size: int = 0
    act_dynamic: bool = True
    # the dtype integer scales are rounded to and stored in (upstream's scale_dtype): float16, what
    # every packed kernel reads, or bfloat16 / float32 (auto_round and llm_compressor files)
    scale_dtype: str = "float16"
    # set by GGUF schemes: a llama.cpp file type (q4_k_m) until the plan resolves it per layer to
    # the ggml block type (q4_k, q6_k, ...) the layer is tuned for and packed into
    ggml_type: str | None = None

    @property
    def act_quantized(self) -> bool:
        return self.act_bits < FP_BITS

    @property
    def needs_act_range(self) -> bool:
        """Activation quantization needs a range measured on calibration data: static FP8 scales,
        and NVFP4's per-tensor global scale."""
        return self.act_quantized and (not self.act_dynamic or self.act_data_type == "nv_fp")

    @property
    def quantized(self) -> bool:
        return self.bits < FP_BITS

    @property
    def scale_torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.scale_dtype)

    def with_overrides(self, **overrides: Any) -> "QuantSpec":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(
                f"unknown scheme option(s) {sorted(unknown)}; valid options are "
                f"{[f.name for f in dataclasses.fields(self)]}"
            )
        for key in ("data_type", "act_data_type"):
            if isinstance(overrides.get(key), str):
                overrides[key] = DATA_TYPE_ALIASES.get(overrides[key].lower(), overrides[key].lower())
        if overrides.get("scale_dtype") is not None:
            overrides["scale_dtype"] = parse_scale_dtype(overrides["scale_dtype"])
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def validate(self, where: str = "the scheme") -> "QuantSpec":
        if not isinstance(self.bits, int) or isinstance(self.bits, bool):
            raise ConfigError(f"{where}: bits must be an integer, got {self.bits!r}")
        if not self.quantized:
            return self
        if self.scale_dtype != "float16" and (self.data_type != "int" or self.ggml_type is not None):
            raise ConfigError(
                f"{where}: scale_dtype {self.scale_dtype} applies to integer schemes; "
                f"{'GGUF blocks' if self.ggml_type else self.data_type + ' scales'} have the dtype their format "
                "defines: drop --scale_dtype"
            )
        if self.data_type in FP_TYPES:
            return self._validate_fp(where)
        if self.ggml_type is not None:
            return self._validate_ggml(where)
        if self.data_type == "int_min" and self.sym:
            raise ConfigError(f"{where}: data_type 'int_min' (float minimum, GGUF Q4_1/Q5_1) is asymmetric; set sym=False")
        if self.data_type not in ("int", "int_min"):
            raise ConfigError(
                f"{where}: data_type {self.data_type!r} is not supported; use one of "
                f"{['int', 'int_min', *FP_TYPES]}"
            )
        if self.bits not in INT_BITS:
            raise ConfigError(
                f"{where}: {self.bits}-bit integer weights are not supported; choose bits from "
                f"{list(INT_BITS)} (or 16 to keep the layer in full precision)"
            )
        gs = self.group_size
        if not isinstance(gs, int) or isinstance(gs, bool) or (gs <= 0 and gs != -1):
            raise ConfigError(
                f"{where}: group_size must be a positive integer or -1 (one group per output "
                f"channel), got {gs!r}"
            )
        if self.act_quantized and (
            (self.bits, self.sym, self.data_type) != (8, True, "int")
            or (self.act_bits, self.act_data_type, self.act_group_size, self.act_dynamic) != (8, "int", -1, True)
        ):
            raise ConfigError(
                f"{where}: integer weights with quantized activations (act_bits={self.act_bits}) are W8A8: "
                "8-bit symmetric weights (per channel, group_size -1, for vLLM's kernels) with dynamic per-token "
                "int8 activations (act_data_type int, act_group_size -1); use --scheme W8A8, act_bits=16, or an "
                "FP scheme such as FP8_STATIC / MXFP8 / NVFP4"
            )
        return self

    def _validate_ggml(self, where: str) -> "QuantSpec":
        want = GGML_SPECS.get(GGUF_FTYPES.get(self.ggml_type, self.ggml_type))
        if want is None:
            raise ConfigError(
                f"{where}: unknown GGUF type {self.ggml_type!r}; known: {', '.join(sorted(set(GGUF_FTYPES) | set(GGML_SPECS)))}"
            )
        if (self.bits, self.group_size, self.sym, self.data_type) != (want.bits, want.group_size, want.sym, want.data_type):
            raise ConfigError(
                f"{where}: GGUF {self.ggml_type} is {want.bits}-bit, group {want.group_size}, "
                f"{'symmetric' if want.sym else 'asymmetric'}; drop the bits / group_size / sym overrides "
                "or choose another GGUF scheme"
            )
        return self

    def _validate_fp(self, where: str) -> "QuantSpec":
        allowed = FP_TYPES[self.data_type]
        if self.bits not in allowed["bits"] or self.group_size not in allowed["group_size"]:
            raise ConfigError(
                f"{where}: data_type {self.data_type!r} holds bits {list(allowed['bits'])} with group_size "
                f"{list(allowed['group_size'])}, got bits={self.bits}, group_size={self.group_size}; "
                f"use {allowed['hint']}"
            )
        if not self.sym:
            raise ConfigError(f"{where}: floating-point data types are symmetric; drop --asym / sym=False")
        if self.act_quantized:
            act = ACT_TYPES.get(self.act_data_type)
            if act is None:
                raise ConfigError(
                    f"{where}: act_data_type {self.act_data_type!r} is not supported; use one of {list(ACT_TYPES)}"
                )
            if self.act_data_type == "int":
                raise ConfigError(f"{where}: int8 activations go with int8 weights; use --scheme W8A8")
            if self.act_bits not in act["bits"] or self.act_group_size not in act["group_size"]:
                raise ConfigError(
                    f"{where}: act_data_type {self.act_data_type!r} holds act_bits {list(act['bits'])} with "
                    f"act_group_size {list(act['group_size'])}, got act_bits={self.act_bits}, "
                    f"act_group_size={self.act_group_size}"
                )
            if not self.act_dynamic and self.act_data_type.startswith("mx_fp"):
                raise ConfigError(f"{where}: MX activations are quantized dynamically; set act_dynamic=True")
        return self

    def label(self) -> str:
        if not self.quantized:
            return "fp16"
        if self.ggml_type is not None:
            return f"gguf {self.ggml_type}"
        if self.data_type != "int":
            act = f" A{self.act_bits} {self.act_data_type}" if self.act_quantized else ""
            return f"{self.data_type}{self.bits} G{self.group_size}{act}"
        kind = "sym" if self.sym else "asym"
        act = f" A{self.act_bits} int per token" if self.act_quantized else ""
        return f"W{self.bits}G{self.group_size} {kind}{act}"


# GGUF block types with their qdq: symmetric full-range int for the _0 types, a float minimum for
# _1, and the double-quantized k-quants (sub-block scales quantized per super-block of 256)
GGML_SPECS: dict[str, QuantSpec] = {
    "q4_0": QuantSpec(4, 32, True, "int", ggml_type="q4_0"),
    "q4_1": QuantSpec(4, 32, False, "int_min", ggml_type="q4_1"),
    "q5_0": QuantSpec(5, 32, True, "int", ggml_type="q5_0"),
    "q5_1": QuantSpec(5, 32, False, "int_min", ggml_type="q5_1"),
    "q8_0": QuantSpec(8, 32, True, "int", ggml_type="q8_0"),
    "q2_k": QuantSpec(2, 16, False, "int_asym_dq", ggml_type="q2_k"),
    "q3_k": QuantSpec(3, 16, True, "int_sym_dq", ggml_type="q3_k"),
    "q4_k": QuantSpec(4, 32, False, "int_asym_dq", ggml_type="q4_k"),
    "q5_k": QuantSpec(5, 32, False, "int_asym_dq", ggml_type="q5_k"),
    "q6_k": QuantSpec(6, 16, True, "int_sym_dq", ggml_type="q6_k"),
}

# llama.cpp file types -> the block type most tensors get; the plan gives each layer its type by
# llama.cpp's per-tensor rules (export/gguf/mixes.py). A scheme's ggml_type holds the file type
# until the plan resolves it to a block type per layer.
GGUF_FTYPES: dict[str, str] = {
    "q4_0": "q4_0", "q4_1": "q4_1", "q5_0": "q5_0", "q5_1": "q5_1", "q8_0": "q8_0",
    "q2_k": "q2_k", "q2_k_s": "q2_k",
    "q3_k_s": "q3_k", "q3_k_m": "q3_k", "q3_k_l": "q3_k",
    "q4_k_s": "q4_k", "q4_k_m": "q4_k",
    "q5_k_s": "q5_k", "q5_k_m": "q5_k",
    "q6_k": "q6_k",
}


SCALE_DTYPES = {"float16": "float16", "fp16": "float16", "half": "float16", "bfloat16": "bfloat16",
                "bf16": "bfloat16", "float32": "float32", "fp32": "float32", "float": "float32"}


def parse_scale_dtype(value: Any) -> str:
    """``fp16`` / ``bf16`` / ``fp32`` (or ``torch.bfloat16``, a torch dtype) -> float16 / bfloat16 / float32."""
    key = str(value).lower().replace("torch.", "")
    if key not in SCALE_DTYPES:
        raise ConfigError(f"scale_dtype {value!r} is not supported; use fp16 (default), bf16 or fp32")
    return SCALE_DTYPES[key]


def _w(bits: int, group_size: int = 128) -> QuantSpec:
    return QuantSpec(bits=bits, group_size=group_size, sym=True)


_W8A8 = QuantSpec(8, -1, True, "int", act_bits=8, act_data_type="int", act_group_size=-1)
_MXFP8 = QuantSpec(8, 32, True, "mx_fp", act_bits=8, act_data_type="mx_fp_rceil", act_group_size=32)

PRESETS: dict[str, QuantSpec] = {
    "W2A16": _w(2),
    "W2A16G64": _w(2, 64),
    "W2A16G32": _w(2, 32),
    "W3A16": _w(3),
    "W4A16": _w(4),
    "W8A16": _w(8),
    # W8A8: int8 per-channel weights, dynamic per-token int8 activations (compressed-tensors int-quantized)
    "W8A8": _W8A8,
    "INT8": _W8A8,
    "INT8_W8A8": _W8A8,
    # floating-point schemes, with upstream AutoRound's names and activation settings; MXFP8's
    # activations use rceil as upstream's guide gives it (no activation saturates at 448)
    "MXFP4": QuantSpec(4, 32, True, "mx_fp", act_bits=4, act_data_type="mx_fp", act_group_size=32),
    "MXFP4_RCEIL": QuantSpec(4, 32, True, "mx_fp", act_bits=4, act_data_type="mx_fp_rceil", act_group_size=32),
    "MXFP8": _MXFP8,
    "MXFP8_RCEIL": _MXFP8,
    "NVFP4": QuantSpec(4, 16, True, "nv_fp", act_bits=4, act_data_type="nv_fp", act_group_size=16),
    "MXFP4A16": QuantSpec(4, 32, True, "mx_fp"),
    "MXFP8A16": QuantSpec(8, 32, True, "mx_fp"),
    "NVFP4A16": QuantSpec(4, 16, True, "nv_fp"),
    "FPW8A16": QuantSpec(8, 0, True, "fp"),  # per tensor, as upstream's guide and scheme say
    "FP8_STATIC": QuantSpec(8, -1, True, "fp", act_bits=8, act_data_type="fp", act_group_size=0, act_dynamic=False),
    **{f"GGUF:{f.upper()}": dataclasses.replace(GGML_SPECS[t], ggml_type=f) for f, t in GGUF_FTYPES.items()},
    "BF16": QuantSpec(bits=16),
    "FP16": QuantSpec(bits=16),
}


_WXA16 = re.compile(r"W(\d+)A16(?:G(\d+))?")


def preset(name: str) -> QuantSpec:
    """A named preset; any ``W{bits}A16[G{group}]`` name is understood too (validated later)."""
    key = name.strip().upper()
    m = _WXA16.fullmatch(key)
    if key not in PRESETS and m:
        return QuantSpec(bits=int(m.group(1)), group_size=int(m.group(2) or 128), sym=True)
    if key not in PRESETS:
        raise ConfigError(
            f"unknown scheme {name!r}; choose one of {', '.join(sorted(PRESETS))} "
            "(and adjust with bits / group_size / sym)"
        )
    return PRESETS[key]


def resolve_scheme(
    scheme: str | QuantSpec | Mapping[str, Any] = "W4A16",
    bits: int | None = None,
    group_size: int | None = None,
    sym: bool | None = None,
    **overrides: Any,
) -> QuantSpec:
    """The global spec: a preset (or dict / QuantSpec) with the user's overrides applied
    (``data_type``, ``act_bits``, ``act_data_type``, ``act_group_size``, ``act_dynamic`` too)."""
    if isinstance(scheme, QuantSpec):
        base = scheme
    elif isinstance(scheme, str):
        base = preset(scheme)
    elif isinstance(scheme, Mapping):
        base = QuantSpec().with_overrides(**dict(scheme))
    else:
        raise ConfigError(f"scheme must be a preset name, a dict or a QuantSpec, got {type(scheme).__name__}")
    wants_int_acts = (overrides.get("act_bits") or FP_BITS) < FP_BITS and overrides.get("act_data_type") is None
    if wants_int_acts and (overrides.get("data_type") or base.data_type) == "int" and not base.act_quantized:
        # `--bits 8 --act_bits 8` on an integer scheme: int8 activations per token, as upstream's INT8
        overrides.update(act_data_type="int", act_group_size=overrides.get("act_group_size") or -1)
    return base.with_overrides(bits=bits, group_size=group_size, sym=sym, **overrides).validate()


def spec_from_value(value: Any, default: QuantSpec, key: str) -> QuantSpec:
    where = f"layer_config[{key!r}]"
    if isinstance(value, QuantSpec):
        return value.validate(where)
    if isinstance(value, str):
        return preset(value).validate(where)
    if isinstance(value, Mapping):
        value = dict(value)
        if "scheme" in value:
            base = preset(value.pop("scheme"))
        elif "ggml_type" in value:  # a GGUF block type (q4_k) or file type (q4_k_m), as AutoScheme saves them
            t = str(value.pop("ggml_type")).lower()
            base = GGML_SPECS[t] if t in GGML_SPECS else preset(f"GGUF:{t.upper()}")
        else:
            base = default
        allowed = {"bits", "group_size", "sym", "data_type", "act_bits", "act_data_type", "act_group_size", "act_dynamic",
                   "scale_dtype"}
        extra = set(value) - allowed
        if extra:
            raise ConfigError(f"{where}: unknown option(s) {sorted(extra)}; allowed: {sorted(allowed | {'scheme', 'ggml_type'})}")
        return base.with_overrides(**value).validate(where)
    if isinstance(value, int) and not isinstance(value, bool):
        return default.with_overrides(bits=value).validate(where)
    raise ConfigError(f"{where}: expected a preset name or a dict like {{'bits': 8}}, got {value!r}")


def name_matches(pattern: str, name: str) -> bool:
    """A key matches a layer by exact name, as a literal substring, or as a regex (re.search)."""
    if pattern == name or pattern in name:
        return True
    try:
        return re.search(pattern, name) is not None
    except re.error:
        return False


def resolve_layer_specs(
    layer_names: Iterable[str],
    default: QuantSpec,
    layer_config: Mapping[str, Any] | None = None,
    ignore_layers: Iterable[str] | None = None,
    opt_in_names: Iterable[str] = (),
) -> dict[str, QuantSpec]:
    """Pick the spec of every candidate layer.

    Precedence: an exact-name key of `layer_config` beats patterns; among pattern keys (substring or
    regex) the first listed that matches wins; `ignore_layers` patterns keep a layer in full
    precision unless an exact-name key says otherwise. Layers in `opt_in_names` (lm_head when
    `quant_lm_head` is off) are only quantized when a key names them exactly.
    Every key and ignore pattern must match at least one layer.
    """
    names = list(layer_names)
    opt_in = set(opt_in_names)
    layer_config = dict(layer_config or {})
    ignore = [p for p in (ignore_layers or []) if p]
    specs = {key: spec_from_value(v, default, key) for key, v in layer_config.items()}
    fp = QuantSpec(bits=FP_BITS)

    used: set[str] = set()
    result: dict[str, QuantSpec] = {}
    for name in names:
        if name in specs:
            result[name] = specs[name]
            used.add(name)
            continue
        chosen = None if name in opt_in else default
        if name not in opt_in:
            first = True
            for key, spec in specs.items():
                if key not in names and name_matches(key, name):
                    used.add(key)
                    if first:  # the first matching pattern wins
                        chosen, first = spec, False
            for pat in ignore:
                if name_matches(pat, name):
                    chosen = fp
                    used.add("\0ignore:" + pat)
        result[name] = chosen if chosen is not None else fp

    example = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    for key in specs:
        if key not in used:
            raise ConfigError(
                f"layer_config key {key!r} matches no quantizable layer; keys are exact names, "
                f"substrings or regexes of layer names such as {example}"
            )
    for pat in ignore:
        if "\0ignore:" + pat not in used:
            raise ConfigError(
                f"ignore_layers entry {pat!r} matches no quantizable layer; use names, substrings "
                f"or regexes of layer names such as {example}"
            )
    return result
