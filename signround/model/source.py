"""Where the weights of the model being quantized come from.

``InMemorySource``: the model was loaded whole (or passed in as a module); nothing to do.

``SafetensorsSource``: the model is a skeleton on the meta device and each module's tensors are
read from the checkpoint's safetensors shards (through the index) when the pipeline needs them,
tensor by tensor in the checkpoint's dtype, and dropped back to meta when it is done with them.
Peak memory is then about two blocks plus the embeddings and head, whatever the depth.

Tied parameters (an lm_head sharing the embedding) are one Parameter object in several modules;
materializing or releasing it updates every place that holds it.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import ModelError
from .moe import fused_sources, has_experts, is_expert_converter

logger = logging.getLogger(__name__)

_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
              "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size: a download cut
    short is the common damage, and safetensors itself reports it only when the tensor is read."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size, 100 * 2**20):
                raise ValueError("header length larger than the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path} is not a readable safetensors file ({e}); download or convert it again") from e
    data = size - 8 - n
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if end > data:
        raise ModelError(
            f"{path} is truncated: its header describes {end + 8 + n} bytes but the file has {size}; "
            "download it again (an interrupted download is the usual cause)"
        )
    return header


def checkpoint_index(path: Path) -> dict[str, tuple[Path, dict]]:
    """Checkpoint tensor name -> (shard file, header entry), with every shard's integrity checked."""
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ModelError(f"{index_file} is not a valid safetensors index ({e})") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise ModelError(f"{path} lacks shard(s) {missing[:3]} named by its index; download them again")
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        weight_map = None
    out: dict[str, tuple[Path, dict]] = {}
    for fname in files:
        header = read_header(path / fname)
        for k, v in header.items():
            if k != "__metadata__":
                out[k] = (path / fname, {**v, "__key__": k})
    if weight_map is not None:
        absent = [k for k, f in weight_map.items() if k not in out]
        if absent:
            raise ModelError(f"{path}: tensors {absent[:3]} listed in the index are missing from their shards; "
                             "download the checkpoint again")
    return out


