"""Export self-check: load what was saved and compare its logits on a small probe batch with the
quantized model's, as tuned and evaluated. Safetensors outputs are read back block by block (the
loaders' own skeletons: QuantLinear for the packed formats, compressed-tensors dequantized per
block, plain transformers for fake), so the check's memory is about two blocks; GGUF is loaded
whole by transformers when it fits in memory.

The reference logits come from the probe batch carried through the quantized chain during the
run (float32 blocks with the baked qdq weights), so the check works for streamed runs too, where
the whole quantized model never exists in memory. Packing bugs, wrong configs and misnamed tensors
all show up as a large relative difference; float rounding (fp16 scales, float32 vs the tuning's
arithmetic) stays far below the tolerance.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .memory import malloc_trim
from .model.capture import _StopForward
from .model.source import WeightSource
from .tune.pipeline import head_logits

logger = logging.getLogger(__name__)

# Relative Frobenius difference of the logits; what passes is ~1e-4..1e-3 (see tests/test_selfcheck.py).
TOLERANCE = 1e-2


def load_saved(directory: Path, format_name: str) -> nn.Module:
    """The saved model, loaded as its users load it: our loader (packed weights, reference backend,
    float32) for the packed and compressed-tensors formats, transformers for fake and GGUF."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .model.vlm import auto_class

    if format_name.startswith("gguf:"):
        (gguf_file,) = [p.name for p in directory.glob("*.gguf")]
        with _expert_size_read():
            return AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf_file, dtype=torch.float32).eval()
    if format_name == "fake":
        cls = auto_class(AutoConfig.from_pretrained(str(directory)))
        return cls.from_pretrained(str(directory), dtype=torch.float32).eval()
    from .inference.loader import load_quantized

    return load_quantized(str(directory), device="cpu", dtype=torch.float32, backend="torch")


# GGUF keys transformers' reader leaves unread, so any other size than the config default fails to load
_UNREAD = {"qwen3_moe": {"expert_feed_forward_length": "moe_intermediate_size"},
           "qwen2_moe": {"expert_feed_forward_length": "moe_intermediate_size",
                         "expert_shared_feed_forward_length": "shared_expert_intermediate_size"}}


@contextlib.contextmanager
def _expert_size_read():
    """transformers' GGUF reader leaves a Qwen3-MoE / Qwen2-MoE file's expert sizes unread; map them
    to the config's names while loading (the keys llama.cpp itself reads)."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    added = []
    for arch, keys in _UNREAD.items():
        table = GGUF_CONFIG_MAPPING.get(arch)
        for key, attr in keys.items():
            if table is not None and key not in table:
                table[key] = attr
                added.append((table, key))
    try:
        yield
    finally:
        for table, key in added:
            table.pop(key, None)


def gguf_unreadable(directory: Path) -> str | None:
    """Why transformers cannot load this GGUF file back, or None: it has no reader for some
    architectures (llama4), and reads llama-architecture files (Mixtral's) as a dense Llama, without
    their experts."""
    from gguf import GGUFReader

    (path,) = directory.glob("*.gguf")
    fields = GGUFReader(str(path)).fields
    arch = bytes(fields["general.architecture"].parts[-1]).decode()
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    # transformers' names for llama.cpp's: qwen3moe -> qwen3_moe, gpt-oss -> gpt_oss
    if arch not in GGUF_SUPPORTED_ARCHITECTURES and arch.replace("moe", "_moe").replace("-", "_") not in GGUF_SUPPORTED_ARCHITECTURES:
        return (f"transformers has no GGUF reader for the {arch} architecture; "
                "benchmarks/check_gguf_families_llamacpp.py checks such files with llama.cpp")
    if arch == "gpt-oss" and any(k.startswith("gpt-oss.rope.scaling.") for k in fields):
        return ("transformers' gpt-oss GGUF reader takes each rope-scaling key's length for its value (its YaRN "
                "factor comes out wrong or fails); benchmarks/check_gguf_families_llamacpp.py checks such files "
                "with llama.cpp")
    count = fields.get(f"{arch}.expert_count")
    if arch == "llama" and count is not None and int(count.parts[-1][0]) > 0:
        return ("transformers reads llama-architecture GGUF files without their experts; "
                "benchmarks/check_gguf_families_llamacpp.py checks such files with llama.cpp")
    return None


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
    # GGUF is loaded whole by transformers, as float32 (from ~4.5 bits a weight)
    return size * 8 if format_name.startswith("gguf:") else size


class _CompressedSource(WeightSource):
    """compressed-tensors layers dequantized block by block into a meta skeleton's Linears."""

    streamed = True

    def __init__(self, path: Path, model: nn.Module, qc: dict, dtype: torch.dtype):
        from .model.source import checkpoint_index

        from .export.sink import config_names
        from .inference.loader import file_namer

        namer = file_namer(model)  # the checkpoint's names -> the model's (Mixtral's block_sparse_moe)
        self.path, self.qc, self.dtype = path, config_names(qc, namer), dtype
        self.index = {namer(k): (file, entry) for k, (file, entry) in checkpoint_index(path).items()}

    def _load(self, model: nn.Module, keep, dtype: torch.dtype) -> None:
        from safetensors import safe_open

        from .inference.compressed import load_compressed

        tensors = {}
        for key, (file, entry) in self.index.items():
            if keep(key):
                with safe_open(str(file), "pt") as f:
                    tensors[key] = f.get_tensor(entry["__key__"])
        if tensors:
            load_compressed(model, self.qc, tensors, self.path, dtype)

    def materialize(self, model: nn.Module, prefix: str) -> None:
        mod = model.get_submodule(prefix)
        if any(p.is_meta for p in mod.parameters()):
            self._load(model, lambda k: k.startswith(prefix + "."), torch.float32)

    def materialize_outside(self, model: nn.Module, blocks: list[str]) -> None:
        inside = tuple(b + "." for b in blocks)
        self._load(model, lambda k: not k.startswith(inside), self.dtype)
        model.tie_weights()  # assign=True loading replaced the embedding a tied head shares

    def release(self, model: nn.Module, prefix: str) -> None:
        for mod in model.get_submodule(prefix).modules():
            for leaf, t in list(mod._parameters.items()):
                if t is not None:
                    mod._parameters[leaf] = nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=False)


