"""llama.cpp's per-tensor type choice for a file type (its "mix"), so our GGUF files hold the same
block types, tensor by tensor, as ``llama-quantize`` writes for the same file type.

The rules follow llama.cpp's ``llama_tensor_get_type`` (not Falcon):

* the output matrix, and the token embedding when it is tied to the output, get q6_k (q8_0 when
  the row does not split into 256-blocks, or for the q8_0 file type);
* an untied token embedding gets the file type's block type;
* the _S/_M/_L mixes give more bits to attn_v, ffn_down, attn_output and fused attn_qkv in the
  layers ``use_more_bits`` picks (the first and last eighth and every third in between);
* stacked expert and shared-expert tensors follow their role's rule (``ffn_down_exps`` and
  ``ffn_down_shexp`` are ``ffn_down``s); with exactly
  8 experts (Mixtral's shape) attn_v and attn_k get q8_0 and attn_output q5_k in the q2_k..q4_k_m
  mixes instead of the dense rules;
* a row length a 256-block type does not divide falls back to a 32-block type
  (q2_k, q3_k -> q4_0; q4_k -> q5_0; q5_k -> q5_1; q6_k -> q8_0), and one no 32-block type divides
  stays in floating point.

Layers tuned by SignRound get their type here, before tuning, so tuning, evaluation and the file
all use the same qdq.
"""

from __future__ import annotations

import logging
import re
from torch import nn

from ...errors import ConfigError
from ...model.layers import get_module, get_weight, tied_lm_head
from ...schemes import FP_BITS, GGML_SPECS, GGUF_FTYPES, QuantSpec
from .mapping import family_of, gguf_name, n_experts

logger = logging.getLogger(__name__)

BLOCK_SIZE = {t: (256 if t.endswith("_k") else 32) for t in GGML_SPECS}
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _mixed(ftype: str, role: str, i: int, n: int, n_gqa: int, n_expert: int = 0) -> str | None:
    """The block type a mix gives a block tensor of this role in layer ``i`` of ``n``, or None for
    the file type's own block type."""
    role = role.removesuffix("_exps").removesuffix("_shexp")  # llama.cpp matches ffn_down in every name
    if n_expert == 8 and role in ("attn_v", "attn_k"):
        return "q8_0"  # llama.cpp: "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
    if n_expert == 8 and role == "attn_output":
        return "q5_k" if ftype in ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m") else None
    if role == "attn_v":
        return {
            "q2_k": "q4_k" if n_gqa >= 4 else "q3_k",
            "q2_k_s": "q4_k" if n_gqa >= 4 else None,
            "q3_k_m": "q5_k" if i < 2 else "q4_k",
            "q3_k_l": "q5_k",
            "q4_k_m": "q6_k" if _more_bits(i, n) else None,
            "q5_k_m": "q6_k" if _more_bits(i, n) else None,
            "q4_k_s": "q5_k" if i < 4 else None,
        }.get(ftype)
    if role == "ffn_down":
        return {
            "q2_k": "q3_k",
            "q2_k_s": "q4_k" if i < n // 8 else None,
            "q3_k_m": "q5_k" if i < n // 16 else "q4_k",
            "q3_k_l": "q5_k",
            "q4_k_m": "q6_k" if _more_bits(i, n) else None,
            "q5_k_m": "q6_k" if _more_bits(i, n) else None,
            "q4_k_s": "q5_k" if i < n // 8 else None,
        }.get(ftype)
    if role == "attn_output":
        return {"q2_k": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(ftype)
    if role == "attn_qkv":
        return {"q3_k_m": "q4_k", "q3_k_l": "q4_k", "q4_k_m": "q5_k", "q5_k_m": "q6_k"}.get(ftype)
    return None


def with_fallback(ggml_type: str, n_cols: int) -> str | None:
    """The type a row of ``n_cols`` can hold: the fallback for 256-blocks, None (float) if none fits."""
    if n_cols % BLOCK_SIZE[ggml_type]:
        ggml_type = FALLBACK.get(ggml_type, ggml_type)
    return None if n_cols % BLOCK_SIZE[ggml_type] else ggml_type


def tensor_type(ftype: str, gguf_tensor: str, n_cols: int, n_layer: int, n_gqa: int, tied: bool,
                n_expert: int = 0) -> str | None:
    """llama.cpp's block type for one 2-D tensor of a file type; None keeps it in floating point."""
    base = GGUF_FTYPES[ftype]
    if gguf_tensor == "output.weight" or (tied and gguf_tensor == "token_embd.weight"):
        t = "q8_0" if base == "q8_0" or n_cols % BLOCK_SIZE[base] else "q6_k"
    elif gguf_tensor == "token_embd.weight":
        t = base
    else:
        m = re.match(r"blk\.(\d+)\.(\w+)\.weight$", gguf_tensor)
        t = (_mixed(ftype, m.group(2), int(m.group(1)), n_layer, n_gqa, n_expert) if m else None) or base
    return with_fallback(t, n_cols)


def _spec(ggml_type: str | None) -> QuantSpec:
    return GGML_SPECS[ggml_type] if ggml_type else QuantSpec(bits=FP_BITS)


class Mix:
    """llama.cpp's per-tensor choice on one model: the block type a file type gives each layer."""

    def __init__(self, model: nn.Module):
        config = model.config.get_text_config()
        self.model = model
        self.fam = family_of(model.config)
        self.n_layer = config.num_hidden_layers
        self.n_gqa = config.num_attention_heads // (getattr(config, "num_key_value_heads", None)
                                                    or config.num_attention_heads)
        self.tied = tied_lm_head(model)
        self.n_expert = n_experts(config)

    def cols(self, name: str) -> int:
        return get_weight(get_module(self.model, name)).shape[1]

    def spec(self, ftype: str, name: str, gguf_tensor: str | None = None) -> QuantSpec:
        """The spec file type ``ftype``'s rules give layer ``name`` (a row no block divides: floating point)."""
        target = gguf_tensor or gguf_name(self.fam, name + ".weight") or ""
        return _spec(tensor_type(ftype, target, self.cols(name), self.n_layer, self.n_gqa, self.tied, self.n_expert))

    def fixed(self, ggml_type: str, name: str) -> QuantSpec:
        """Layer ``name`` given a type by layer_config: a block type as it is (q2_k), a file type's own
        block type (q4_k_m: q4_k), with the fallback its row length needs."""
        return _spec(with_fallback(GGUF_FTYPES.get(ggml_type, ggml_type), self.cols(name)))


