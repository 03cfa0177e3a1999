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
        # experts fused on disk too (gate/up interleaved, biases, clamped SwiGLU), alternating attention
        "gpt_oss": lambda: t.GptOssConfig(intermediate_size=48, num_local_experts=8, head_dim=16, sliding_window=16,
                                          layer_types=["sliding_attention", "full_attention"],
                                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **MOE_COMMON),
        # fused on disk (gate columns, then up), top-1 sigmoid routing that scales the expert's input,
        # a shared expert; the MoE layer is named feed_forward
        "llama4": lambda: t.Llama4TextConfig(intermediate_size=48, intermediate_size_mlp=80, num_local_experts=8,
                                             head_dim=16, interleave_moe_layer_step=1,
                                             **{**MOE_COMMON, "num_experts_per_tok": 1}),
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
                 "qwen3": "Qwen3Config", "phi3": "Phi3Config", "gemma3": "Gemma3TextConfig",
                 "qwen3_moe": "Qwen3MoeConfig", "mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig",
                 "llama4": "Llama4TextConfig", "gpt_oss": "GptOssConfig"}
# MoE families: 8 experts of 256 (k-quant rows), top-2 routing renormalized as llama.cpp computes it
WIDE_MOE = {"qwen3_moe": dict(moe_intermediate_size=256, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
            "mixtral": dict(intermediate_size=256, num_local_experts=8, num_experts_per_tok=2),
            # Qwen2-MoE: a shared expert beside them; llama.cpp does not renormalize its top-k weights
            "qwen2_moe": dict(moe_intermediate_size=256, shared_expert_intermediate_size=512, num_experts=8,
                              num_experts_per_tok=2, norm_topk_prob=False),
            # Llama 4: MoE in every second layer (a shared expert beside, sigmoid top-1), experts fused on
            # disk; no rope in every fourth layer
            "llama4": dict(intermediate_size=256, intermediate_size_mlp=512, num_local_experts=8, num_experts_per_tok=1,
                           interleave_moe_layer_step=2, head_dim=32),
            # gpt-oss: biases everywhere, attention sinks, a 16-token window in every other layer, YaRN rope;
            # experts fused on disk with gate and up interleaved
            "gpt_oss": dict(intermediate_size=256, num_local_experts=8, num_experts_per_tok=2, head_dim=32,
                            sliding_window=16, max_position_embeddings=131072)}


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
    kw.update(WIDE_MOE.get(family, {}))
    cfg = getattr(transformers, WIDE_FAMILIES[family])(**kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() in (2, 3):  # 3-D: fused experts
                p.normal_(0, std)
            elif family in ("qwen2", "qwen2_moe", "gpt_oss") and p.dim() == 1 and p.shape[0] != 256:
                p.normal_(0, std)  # q/k/v biases (gpt-oss: every bias, and the attention sinks)
            elif family == "gemma3" and p.dim() == 1:
                p.normal_(0, 0.1)  # norms are stored as 1 + w: a random w checks the shift
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if "token" in f.name:
            shutil.copy(f, out / f.name)
    return out


# Vision-language models: a tiny language model (stories260K's tokenizer plus the image tokens) beside a
# tiny vision tower; 28x28 images in 14-pixel patches.
VLM_ARCHS = ["llava", "qwen2_vl", "gemma3_vlm", "qwen3_vl"]
_TEXT = dict(vocab_size=520, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, **COMMON)
IMAGE_TOKENS = {"llava": ["<image>"], "qwen2_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
                "qwen3_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
                "gemma3_vlm": ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]}


def _vlm_config(arch: str, ids: dict[str, int]):
    import transformers as t

    if arch == "llava":
        return t.LlavaConfig(
            text_config=dict(model_type="llama", **_TEXT),
            vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32),
            image_token_index=ids["<image>"], vision_feature_select_strategy="default", vision_feature_layer=-2)
    if arch == "qwen2_vl":
        return t.Qwen2VLConfig(
            text_config=dict(**_TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
            vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], **COMMON)
    if arch == "qwen3_vl":  # deepstack: vision features of two tower layers added after text blocks 0 and 1
        return t.Qwen3VLConfig(
            text_config=dict(**_TEXT, head_dim=16, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                                  "mrope_interleaved": True}),
            vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                               deepstack_visual_indexes=[0, 1], num_position_embeddings=16),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], **COMMON)
    if arch == "gemma3_vlm":
        return t.Gemma3Config(
            text_config=dict(head_dim=16, sliding_window=16, **_TEXT),
            vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                               image_size=28, patch_size=14),
            mm_tokens_per_image=4, image_token_index=ids["<image_soft_token>"], boi_token_index=ids["<start_of_image>"],
            eoi_token_index=ids["<end_of_image>"], **COMMON)
    raise KeyError(arch)


# chat templates as the real checkpoints' render typed content: an image item becomes the model's
# image placeholder, which the processor expands into the image's tokens
_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
             "{% for c in m['content'] %}{% if c['type'] == 'image' %}IMAGE{% else %}{{ c['text'] }}{% endif %}"
             "{% endfor %}{% endif %}\n{% endfor %}")
_PLACEHOLDERS = {"llava": "<image>", "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
                 "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
                 "gemma3_vlm": "<start_of_image>"}


