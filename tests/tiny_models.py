"""Tiny random-weight models of every supported architecture, built from configs (no downloads).

Sizes are chosen to exercise odd shapes: intermediate size 80 gives a short last group at group
size 32, and 80*3 bits is not a whole number of int32 words.
"""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA_LIKE = dict(vocab_size=128, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **COMMON)


def _configs():
    import transformers as t

    return {
        "llama": lambda: t.LlamaConfig(**LLAMA_LIKE),
        "mistral": lambda: t.MistralConfig(**LLAMA_LIKE),
        "qwen2": lambda: t.Qwen2Config(**LLAMA_LIKE),
        "qwen3": lambda: t.Qwen3Config(head_dim=16, **LLAMA_LIKE),
        "gemma": lambda: t.GemmaConfig(head_dim=16, **LLAMA_LIKE),
        "gemma2": lambda: t.Gemma2Config(head_dim=16, **LLAMA_LIKE),
        "gemma3": lambda: t.Gemma3TextConfig(head_dim=16, sliding_window=16, **LLAMA_LIKE),
        "phi3": lambda: t.Phi3Config(**LLAMA_LIKE),
        "opt": lambda: t.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=80, num_hidden_layers=2,
                                   num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=128,
                                   **COMMON),
        "gpt2": lambda: t.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_inner=80, n_positions=128,
                                     **COMMON),
        "gpt_neox": lambda: t.GPTNeoXConfig(vocab_size=128, hidden_size=64, intermediate_size=80,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            max_position_embeddings=128, **COMMON),
    }


MOE_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, num_experts_per_tok=2, **COMMON)


def _moe_configs():
    import transformers as t

    return {
        "qwen3_moe": lambda: t.Qwen3MoeConfig(intermediate_size=80, moe_intermediate_size=48, num_experts=8,
                                              head_dim=16, **MOE_COMMON),
        "qwen2_moe": lambda: t.Qwen2MoeConfig(intermediate_size=80, moe_intermediate_size=48, num_experts=8,
                                              shared_expert_intermediate_size=80, **MOE_COMMON),
        "mixtral": lambda: t.MixtralConfig(intermediate_size=48, num_local_experts=8, **MOE_COMMON),
    }


ARCHS = list(_configs())
MOE_ARCHS = list(_moe_configs())


def build_tiny_model(arch: str, out_dir: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config({**_configs(), **_moe_configs()}[arch]())
    with torch.no_grad():  # larger-than-default weights so quantization error is visible in logits
        for p in model.parameters():
            if p.dim() in (2, 3):  # 3-D: fused experts
                p.normal_(0, 0.1)
    model.save_pretrained(out_dir)
    return out_dir


WIDE_FAMILIES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
                 "qwen3": "Qwen3Config", "phi3": "Phi3Config", "gemma3": "Gemma3TextConfig"}


def wide_model(root: Path, tokenizer_dir: Path, tied: bool, family: str = "llama", std: float = 0.05,
               name: str | None = None) -> Path:
    """A random model whose rows split into 256-blocks (k-quants need them), with the tokenizer files
    of ``tokenizer_dir`` (stories260K: vocab 512): hidden 256, intermediate 512, 8 layers, 8 heads over
    2 kv heads (n_gqa 4). ``std``: weight scale (larger gives peakier logits); ``name``: directory name."""
    import shutil

    import transformers
    from transformers import AutoModelForCausalLM

    out = root / (name or f"wide-{family}-{'tied' if tied else 'untied'}")
    if out.exists():
        return out
    kw = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied, **COMMON)
    if family == "gemma3":  # head_dim 256 = query_pre_attn_scalar as released; a window shorter than the text
        kw.update(head_dim=256, num_attention_heads=2, num_key_value_heads=1, sliding_window=8)
    cfg = getattr(transformers, WIDE_FAMILIES[family])(**kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
            elif family == "qwen2" and p.dim() == 1 and p.shape[0] != 256:
                p.normal_(0, std)  # q/k/v biases
            elif family == "gemma3" and p.dim() == 1:
                p.normal_(0, 0.1)  # norms are stored as 1 + w: a random w checks the shift
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if "token" in f.name:
            shutil.copy(f, out / f.name)
    return out