def resolve_mix(model: nn.Module, specs: dict[str, QuantSpec], lm_head: str | None,
                default: QuantSpec) -> tuple[str | None, dict[str, QuantSpec]]:
    """Give every GGUF layer in ``specs`` its block type (in place); return the file type (the default
    scheme's) and the specs of the embedding / output tensors the file type quantizes (applied with
    RTN after tuning).

    Layers of the default scheme get the types its mix gives them; a layer_config entry that is a
    GGUF scheme or block type fixes that layer's type (``{"lm_head": "GGUF:Q8_0"}``: the output in
    q8_0; AutoScheme's saved choices are block types). The output layer leaves the tuned set: with
    tied embeddings it is the embedding, quantized once for both uses, as llama.cpp stores it.
    """
    ggml = {n: s for n, s in specs.items() if s.quantized and s.ggml_type is not None}
    if not ggml:
        return None, {}
    other = sorted(n for n, s in specs.items() if s.quantized and s.ggml_type is None)
    if default.ggml_type is None or other:
        raise ConfigError(
            "a GGUF file holds GGUF block types and floating point only; this run mixes GGUF and non-GGUF schemes "
            f"({', '.join((other or sorted(ggml))[:3])}): give the GGUF scheme as --scheme (it is the file type), "
            "and layer_config entries that are GGUF schemes or {'bits': 16}"
        )
    ftype = default.ggml_type
    mix = Mix(model)
    kept = []
    for name, spec in ggml.items():
        if name == lm_head:
            continue
        specs[name] = mix.spec(ftype, name) if spec is default else mix.fixed(spec.ggml_type, name)
        if not specs[name].quantized:
            kept.append(f"{name} ({mix.cols(name)} inputs)")
    if kept:
        logger.warning("kept in floating point, no ggml block type divides their rows: %s", ", ".join(kept))
    extras: dict[str, QuantSpec] = {}
    emb_name = _module_name(model, model.get_input_embeddings())
    emb = mix.spec(ftype, emb_name, "token_embd.weight")
    if emb.quantized:
        extras[emb_name] = emb
    if lm_head is not None and lm_head in specs:
        own = specs[lm_head] if specs[lm_head].quantized and specs[lm_head] is not default else None
        specs[lm_head] = QuantSpec(bits=FP_BITS)
        if not mix.tied:
            head = mix.fixed(own.ggml_type, lm_head) if own else mix.spec(ftype, lm_head, "output.weight")
            if head.quantized:
                extras[lm_head] = head
    return ftype, extras


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError("the input embedding is not a submodule of the model")
