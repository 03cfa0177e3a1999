"""The gguf format: one ``.gguf`` file that llama.cpp and transformers (``gguf_file=``) load.

``--format gguf:q4_k_m`` (any llama.cpp file type in ``GGUF_FTYPES``) packs every quantized
tensor into the block type the plan gave it (llama.cpp's mix for that file type, see mixes.py)
straight from the tuned codes and scales, so the file computes exactly what was tuned and
evaluated; the token embedding and output are quantized as the file type says (RTN). Everything
else (norms, layers kept in floating point) is stored as F32 (F16 for half-precision models;
1-D tensors always F32).
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
from ...model.layers import tied_lm_head
from ...schemes import GGML_SPECS, GGUF_FTYPES
from ..writer import canonical_entries
from .blocks import pack_blocks
from .mapping import expert_slot, family_of, gguf_name, hyperparameters, n_experts, permute_rows, qk_heads
from .tokenizer import vocab_metadata

logger = logging.getLogger(__name__)



def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - the extra is part of the test install
        raise ExportError("the gguf format needs the gguf package: pip install 'signround[gguf]'") from e
    return gguf


class GGUFExporter:
    def __init__(self, ftype: str):
        self.ftype = ftype
        self.name = f"gguf:{ftype}"
        self.description = f"one .gguf file of llama.cpp file type {ftype.upper()} (scheme GGUF:{ftype.upper()})"

    def check(self, plan: QuantPlan, model: nn.Module) -> None:
        _gguf()
        fam = family_of(model.config)
        hyperparameters(fam, model.config.get_text_config())  # refuses what llama.cpp would misread
        bad = [f"{n} ({s.label()})" for n, s in plan.quantized.items() if s.ggml_type not in GGML_SPECS]
        if plan.ggml_ftype != self.ftype or bad:
            raise ExportError(
                f"{self.name} holds layers tuned for llama.cpp file type {self.ftype.upper()}; this run is "
                f"{(plan.ggml_ftype or plan.default.label()).upper()}{' (' + ', '.join(bad[:3]) + ')' if bad else ''}: "
                f"quantize with --scheme GGUF:{self.ftype.upper()}"
            )
        stacked: dict[str, set] = {}
        for name, _ in canonical_entries(model):  # names only: meta (streamed, released) weights pass
            target = gguf_name(fam, name)
            if target is None:
                raise ExportError(f"{name} has no GGUF tensor name in the {fam.arch} table")
            if expert_slot(name) is not None:
                spec = plan.specs.get(name.rsplit(".", 1)[0])
                stacked.setdefault(target, set()).add(spec.ggml_type if spec is not None and spec.quantized else None)
        mixed = [t for t, types in stacked.items() if len(types) > 1]
        if mixed:
            raise ExportError(
                f"{mixed[0]} stacks every expert of a layer in one tensor of one block type, but the layer_config gives "
                "its experts different types; give every expert of a projection the same setting"
            )

    def estimate_bytes(self, model: nn.Module, plan: QuantPlan) -> int:
        return sum(p.numel() * p.element_size() for p in model.parameters())

    def file_name(self, source_dir: str | None) -> str:
        base = Path(source_dir).name if source_dir else "model"
        return f"{base}-{self.ftype}.gguf"

    def open(self, d: Path, model: nn.Module, plan: QuantPlan, source_dir: str | None,
             state: dict | None = None) -> "GGUFFile":
        return GGUFFile(self, d, model, plan, source_dir, state)

    @staticmethod
    def _tokenizer(w, tokenizer: Any, source_dir: str | None, config: Any) -> None:
        meta = vocab_metadata(tokenizer, source_dir, config.vocab_size)
        pad = getattr(config, "pad_token_id", None)
        if "pad_id" not in meta and isinstance(pad, int) and 0 <= pad < config.vocab_size:
            meta["pad_id"] = pad  # the model's own pad id; loaders otherwise assume an architecture default
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


class GGUFFile:
    """One .gguf file written as tensors arrive: each tensor's bytes go to a spill file (nothing is
    held in memory) and :meth:`finish` writes header, metadata and tensor infos, then the tensor
    data read back from the spill through memory maps. The spill's entries and length are the
    state a resumed run continues from."""

    def __init__(self, exporter: GGUFExporter, d: Path, model: nn.Module, plan: QuantPlan,
                 source_dir: str | None, state: dict | None = None):
        self.exporter, self.d, self.source_dir = exporter, d, source_dir
        self.config = model.config.get_text_config()
        self.fam = family_of(model.config)
        self.tied = tied_lm_head(model)
        self.types = {n: s.ggml_type for n, s in {**plan.quantized, **plan.ggml_extras}.items()}
        self.spill = d / ".gguf-tensors.data"
        self.n_experts = n_experts(self.config)
        # a layer's experts, gathered until the last one arrives and written as one stacked tensor
        # (they arrive within one block, so a block boundary, where resume state is saved, has none)
        self.pending: dict[str, dict[int, np.ndarray]] = {}
        self.entries: list[list] = state["entries"] if state else []
        self.length: int = state["length"] if state else 0
        if self.spill.exists():
            with open(self.spill, "r+b") as f:
                f.truncate(self.length)

    def state(self) -> dict:
        return {"entries": self.entries, "length": self.length}

    def sync(self) -> None:
        if self.spill.exists():
            with open(self.spill, "rb+") as f:
                os.fsync(f.fileno())

    def add(self, name: str, t: torch.Tensor, qparams: dict[str, QParams], plan: QuantPlan) -> None:
        qt = _gguf().GGMLQuantizationType
        target = gguf_name(self.fam, name)
        if target == "output.weight" and self.tied:
            return  # token_embd holds the shared matrix
        layer = name.rsplit(".", 1)[0]
        heads = qk_heads(self.fam, self.config, target)
        if name.endswith(".weight") and layer in self.types and layer in qparams:
            data, dtype = pack_blocks(qparams[layer], self.types[layer]), getattr(qt, self.types[layer].upper())
        else:
            if t.is_meta:
                raise ExportError(f"{name} has no values (meta tensor); load the model fully before saving")
            # routers in float32, as llama.cpp's converter keeps them
            half = t.dim() > 1 and t.dtype in (torch.float16, torch.bfloat16) and "ffn_gate_inp" not in target
            data = t.detach().to(torch.float16 if half else torch.float32)
            if self.fam.norm_shift and target.endswith("norm.weight"):
                data = data + self.fam.norm_shift
            if target.endswith("ffn_gate_inp_shexp.weight"):
                data = data.reshape(-1)  # [1, hidden] -> the vector llama.cpp reads
            dtype = qt.F16 if half else qt.F32
        if heads:
            data = permute_rows(data, heads)
        arr = data.contiguous().cpu().numpy()
        e = expert_slot(name)
        if e is not None:
            experts = self.pending.setdefault(target, {})
            experts[e] = arr  # one block type for all of them (checked before tuning)
            if len(experts) < self.n_experts:
                return
            del self.pending[target]
            arr = np.stack([experts[i] for i in range(self.n_experts)])
        self._write(target, arr, dtype)

    def _write(self, target: str, arr: np.ndarray, dtype: Any) -> None:
        qt = _gguf().GGMLQuantizationType
        with open(self.spill, "ab") as f:
            arr.tofile(f)
        raw = None if dtype in (qt.F16, qt.F32) else int(dtype)
        self.entries.append([target, arr.dtype.str, list(arr.shape), self.length, raw])
        self.length += arr.nbytes

    def finish(self, model: nn.Module, plan: QuantPlan, extra_config: dict, tokenizer: Any) -> None:
        gguf = _gguf()
        w = gguf.GGUFWriter(str(self.d / self.exporter.file_name(self.source_dir)), self.fam.arch)
        w.add_name(Path(self.source_dir).name if self.source_dir else "model")
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{self.exporter.ftype.upper()}"))
        for method, value in hyperparameters(self.fam, self.config):
            getattr(w, method)(value)
        self.exporter._tokenizer(w, tokenizer, self.source_dir, self.config)
        for target, dt, shape, offset, raw in self.entries:
            arr = np.memmap(self.spill, dtype=np.dtype(dt), mode="r", offset=offset, shape=tuple(shape))
            w.add_tensor(target, arr, raw_dtype=None if raw is None else gguf.GGMLQuantizationType(raw))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        self.spill.unlink(missing_ok=True)


EXPORTERS = [GGUFExporter(t) for t in GGUF_FTYPES]