def _vlm_processor(arch: str, tokenizer):
    """The model's processor; Qwen2-VL's is built without its video processor, which transformers
    builds only with torchvision (not installed here): it is made in memory (see :func:`vlm_processor`)."""
    import transformers as t
    from transformers.processing_utils import ProcessorMixin

    template = _TEMPLATE.replace("IMAGE", _PLACEHOLDERS[arch])
    if arch == "llava":
        return t.LlavaProcessor(
            image_processor=image_processor(arch), tokenizer=tokenizer, patch_size=14,
            vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=template)
    if arch == "gemma3_vlm":
        return t.Gemma3Processor(image_processor=image_processor(arch), tokenizer=tokenizer, image_seq_length=4,
                                 chat_template=template)
    check = ProcessorMixin.check_argument_for_proper_class
    cls = t.Qwen3VLProcessor if arch == "qwen3_vl" else t.Qwen2VLProcessor
    try:  # transformers checks a None video processor's class too, and fails without torchvision
        ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None if arg is None else check(self, name, arg)
        return cls(image_processor=image_processor(arch), tokenizer=tokenizer, video_processor=None, chat_template=template)
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


def vlm_processor(arch: str, model_dir: Path):
    """The processor of a tiny VLM built by :func:`build_tiny_vlm`, in memory."""
    from transformers import AutoTokenizer

    return _vlm_processor(arch, AutoTokenizer.from_pretrained(str(model_dir)))


def _save_random_vlm(config, tokenizer, out_dir: Path, seed: int) -> None:
    """A VLM of ``config`` with random weights (matrices at std 0.1, vision tower too), saved with ``tokenizer``."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(str(out_dir))


def build_tiny_vlm(arch: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny random VLM of ``arch`` saved with its tokenizer (and processor, where transformers
    builds one offline), vision tower weights random too."""
    from transformers import AutoTokenizer

    # image tokens stay whole (stories260K's tokenizer splits special tokens); Gemma 3's processor finds
    # its tokens by name
    named = ({"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
             if arch == "gemma3_vlm" else {})
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), split_special_tokens=False, extra_special_tokens=named)
    tok.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS[arch]})
    ids = {t: tok.convert_tokens_to_ids(t) for t in IMAGE_TOKENS[arch]}
    _save_random_vlm(_vlm_config(arch, ids), tok, out_dir, seed)
    if arch in ("qwen2_vl", "qwen3_vl"):  # the image processor alone: AutoProcessor wants a video processor too
        image_processor(arch).save_pretrained(str(out_dir))
    else:
        _vlm_processor(arch, tok).save_pretrained(str(out_dir))
    return out_dir


def image_processor(arch: str):
    import transformers as t

    if arch == "llava":
        return t.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    if arch in ("qwen2_vl", "qwen3_vl"):  # up to 56 x 56 pixels: 1 to 4 image tokens, by the image's size
        return t.Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2,
                                       temporal_patch_size=2)
    return t.Gemma3ImageProcessor(size={"height": 28, "width": 28})


def image_inputs(arch: str, model_dir: Path, seed: int = 0) -> dict:
    """A random 28x28 image and a prompt holding its image tokens, as the model's forward takes them."""
    import json

    import numpy as np

    cfg = json.loads((model_dir / "config.json").read_text())
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    pix = image_processor(arch)(images=[img], return_tensors="pt")
    text = [5, 6, 7]
    if arch == "llava":
        ids = [1, *[cfg["image_token_index"]] * 4, *text]
    elif arch in ("qwen2_vl", "qwen3_vl"):
        ids = [1, cfg["vision_start_token_id"], cfg["image_token_id"], cfg["vision_end_token_id"], *text]
    else:
        ids = [1, cfg["boi_token_index"], *[cfg["image_token_index"]] * 4, cfg["eoi_token_index"], *text]
    out = {"input_ids": torch.tensor([ids]), **pix}
    if arch in ("qwen2_vl", "qwen3_vl"):  # which positions hold image tokens (M-RoPE), as its processor returns it
        out["mm_token_type_ids"] = (out["input_ids"] == cfg["image_token_id"]).long()
    if arch == "gemma3_vlm":
        out["token_type_ids"] = (out["input_ids"] == cfg["image_token_index"]).long()
    return out


def build_tiny_llama4_vlm(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> tuple[Path, int]:
    """A tiny random Llama 4 vision-language model (``Llama4ForConditionalGeneration``: its language model
    is a whole ``Llama4ForCausalLM``, MoE with experts fused on disk); a 28x28 image is one image token.
    Returns the directory and the image token id."""
    import transformers as t

    tok = t.AutoTokenizer.from_pretrained(str(tokenizer_dir), split_special_tokens=False)
    tok.add_special_tokens({"additional_special_tokens": ["<|image_start|>", "<|image_end|>", "<|patch|>"]})
    image_id = tok.convert_tokens_to_ids("<|patch|>")
    cfg = t.Llama4Config(
        text_config=dict(hidden_size=64, intermediate_size=48, intermediate_size_mlp=80, num_local_experts=4,
                         num_experts_per_tok=1, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, vocab_size=520, interleave_moe_layer_step=1, max_position_embeddings=256),
        # the projector's MLP takes the pixel-shuffled patches: hidden / ratio^2 channels
        vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14, vision_output_dim=64, projector_input_dim=64,
                           projector_output_dim=64, pixel_shuffle_ratio=0.5),
        image_token_index=image_id)
    _save_random_vlm(cfg, tok, out_dir, seed)
    return out_dir, image_id
