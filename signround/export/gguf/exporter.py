"""The gguf format: one ``.gguf`` file that llama.cpp and transformers (``gguf_file=``) load.

``--format gguf:q4_0`` (q4_1, q5_0, q5_1, q8_0) packs every quantized Linear into that ggml
block type straight from the tuned codes and scales, so the file computes exactly what was tuned
and evaluated. Everything else (token embedding, norms, layers kept in floating point) is stored
as F32 (F16 for half-precision models; 1-D tensors always F32). llama.cpp's own mixes also
quantize the embedding and output; that comes with the k-quant mixes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...errors import ExportError
from ...plan import QuantPlan
from ...qdq import QParams
from ...schemes import GGML_SPECS
from ..writer import unique_state_dict
from .blocks import pack_blocks
from .mapping import family_of, gguf_name, hyperparameters, permute_rows, qk_heads
from .tokenizer import vocab_metadata

logger = logging.getLogger(__name__)

FILE_TYPES = {"q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1",
              "q8_0": "MOSTLY_Q8_0"}


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - the extra is part of the test install
        raise ExportError("the gguf format needs the gguf package: pip install 'signround[gguf]'") from e
    return gguf


class GGUFExporter:
    def __init__(self, ggml_type: str):
        self.ggml_type = ggml_type
        self.name = f"gguf:{ggml_type}"
        self.description = f"one .gguf file, linear layers as ggml {ggml_type} (scheme GGUF:{ggml_type.upper()})"

    def check(self, plan: QuantPlan, model: nn.Module) -> None:
        _gguf()
        family_of(model.config)
        for name, spec in plan.quantized.items():
            if spec.ggml_type != self.ggml_type:
                raise ExportError(
                    f"{self.name} packs layers tuned for ggml {self.ggml_type}; {name} is {spec.label()}: "
                    f"quantize with --scheme GGUF:{self.ggml_type.upper()}"
                )
        for name, t in unique_state_dict(model):
            if gguf_name(family_of(model.config), name) is None:
                raise ExportError(f"{name} has no GGUF tensor name in the {family_of(model.config).arch} table")

    def estimate_bytes(self, model: nn.Module, plan: QuantPlan) -> int:
        return sum(p.numel() * p.element_size() for p in model.parameters())

    def file_name(self, source_dir: str | None) -> str:
        base = Path(source_dir).name if source_dir else "model"
        return f"{base}-{self.ggml_type}.gguf"

    def write(self, d: Path, model: nn.Module, plan: QuantPlan, qparams: dict[str, QParams], tokenizer: Any,
              source_dir: str | None) -> None:
        gguf = _gguf()
        config = model.config.get_text_config()
        fam = family_of(model.config)
        w = gguf.GGUFWriter(str(d / self.file_name(source_dir)), fam.arch)
        w.add_name(Path(source_dir).name if source_dir else "model")
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[self.ggml_type]))
        for method, value in hyperparameters(fam, config):
            getattr(w, method)(value)
        self._tokenizer(w, tokenizer, source_dir, config.vocab_size)
        qt = gguf.GGMLQuantizationType
        tied = getattr(config, "tie_word_embeddings", False) and plan.lm_head and not plan.untie_lm_head
        for name, t in unique_state_dict(model):
            target = gguf_name(fam, name)
            if target == "output.weight" and tied:
                continue
            layer = name.rsplit(".", 1)[0]
            heads = qk_heads(fam, config, target)
            if layer in qparams and name.endswith(".weight"):
                data, dtype = pack_blocks(qparams[layer], self.ggml_type), getattr(qt, self.ggml_type.upper())
            else:
                half = t.dim() > 1 and t.dtype in (torch.float16, torch.bfloat16)
                data = t.detach().to(torch.float16 if half else torch.float32)
                dtype = qt.F16 if half else qt.F32
            if heads:
                data = permute_rows(data, heads)
            arr = data.contiguous().cpu().numpy()
            w.add_tensor(target, arr, raw_dtype=dtype if dtype not in (qt.F16, qt.F32) else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    @staticmethod
    def _tokenizer(w, tokenizer: Any, source_dir: str | None, vocab_size: int) -> None:
        meta = vocab_metadata(tokenizer, source_dir, vocab_size)
        w.add_tokenizer_model(meta["model"])
        w.add_tokenizer_pre(meta["pre"])
        w.add_token_list(meta["tokens"])
        w.add_token_types(meta["token_types"])
        if "scores" in meta:
            w.add_token_scores(meta["scores"])
        if meta["merges"]:
            w.add_token_merges(meta["merges"])
        for key, method in (("bos_id", "add_bos_token_id"), ("eos_id", "add_eos_token_id"),
                            ("unk_id", "add_unk_token_id"), ("pad_id", "add_pad_token_id")):
            if key in meta:
                getattr(w, method)(meta[key])
        if "add_bos" in meta:
            w.add_add_bos_token(meta["add_bos"])
        if "chat_template" in meta:
            w.add_chat_template(meta["chat_template"])


EXPORTERS = [GGUFExporter(t) for t in GGML_SPECS]
