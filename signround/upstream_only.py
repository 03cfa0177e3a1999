"""Upstream AutoRound options this version does not offer, and what to do instead
(docs/compatibility.md): one table for the API's keyword arguments and the CLI's flags."""

from __future__ import annotations

_TEMPLATE = ("image-text samples are rendered with the model processor's own chat template; pass the "
             "conversation file with --dataset and its images with --extra_data_dir")
_DIFFUSION = "signround quantizes causal language models; diffusion models are not supported"
_DOUBLE_QUANT = "double quantization is set by the GGUF schemes (scheme GGUF:Q4_K_M)"

# accepted by upstream's AutoRound(...) and its CLI alike (the CLI spells them --NAME)
SHARED = {
    "super_bits": _DOUBLE_QUANT,
    "super_group_size": _DOUBLE_QUANT,
}

API_ONLY = {**SHARED, "extra_config": "pass the options as keyword arguments", "template": _TEMPLATE,
            "image_processor": "pass the whole processor (processor=...)"}

CLI_ONLY = {
    "--template": _TEMPLATE,
    **{f"--{name}": _DIFFUSION for name in ("prompt_file", "prompt", "metrics", "image_save_dir", "guidance_scale",
                                            "num_inference_steps", "generator_seed")},
    **{f"--{name}": why for name, why in SHARED.items()},
}