def _aliases(model: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """Canonical state-dict name of each parameter/persistent buffer -> every (module, attribute)
    holding that same tensor object (tied weights are listed once, under their first name)."""
    by_id: dict[int, str] = {}
    out: dict[str, list[tuple[nn.Module, str]]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        persistent = [(n, b) for n, b in mod._buffers.items() if b is not None and n not in mod._non_persistent_buffers_set]
        for leaf, t in [*((n, p) for n, p in mod._parameters.items() if p is not None), *persistent]:
            name = f"{mod_name}.{leaf}" if mod_name else leaf
            canon = by_id.setdefault(id(t), name)
            out.setdefault(canon, [])
            if (mod, leaf) not in [(m, l) for m, l in out[canon]]:
                out[canon].append((mod, leaf))
    return out


class WeightSource:
    """The interface the pipeline uses; the in-memory model needs nothing."""

    streamed = False

    def materialize(self, model: nn.Module, prefix: str) -> None:
        """Load the tensors of the module ``prefix`` ("" for every module outside ``skip``)."""

    def release(self, model: nn.Module, prefix: str) -> None:
        """Drop the module's tensors back to the meta device (streamed sources only)."""

    def materialize_outside(self, model: nn.Module, blocks: list[str]) -> None:
        """Load every tensor that is not inside one of ``blocks`` (embeddings, final norm, head)."""

    def describe(self) -> str:
        return "in memory"


class InMemorySource(WeightSource):
    pass


class SafetensorsSource(WeightSource):
    """Tensors of a meta-device skeleton read from the checkpoint on demand."""

    streamed = True

    def __init__(self, path: Path, model: nn.Module):
        self.path = path
        self.aliases = _aliases(model)
        # model state-dict name -> (shard, header entry); checkpoint names renamed as transformers
        # renames them on load
        self.index = {_renamer(model, self.aliases)(k): v for k, v in checkpoint_index(path).items()}
        # experts a checkpoint stores fused (gpt-oss): each expert's tensors are slices of them
        self.sliced = {n: src for n, src in fused_sources(model).items() if src[0] in self.index}
        self._fused_entries = {fused: self.index.pop(fused) for fused in {src[0] for src in self.sliced.values()}}
        self._check(model)

    def describe(self) -> str:
        return f"streamed from {self.path}"

    def _check(self, model: nn.Module) -> None:
        """Every parameter the model has must be in the checkpoint with its shape (and nothing
        the model cannot place): otherwise the checkpoint needs transformers' own key conversion."""
        missing, bad_shape = [], []
        for name, holders in self.aliases.items():
            mod, leaf = holders[0]
            t = getattr(mod, leaf)
            if name in self.sliced:
                continue  # its shape is checked when the slice is read
            if name not in self.index:
                if leaf in mod._parameters and t.is_meta:
                    missing.append(name)
                continue
            shape = tuple(self.index[name][1]["shape"])
            if shape != tuple(t.shape):
                bad_shape.append(f"{name} {shape} vs {tuple(t.shape)}")
        known = set(self.aliases)
        extra = [k for k in self.index if k not in known and not _ignorable(k)]
        if missing or bad_shape or extra:
            raise StreamingUnsupported(
                (f"missing {missing[:3]} " if missing else "") + (f"shape mismatch {bad_shape[:3]} " if bad_shape else "")
                + (f"unplaced {extra[:3]}" if extra else "")
            )

    def _load(self, name: str) -> torch.Tensor:
        """The checkpoint's tensor in the dtype the skeleton gave it (what from_pretrained loads)."""
        from safetensors import safe_open

        mod, leaf = self.aliases[name][0]
        if name in self.sliced:  # one expert's slice of a fused tensor, read alone
            fused, expert, take = self.sliced[name]
            file, entry = self._fused_entries[fused]
            with safe_open(str(file), framework="pt") as f:
                t = take(f.get_slice(entry["__key__"])[expert])
            if tuple(t.shape) != tuple(getattr(mod, leaf).shape):
                raise ModelError(f"{fused} of {self.path} does not hold {name} with shape {tuple(getattr(mod, leaf).shape)}")
        else:
            file, entry = self.index[name]
            with safe_open(str(file), framework="pt") as f:
                t = f.get_tensor(entry["__key__"])
        want = getattr(mod, leaf).dtype
        return t.to(want) if t.is_floating_point() and t.dtype != want else t

    def _has(self, name: str) -> bool:
        return name in self.index or name in self.sliced

    def _names_under(self, prefix: str) -> Iterator[str]:
        p = prefix + "." if prefix else ""
        for name in self.aliases:
            if name.startswith(p):
                yield name

    def _set(self, name: str, t: torch.Tensor) -> None:
        holders = self.aliases[name]
        old = getattr(*holders[0])
        new = nn.Parameter(t, requires_grad=False) if isinstance(old, nn.Parameter) else t
        for mod, leaf in holders:
            if getattr(mod, leaf) is not old:
                continue  # untied since (a quantized lm_head gets its own copy)
            if leaf in mod._parameters:
                mod._parameters[leaf] = new
            else:
                mod._buffers[leaf] = new

    def _materialize_names(self, names: Iterator[str]) -> None:
        for name in names:
            mod, leaf = self.aliases[name][0]
            if getattr(mod, leaf).is_meta and self._has(name):
                self._set(name, self._load(name))

    def materialize(self, model: nn.Module, prefix: str) -> None:
        self._materialize_names(self._names_under(prefix))

    def materialize_outside(self, model: nn.Module, blocks: list[str]) -> None:
        inside = tuple(b + "." for b in blocks)
        self._materialize_names(n for n in self.aliases if not n.startswith(inside))

    def release_outside(self, model: nn.Module, blocks: list[str]) -> None:
        """Drop the embeddings, final norm and head too (the run is over)."""
        inside = tuple(b + "." for b in blocks)
        for name in [n for n in self.aliases if not n.startswith(inside)]:
            mod, leaf = self.aliases[name][0]
            t = getattr(mod, leaf)
            if self._has(name) and not t.is_meta:
                self._set(name, torch.empty_like(t, device="meta"))

    def release(self, model: nn.Module, prefix: str) -> None:
        for name in self._names_under(prefix):
            mod, leaf = self.aliases[name][0]
            t = getattr(mod, leaf)
            if self._has(name) and not t.is_meta:
                self._set(name, torch.empty_like(t, device="meta"))

    def read(self, name: str) -> torch.Tensor:
        return self._load(name)

    def scan_finite(self, names: list[str]) -> None:
        """NaN/Inf check of the given weights, one tensor at a time (nothing stays resident)."""
        for layer in names:
            key = layer + ".weight"
            if self._has(key) and not torch.isfinite(self._load(key)).all():
                raise ModelError(
                    f"the weight of {layer} contains NaN or Inf; the checkpoint is damaged. Re-export it, "
                    f"or keep the layer out with ignore_layers={layer!r} if that is expected"
                )


def _renamer(model: nn.Module, aliases: dict):
    """Checkpoint name -> model name, through transformers' own renaming rules for this model
    (e.g. GPT-NeoX's ``embed_out`` is ``lm_head``; base-model prefixes added or stripped). Names
    that need a real conversion (experts fused on load) raise StreamingUnsupported."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - other transformers versions: names are used as they are
        return lambda k: k
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    if has_experts(model):  # the skeleton's experts are per-expert Linear layers, as the checkpoint stores them
        converters = [t for t in converters if not is_expert_converter(t)]
    prefix = getattr(model, "base_model_prefix", None)

    def rename(key: str) -> str:
        new, converter = rename_source_key(key, renamings, converters, prefix, aliases)
        if converter is not None:
            raise StreamingUnsupported(f"{key} is converted on load ({converter})")
        return new

    return rename


def checkpoint_namer(model: nn.Module) -> Callable[[str], str] | None:
    """Model name -> the name transformers' ``save_pretrained`` writes for it (its renamings
    reversed, legacy ones left out: Mixtral's ``mlp`` is ``block_sparse_moe`` on disk, GPT-NeoX's
    ``lm_head`` is ``embed_out``), which vLLM and upstream read. None: names are kept as they are.
    Works on tensor and layer names alike."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightRenaming, apply_renamings

        transforms = [t for t in get_model_conversion_mapping(model, add_legacy=False)
                      if not isinstance(t, PrefixChange)]
        renamings = [r for r in (t.reverse_transform() for t in transforms[::-1]) if isinstance(r, WeightRenaming)]
    except Exception:  # noqa: BLE001 - other transformers versions: names are used as they are
        return None
    if not renamings:
        return None

    def name(key: str) -> str:
        return apply_renamings(key + ".", renamings)[:-1]  # the dot lets "lm_head" match "^lm_head\\."

    return name


def loaded_namer(model: nn.Module) -> Callable[[str], str]:
    """Checkpoint name -> model name (the inverse of :func:`checkpoint_namer`), for any tensor or
    layer name, including the packed tensors transformers has no converter for."""
    rename = _renamer(model, _aliases(model))

    def name(key: str) -> str:
        try:
            return rename(key + ".x")[:-2]
        except StreamingUnsupported:
            return key

    return name


def _ignorable(key: str) -> bool:
    # buffers older checkpoints carry that current modules compute (rotary tables, causal masks)
    # (and GPTQ's g_idx, which QuantLinear derives from the group size)
    return key.endswith(("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias", ".masked_bias", ".g_idx"))


class StreamingUnsupported(Exception):
    """The checkpoint's names or shapes do not map one to one onto the model: load it whole."""
