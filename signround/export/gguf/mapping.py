"""Hugging Face -> GGUF: one small explicit table per model family (tensor names, hyperparameters).

Only families listed here are exported; anything else is refused before tuning with the list.
Llama-family q/k weights are permuted from Hugging Face's rotate-half rope layout to the
interleaved one llama.cpp computes with (rows only, so packed blocks are permuted as rows too).
Gemma3's RMSNorm multiplies by ``1 + weight``; llama.cpp multiplies by the stored weight, so its
norm weights are written shifted by +1. Llama 4 rotates adjacent pairs as llama.cpp does (no
permutation); its MLPs sit under ``feed_forward``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ...errors import ExportError


@dataclass(frozen=True)
class Family:
    arch: str  # GGUF general.architecture
    permute_qk: bool = False
    # HF name (with {i} for the block index) -> GGUF name
    tensors: dict[str, str] = field(default_factory=dict)
    norm_shift: float = 0.0  # added to every "*norm.weight" tensor
    # MoE: the per-expert Linear's name -> the stacked tensor holding every expert of a layer
    # (``blk.{i}.ffn_gate_exps.weight``: torch shape [experts, out, in], as llama.cpp reads it)
    experts: dict[str, str] = field(default_factory=dict)


_LLAMA_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}
_BIASES = {
    f"model.layers.{{i}}.self_attn.{p}_proj.bias": f"blk.{{i}}.attn_{p}.bias" for p in ("q", "k", "v")
}
_QK_NORM = {
    "model.layers.{i}.self_attn.q_norm.weight": "blk.{i}.attn_q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "blk.{i}.attn_k_norm.weight",
}

# Phi-3 keeps q/k/v and gate/up fused; llama.cpp's phi3 graph takes them fused too (NEOX rope: no permutation)
_PHI3_TENSORS = {
    **{k: v for k, v in _LLAMA_TENSORS.items() if "_proj" not in k},
    "model.layers.{i}.self_attn.qkv_proj.weight": "blk.{i}.attn_qkv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.mlp.gate_up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}

# Gemma3: four norms per layer (sandwich norms around attention and MLP) plus q/k norms
_GEMMA3_TENSORS = {
    **_LLAMA_TENSORS,
    **_QK_NORM,
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.post_attention_norm.weight",
    "model.layers.{i}.pre_feedforward_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.post_feedforward_layernorm.weight": "blk.{i}.post_ffw_norm.weight",
}

# MoE blocks: attention as in the dense tables; the router (kept in float32, as llama.cpp's converter
# keeps it) and the experts stacked per projection
_ROUTER = {"model.layers.{i}.mlp.gate.weight": "blk.{i}.ffn_gate_inp.weight"}
_STACKED = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
# Qwen2-MoE's shared expert and its sigmoid gate (a [1, hidden] Linear, a 1-D tensor in llama.cpp)
_SHARED = {
    **{f"model.layers.{{i}}.mlp.shared_expert.{p}_proj.weight": f"blk.{{i}}.ffn_{p}_shexp.weight"
       for p in ("gate", "up", "down")},
    "model.layers.{i}.mlp.shared_expert_gate.weight": "blk.{i}.ffn_gate_inp_shexp.weight",
}

# Llama 4 text: dense and MoE layers interleaved, both under feed_forward; the router and the shared expert
_LLAMA4_TENSORS = {
    **{k.replace(".mlp.", ".feed_forward."): v for k, v in _LLAMA_TENSORS.items()},
    "model.layers.{i}.feed_forward.router.weight": "blk.{i}.ffn_gate_inp.weight",
    **{f"model.layers.{{i}}.feed_forward.shared_expert.{p}_proj.weight": f"blk.{{i}}.ffn_{p}_shexp.weight"
       for p in ("gate", "up", "down")},
}

# gpt-oss: biases on attention, router and experts, per-head attention sinks, a norm after attention
_GPT_OSS_TENSORS = {
    **{k: v for k, v in _LLAMA_TENSORS.items() if ".mlp." not in k},
    **_BIASES,
    "model.layers.{i}.self_attn.o_proj.bias": "blk.{i}.attn_output.bias",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.post_attention_norm.weight",
    "model.layers.{i}.self_attn.sinks": "blk.{i}.attn_sinks.weight",
    "model.layers.{i}.mlp.router.weight": "blk.{i}.ffn_gate_inp.weight",
    "model.layers.{i}.mlp.router.bias": "blk.{i}.ffn_gate_inp.bias",
}

FAMILIES: dict[str, Family] = {
    "llama": Family("llama", True, _LLAMA_TENSORS),
    "mistral": Family("llama", True, _LLAMA_TENSORS),
    "qwen2": Family("qwen2", False, {**_LLAMA_TENSORS, **_BIASES}),
    "qwen3": Family("qwen3", False, {**_LLAMA_TENSORS, **_QK_NORM}),
    "phi3": Family("phi3", False, _PHI3_TENSORS),
    "gemma3_text": Family("gemma3", False, _GEMMA3_TENSORS, norm_shift=1.0),
    "qwen3_moe": Family("qwen3moe", False, {**_LLAMA_TENSORS, **_QK_NORM, **_ROUTER}, experts=_STACKED),
    "qwen2_moe": Family("qwen2moe", False, {**_LLAMA_TENSORS, **_BIASES, **_ROUTER, **_SHARED}, experts=_STACKED),
    # Mixtral is llama.cpp's llama architecture with experts (w1 gate, w3 up, w2 down)
    "mixtral": Family("llama", True, {**_LLAMA_TENSORS, **_ROUTER},
                      experts={"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}),
    "llama4_text": Family("llama4", False, _LLAMA4_TENSORS, experts=_STACKED),
    "gpt_oss": Family("gpt-oss", False, _GPT_OSS_TENSORS, experts=_STACKED),
}

_EXPERT = re.compile(r".*\.layers\.(\d+)\.(?:mlp|feed_forward)\.experts\.(\d+)\.(\w+)\.(weight|bias)$")


def expert_slot(hf_name: str) -> int | None:
    """The expert index of a per-expert weight or bias (``...mlp.experts.7.down_proj.weight`` -> 7), else None."""
    m = _EXPERT.fullmatch(hf_name)
    return int(m.group(2)) if m else None


def n_experts(config: Any) -> int:
    return int(getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0)


def family_of(config: Any) -> Family:
    fam = FAMILIES.get(getattr(config, "model_type", None))
    from ...model.vlm import is_multimodal

    if is_multimodal(config):
        raise ExportError(
            f"GGUF export covers language models; this is the vision-language {getattr(config, 'model_type', '?')!r} "
            "(llama.cpp keeps a vision tower in a separate mmproj file, which signround does not write): use "
            "--format auto_round or llm_compressor"
        )
    if fam is None:
        raise ExportError(
            f"GGUF export supports the model families {', '.join(sorted(FAMILIES))}; this model is "
            f"{getattr(config, 'model_type', '?')!r}: use --format auto_round or llm_compressor"
        )
    return fam


def gguf_name(fam: Family, hf_name: str) -> str | None:
    """The GGUF tensor name of a Hugging Face parameter name, or None when the family has none
    (every expert of a layer maps to the layer's stacked tensor)."""
    e = _EXPERT.fullmatch(hf_name)
    if e is not None:
        stacked = fam.experts.get(e.group(3))
        return None if stacked is None else f"blk.{e.group(1)}.{stacked}.{e.group(4)}"
    m = re.match(r"(.*\.layers\.)(\d+)(\..*)", hf_name)
    key, idx = (m.group(1) + "{i}" + m.group(3), m.group(2)) if m else (hf_name, None)
    target = fam.tensors.get(key)
    return None if target is None else target.format(i=idx)


def permute_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rotate-half rope rows -> interleaved (llama.cpp's order); works on any ``[out, ...]`` tensor."""
    out = rows.shape[0]
    return rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def qk_heads(fam: Family, config: Any, gguf_tensor: str) -> int | None:
    """How many heads to permute a tensor by (q: attention heads, k: kv heads), or None."""
    if not fam.permute_qk:
        return None
    if gguf_tensor.endswith("attn_q.weight"):
        return config.num_attention_heads
    if gguf_tensor.endswith("attn_k.weight"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def _rope(config: Any) -> tuple[dict, dict | None]:
    """(global-layer rope parameters, sliding-window-layer rope parameters or None)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in rope:  # per-layer-type parameters (Gemma3)
        return rope["full_attention"], rope.get("sliding_attention")
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return rope, None


def _gemma3(config: Any, head_dim: int, swa_rope: dict | None) -> list[tuple[str, Any]]:
    # llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 62-layer 27B)
    # and has no key for another scale; refuse a config it would run differently
    expected = config.hidden_size // config.num_attention_heads if config.num_hidden_layers == 62 else head_dim
    if getattr(config, "query_pre_attn_scalar", expected) != expected:
        raise ExportError(
            f"this Gemma3 config scales attention by query_pre_attn_scalar={config.query_pre_attn_scalar}, but "
            f"llama.cpp uses {expected} for this shape; use --format auto_round"
        )
    kv: list[tuple[str, Any]] = []
    if getattr(config, "final_logit_softcapping", None):
        kv.append(("add_final_logit_softcapping", float(config.final_logit_softcapping)))
    types = getattr(config, "layer_types", None) or []
    if getattr(config, "sliding_window", None) and "sliding_attention" in types:
        kv += [("add_sliding_window", config.sliding_window),
               ("add_sliding_window_pattern", [t == "sliding_attention" for t in types])]
        if swa_rope:
            kv.append(("add_rope_freq_base_swa", float(swa_rope.get("rope_theta", 10000.0))))
    return kv


# what llama.cpp's llama4 graph fixes rather than reads: chunked attention over 8192 tokens in three
# layers of four (the fourth global and without rope), attention temperature tuning of those layers
_LLAMA4_FIXED = {"attention_chunk_size": 8192, "floor_scale": 8192, "attn_scale": 0.1, "attn_temperature_tuning": True}


def _llama4(config: Any) -> list[tuple[str, Any]]:
    for key, value in _LLAMA4_FIXED.items():
        if getattr(config, key, value) != value:
            raise ExportError(f"this Llama 4 config has {key}={getattr(config, key)!r}; llama.cpp's llama4 graph "
                              f"fixes it at {value!r}; use --format auto_round")
    n = config.num_hidden_layers
    if list(getattr(config, "no_rope_layers", None) or []) != [int((i + 1) % 4 != 0) for i in range(n)]:
        raise ExportError("this Llama 4 config skips rope on other layers than every fourth, which llama.cpp's llama4 "
                          "graph assumes; use --format auto_round")
    step = int(getattr(config, "interleave_moe_layer_step", 1) or 0)
    moe = list(getattr(config, "moe_layers", None) or [])
    if not step or moe != [i for i in range(n) if (i + 1) % step == 0]:
        raise ExportError(f"this Llama 4 config's MoE layers {moe} are not every {step}th layer, as llama.cpp's llama4 "
                          "graph places them; use --format auto_round")
    if getattr(config, "use_qk_norm", True) != (n_experts(config) != 128):
        raise ExportError("llama.cpp's llama4 graph normalizes q and k unless the model has 128 experts, and this "
                          f"config has use_qk_norm={config.use_qk_norm}; use --format auto_round")
    return [("add_interleave_moe_layer_step", step), ("add_expert_feed_forward_length", int(config.intermediate_size))]


def _gpt_oss(config: Any) -> list[tuple[str, Any]]:
    # llama.cpp's gpt-oss graph fixes the clamped SwiGLU's limit (7) and alpha (1.702)
    if float(getattr(config, "swiglu_limit", 7.0)) != 7.0:
        raise ExportError(f"this gpt-oss config clamps its SwiGLU at {config.swiglu_limit}; llama.cpp's graph fixes "
                          "7.0; use --format auto_round")
    kv: list[tuple[str, Any]] = [("add_expert_feed_forward_length", int(config.intermediate_size))]
    # llama.cpp requires the window; the pattern says which layers use it
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return kv + [("add_sliding_window", int(getattr(config, "sliding_window", None) or 0)),
                 ("add_sliding_window_pattern", [t == "sliding_attention" for t in types])]


def _moe(fam: Family, config: Any) -> list[tuple[str, Any]]:
    # llama.cpp renormalizes the top-k routing weights of qwen3moe and llama (Mixtral), not qwen2moe's;
    # Llama 4 weighs each expert by its own sigmoid (no renormalization either); gpt-oss takes a softmax
    # over the chosen experts' logits
    if fam.arch in ("llama4", "gpt-oss"):
        return [("add_expert_count", n_experts(config)), ("add_expert_used_count", int(config.num_experts_per_tok)),
                *(_llama4(config) if fam.arch == "llama4" else _gpt_oss(config))]
    renorm = fam.arch != "qwen2moe"
    if bool(getattr(config, "norm_topk_prob", renorm)) != renorm:
        raise ExportError(f"this MoE config {'does not renormalize' if renorm else 'renormalizes'} its top-k routing "
                          f"weights (norm_topk_prob={not renorm}), but llama.cpp's {fam.arch} graph "
                          f"{'does' if renorm else 'does not'}; use --format auto_round")
    if fam.arch == "qwen2moe" and getattr(config, "tie_word_embeddings", False):
        raise ExportError("llama.cpp's qwen2moe graph needs its own output tensor, and this config ties it to the "
                          "embedding; use --format auto_round")
    if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
        raise ExportError("this MoE config has dense MLP layers between its MoE layers, which llama.cpp's "
                          f"{fam.arch} graph does not build; use --format auto_round")
    kv = [("add_expert_count", n_experts(config)), ("add_expert_used_count", int(config.num_experts_per_tok))]
    if getattr(config, "moe_intermediate_size", None):
        kv.append(("add_expert_feed_forward_length", int(config.moe_intermediate_size)))
    if getattr(config, "shared_expert_intermediate_size", None):
        kv.append(("add_expert_shared_feed_forward_length", int(config.shared_expert_intermediate_size)))
    return kv


def hyperparameters(fam: Family, config: Any) -> list[tuple[str, Any]]:
    """(GGUFWriter method name, value) pairs of the architecture's metadata."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope, swa_rope = _rope(config)
    kv = [
        ("add_context_length", config.max_position_embeddings),
        ("add_embedding_length", config.hidden_size),
        ("add_block_count", config.num_hidden_layers),
        # Llama 4: the dense layers' size (intermediate_size is its experts')
        ("add_feed_forward_length", getattr(config, "intermediate_size_mlp", None) or config.intermediate_size),
        ("add_head_count", config.num_attention_heads),
        ("add_head_count_kv", getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
        ("add_rope_dimension_count", int(head_dim * (getattr(config, "partial_rotary_factor", None) or 1.0))),
        ("add_rope_freq_base", float(rope["rope_theta"])),
        ("add_layer_norm_rms_eps", float(config.rms_norm_eps)),
        ("add_vocab_size", config.vocab_size),
    ]
    if fam.arch in ("qwen3", "qwen3moe", "gemma3", "llama4", "gpt-oss") or head_dim * config.num_attention_heads != config.hidden_size:
        kv += [("add_key_length", head_dim), ("add_value_length", head_dim)]
    if fam.arch == "phi3" and getattr(config, "sliding_window", None):
        kv.append(("add_sliding_window", config.sliding_window))
    if fam.arch == "gemma3":
        kv += _gemma3(config, head_dim, swa_rope)
    if fam.experts:
        kv += _moe(fam, config)
    scaling = rope.get("rope_type", "default")
    if scaling == "linear":
        from gguf import RopeScalingType  # the gguf extra, present whenever a GGUF is written

        kv += [("add_rope_scaling_type", RopeScalingType.LINEAR), ("add_rope_scaling_factor", float(rope["factor"]))]
    elif scaling == "yarn":
        kv += _yarn(rope, config)
    elif scaling not in ("default", None):
        raise ExportError(f"rope scaling {scaling!r} is not mapped to GGUF yet; use --format auto_round")
    return kv


# YaRN as llama.cpp computes it: the correction range from beta_fast / beta_slow, which it does not
# read from the file, and the attention factor 0.1 ln(factor) + 1
_YARN_FIXED = {"beta_fast": 32.0, "beta_slow": 1.0}


def _yarn(rope: dict, config: Any) -> list[tuple[str, Any]]:
    from gguf import RopeScalingType

    for key, value in _YARN_FIXED.items():
        if float(rope.get(key, value)) != value:
            raise ExportError(f"this config's YaRN rope has {key}={rope[key]}; llama.cpp uses {value}; use --format auto_round")
    factor = float(rope["factor"])
    if rope.get("attention_factor") not in (None, 0.1 * math.log(factor) + 1.0):
        raise ExportError(f"this config's YaRN rope scales attention by {rope['attention_factor']}, which llama.cpp "
                          "does not read; use --format auto_round")
    orig = int(rope.get("original_max_position_embeddings") or config.max_position_embeddings)
    return [("add_rope_scaling_type", RopeScalingType.YARN), ("add_rope_scaling_factor", factor),
            ("add_rope_scaling_orig_ctx_len", orig)]
