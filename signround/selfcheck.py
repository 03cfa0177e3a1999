"""Export self-check: load what was saved with the loader meant for it and compare its logits on a
small probe batch with the quantized model's, as tuned and evaluated.

The reference logits come from the probe batch carried through the quantized chain during the
run (float32 blocks with the baked qdq weights), so the check works for streamed runs too, where
the whole quantized model never exists in memory. Packing bugs, wrong configs and misnamed tensors
all show up as a large relative difference; float rounding (fp16 scales, float32 vs the tuning's
arithmetic) stays far below the tolerance.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .model.capture import _StopForward
from .tune.pipeline import head_logits

logger = logging.getLogger(__name__)

# Relative Frobenius difference of the logits; what passes is ~1e-4..1e-3 (see tests/test_selfcheck.py).
TOLERANCE = 1e-2


def load_saved(directory: Path, format_name: str) -> nn.Module:
    """The saved model, loaded as its users load it: our loader (packed weights, reference backend,
    float32) for the packed and compressed-tensors formats, transformers for fake and GGUF."""
    from transformers import AutoModelForCausalLM

    if format_name.startswith("gguf:"):
        (gguf_file,) = [p.name for p in directory.glob("*.gguf")]
        return AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf_file, dtype=torch.float32).eval()
    if format_name == "fake":
        return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    from .inference.loader import load_quantized

    return load_quantized(str(directory), device="cpu", dtype=torch.float32, backend="torch")


@torch.no_grad()
def probe_logits(model: nn.Module, probe_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the output layer on ``probe_ids``, computed in float32 from its inputs (the same
    computation as the reference, whatever the model does after its head)."""
    head = model.get_output_embeddings()
    seen: list[torch.Tensor] = []

    def stop(_m, args):
        seen.append(args[0])
        raise _StopForward

    handle = head.register_forward_pre_hook(stop)
    try:
        model(input_ids=probe_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return head_logits(head, seen[0])


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def estimated_load_bytes(directory: Path, format_name: str) -> int:
    size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    # packed formats load about as stored; fake/GGUF are loaded as float32 (from bf16/fp16 or ~4.5 bits)
    return size * (8 if format_name.startswith("gguf:") else 2 if format_name == "fake" else 1)


def check_saved(directory: Path, format_name: str, probe_ids: torch.Tensor, reference: torch.Tensor,
                tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Load ``directory`` and compare; returns the record report.json keeps."""
    import psutil

    need = estimated_load_bytes(directory, format_name)
    free = psutil.virtual_memory().available
    if need > 0.8 * free:
        logger.warning("self-check of %s skipped: loading it back needs about %.1f GB, %.1f GB are free "
                       "(--skip_self_check silences this)", format_name, need / 1e9, free / 1e9)
        return {"format": format_name, "status": "skipped", "reason": "not enough free memory to load it back"}
    try:
        model = load_saved(directory, format_name)
        logits = probe_logits(model, probe_ids)
    except Exception as e:  # noqa: BLE001 - any failure to load or run is the finding
        logger.error("self-check of %s: the saved files do not load or run: %s", format_name, e)
        return {"format": format_name, "status": "failed", "error": f"{type(e).__name__}: {e}"}
    del model
    if logits.shape != reference.shape:
        return {"format": format_name, "status": "failed",
                "error": f"logits shape {tuple(logits.shape)} differs from the reference's {tuple(reference.shape)}"}
    diff = relative_difference(logits, reference)
    status = "passed" if diff <= tolerance else "failed"
    log = logger.info if status == "passed" else logger.error
    log("self-check of %s: relative logit difference %.2e against the quantized model (tolerance %.0e): %s",
        format_name, diff, tolerance, status)
    return {"format": format_name, "status": status, "relative_difference": diff, "tolerance": tolerance,
            "probe_tokens": int(probe_ids.numel())}
