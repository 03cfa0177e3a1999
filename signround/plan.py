"""The quantization plan: which layers are quantized and how, resolved and validated up front."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .errors import ConfigError, ModelError
from .memory import drop_file_pages
from .model.layers import (
    find_block_names,
    get_module,
    get_weight,
    lm_head_name,
    quantizable_layer_names,
    tied_lm_head,
)
from .model.moe import block_has_experts, fused_experts_left, is_router, router_modules
from .schemes import FP_BITS, QuantSpec, spec_from_value, name_matches, resolve_layer_specs

logger = logging.getLogger(__name__)


@dataclass
class QuantPlan:
    """One QuantSpec per candidate layer (block Linears and lm_head); bits 16 keeps a layer in fp."""

    default: QuantSpec
    block_names: list[str]
    specs: dict[str, QuantSpec]
    lm_head: str | None = None
    untie_lm_head: bool = False
    block_layers: dict[str, list[str]] = field(default_factory=dict)
    ggml_ftype: str | None = None  # the llama.cpp file type of a GGUF scheme
    # tensors outside the tuned set that the file type quantizes (token embedding, output), RTN
    ggml_extras: dict[str, QuantSpec] = field(default_factory=dict)
    # MoE routers that are not Linear layers (kept in full precision; formats that list the layers
    # they keep, as upstream's extra_config does, name them too)
    routers: list[str] = field(default_factory=list)
    # attention tensors given static FP8 scales (--static_kv_dtype: "k", "v"; --static_attention_dtype:
    # "q" too), measured on calibration data and written where the format holds them
    static_attention: tuple[str, ...] = ()
    # a VLM's vision tower and projector layers (quant_nontext_module): rounded without data, since
    # text-only calibration never reaches them
    nontext: list[str] = field(default_factory=list)
    # block layers that took the default scheme (no layer_config / ignore_layers entry): what
    # AutoScheme chooses for
    defaulted: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> dict[str, QuantSpec]:
        return {n: s for n, s in self.specs.items() if s.quantized}

    @property
    def needs_act_range(self) -> bool:
        """Some layer quantizes activations with a range measured on calibration data."""
        return bool(self.static_attention) or any(s.quantized and s.needs_act_range for s in self.specs.values())

    def layers_of(self, block: str) -> list[str]:
        return [n for n in self.block_layers.get(block, []) if self.specs[n].quantized]

    def outside_blocks(self) -> list[str]:
        inside = {n for names in self.block_layers.values() for n in names}
        return [n for n, s in self.specs.items() if s.quantized and n not in inside]


def _parse_names(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def build_plan(
    model: nn.Module,
    default: QuantSpec,
    layer_config: Mapping[str, Any] | None = None,
    ignore_layers: str | Iterable[str] | None = None,
    quant_lm_head: bool = False,
    to_quant_block_names: str | Iterable[str] | None = None,
    quant_nontext_module: bool = False,
) -> QuantPlan:
    """Resolve every layer's spec and check the weights in memory, before any expensive work (a
    streamed model's are checked from its checkpoint before tuning: ``WeightSource.scan_finite``)."""
    blocks = find_block_names(model, to_quant_block_names)
    block_layers = {b: quantizable_layer_names(model, [b]) for b in blocks}
    names = [n for b in blocks for n in block_layers[b]]
    if not names:
        raise ConfigError("the selected blocks contain no Linear layers; check to_quant_block_names")
    layer_config = _check_fused_experts(model, blocks, layer_config, names)
    head = lm_head_name(model)
    nontext = _nontext_layers(model, quant_nontext_module)
    candidates = names + ([head] if head else []) + nontext
    opt_in = [] if quant_lm_head or not head else [head]
    # routers of MoE blocks stay in full precision unless a layer_config key names them exactly
    opt_in += [n for b in blocks if block_has_experts(get_module(model, b)) for n in block_layers[b] if is_router(n)]
    if quant_lm_head and not head:
        raise ConfigError("quant_lm_head was set but this model's output layer is not a Linear layer")
    specs = resolve_layer_specs(candidates, default, layer_config, _parse_names(ignore_layers), opt_in)
    if quant_lm_head and head and not specs[head].quantized and head not in (layer_config or {}):
        specs[head] = default
    from .export.gguf.mixes import resolve_mix  # the GGUF tables live with the exporter

    defaulted = [n for n in names if specs[n] is default]  # before the mix gives them block types
    ggml_ftype, ggml_extras = resolve_mix(model, specs, head, default)
    for name, spec in specs.items():
        if not spec.quantized:
            continue
        w = get_weight(get_module(model, name))
        if w.is_meta:
            continue
        if not torch.isfinite(w).all():
            raise ModelError(
                f"the weight of {name} contains NaN or Inf; the checkpoint is damaged. Re-export it, "
                f"or keep the layer out with ignore_layers={name!r} if that is expected"
            )
        # the check read a memory-mapped checkpoint's pages in; let them go until the layer's turn
        # (otherwise the whole model stays resident from here to the end: ~190 MB on SmolLM2-135M)
        drop_file_pages([w], still_used=set(), live=True)
    untie = bool(head and specs[head].quantized and tied_lm_head(model))
    if untie:
        logger.warning(
            "%s shares its weight with the input embedding; quantizing it unties them: the embedding "
            "stays in full precision, %s is stored quantized, and the saved config sets "
            "tie_word_embeddings=false",
            head,
            head,
        )
    routers = [f"{b}.{r}" for b in blocks for r in router_modules(get_module(model, b))]
    return QuantPlan(default, blocks, specs, head, untie, block_layers, ggml_ftype, ggml_extras, routers,
                     nontext=[n for n in nontext if specs[n].quantized], defaulted=defaulted)


