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


ARCHS = list(_configs())


def build_tiny_model(arch: str, out_dir: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_configs()[arch]())
    with torch.no_grad():  # larger-than-default weights so quantization error is visible in logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    model.save_pretrained(out_dir)
    return out_dir