def _streamed(directory: Path, format_name: str) -> tuple[nn.Module, WeightSource]:
    """The saved model as a meta skeleton in its own dtype and a source reading it block by block."""
    import json

    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from .model.loading import skeleton_dtype
    from .model.vlm import auto_class
    from .model.moe import unfuse_experts
    from .model.source import SafetensorsSource

    qc = json.loads((directory / "config.json").read_text()).get("quantization_config") or {}
    config = AutoConfig.from_pretrained(str(directory))
    dtype = skeleton_dtype(config, directory, "auto")
    if format_name == "fake" or not qc:
        with init_empty_weights(include_buffers=False):
            model = auto_class(config).from_config(config, dtype=dtype)
        model.tie_weights()
        unfuse_experts(model)
        return model, SafetensorsSource(directory, model)
    from .inference.compressed import is_dequantized_format

    if is_dequantized_format(qc):
        from .inference.loader import _empty_model

        model, _ = _empty_model(directory, dtype, "cpu")
        model.tie_weights()
        return model, _CompressedSource(directory, model, qc, dtype)
    from .inference.loader import quantized_skeleton

    shards = sorted(directory.glob("*.safetensors"))
    model, _, _, _ = quantized_skeleton(directory, qc, shards, dtype, "cpu")
    model.tie_weights()
    return model, SafetensorsSource(directory, model)


@torch.no_grad()
def streamed_probe_logits(directory: Path, format_name: str, probe_ids: torch.Tensor,
                          blocks: list[str]) -> torch.Tensor:
    """The probe through the saved model one block at a time, in float32 (blocks are upcast as they
    come; the embeddings and head stay in the checkpoint's dtype): memory about two blocks."""
    from .model.capture import block_forward, capture_block_inputs, float32_hidden, inputs_after_blocks

    model, source = _streamed(directory, format_name)
    model.eval()
    source.materialize_outside(model, blocks)
    source.materialize(model, blocks[0])
    out_len = capture_block_inputs(model, blocks, probe_ids[:1], 1, "cpu").output_len  # block 0 runs as stored
    with float32_hidden(model):
        cap = capture_block_inputs(model, blocks, probe_ids, probe_ids.shape[0], "cpu", output_len=out_len)
    h = cap.hidden
    for name in blocks:
        source.materialize(model, name)
        blk = model.get_submodule(name)
        blk.float()
        h = block_forward(blk, h, cap.kwargs[name]).float()
        source.release(model, name)
        del blk
        malloc_trim()  # give the block's pages back before the next one
    head = model.get_output_embeddings()
    with float32_hidden(model):
        x = inputs_after_blocks(model, blocks, h, probe_ids, head, out_len, probe_ids.shape[0])
    return head_logits(head, x)


def check_saved(directory: Path, format_name: str, probe_ids: torch.Tensor, reference: torch.Tensor,
                blocks: list[str], tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Load ``directory`` and compare; returns the record report.json keeps."""
    import psutil

    try:
        if format_name.startswith("gguf:"):  # one file that transformers loads whole
            why = gguf_unreadable(directory)
            if why is not None:
                logger.warning("self-check of %s skipped: %s", format_name, why)
                return {"format": format_name, "status": "skipped", "reason": why}
            need = estimated_load_bytes(directory, format_name)
            free = psutil.virtual_memory().available
            if need > 0.8 * free:
                logger.warning("self-check of %s skipped: loading it back needs about %.1f GB, %.1f GB are free "
                               "(--skip_self_check silences this)", format_name, need / 1e9, free / 1e9)
                return {"format": format_name, "status": "skipped", "reason": "not enough free memory to load it"}
            logits = probe_logits(load_saved(directory, format_name), probe_ids)
        else:
            logits = streamed_probe_logits(directory, format_name, probe_ids, blocks)
    except Exception as e:  # noqa: BLE001 - any failure to load or run is the finding
        logger.error("self-check of %s: the saved files do not load or run: %s", format_name, e)
        return {"format": format_name, "status": "failed", "error": f"{type(e).__name__}: {e}"}
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