def _nontext_layers(model: nn.Module, quant_nontext_module: bool) -> list[str]:
    """A VLM's vision and projector Linear layers when they are to be quantized (else none: they
    are kept exactly as the checkpoint has them; a text model with the option is refused from its
    config before loading, by ``model.vlm.check_vlm_options``)."""
    from .model.vlm import nontext_linear_names

    return nontext_linear_names(model) if quant_nontext_module else []


def _check_fused_experts(model: nn.Module, blocks: list[str], layer_config: Mapping[str, Any] | None,
                         linear_names: list[str]) -> Mapping[str, Any] | None:
    """Experts still fused (a layout signround cannot split into Linear layers) would silently
    stay unquantized: refused unless a layer_config key keeps them at 16 bits (that key is
    consumed here: it names no Linear layer)."""
    inside = tuple(b + "." for b in blocks)
    left = [(n, c) for n, c in fused_experts_left(model) if n.startswith(inside)]
    if not left:
        return layer_config
    rest = dict(layer_config or {})
    for name, cls in left:
        keys = [k for k in rest if name_matches(k, name)]
        if not any(spec_from_value(rest[k], QuantSpec(), k).bits >= FP_BITS for k in keys):
            short = ".".join(name.split(".")[-2:])  # e.g. mlp.experts
            raise ConfigError(
                f"{name} ({cls}) holds its experts fused in a layout signround cannot split into Linear "
                f"layers, so they cannot be quantized; to quantize the rest and keep them in full precision, "
                f"pass layer_config={{\"{short}\": {{\"bits\": 16}}}} (CLI: --layer_config "
                f"'{{\"{short}\": {{\"bits\": 16}}}}')"
            )
    used = {k for name, _ in left for k in rest if name_matches(k, name)}
    used = {k for k in used if not any(name_matches(k, n) for n in linear_names)}
    return {k: v for k, v in rest.items() if k not in used}


def untie_output_embedding(model: nn.Module, plan: QuantPlan) -> None:
    """Give lm_head its own copy of the weight so quantizing it leaves the embedding untouched."""
    if not plan.untie_lm_head or not tied_lm_head(model):
        return
    head = get_module(model, plan.lm_head)
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    for cfg in {id(model.config): model.config, id(model.config.get_text_config()): model.config.get_text_config()}.values():
        cfg.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):  # transformers >= 5 keeps the tie mapping on the model
        model.all_tied_weights_keys = {}
