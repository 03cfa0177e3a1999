"""Finding decoder blocks and their quantizable layers, and reading/writing weights in Linear layout.

GPT-2 style ``Conv1D`` stores its weight as ``[in, out]``; everything here exposes weights as
``[out, in]`` so qdq, tuning and export see one layout.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError

QUANTIZABLE_TYPES = (nn.Linear, Conv1D)


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(get_module(model, parent_name), child, new)


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (a view for Linear, a transposed view for Conv1D)."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def set_weight(module: nn.Module, w: torch.Tensor) -> None:
    """Write an ``[out, in]`` weight back in the module's own layout and dtype."""
    target = module.weight
    with torch.no_grad():
        target.copy_((w.t() if isinstance(module, Conv1D) else w).to(target.dtype))


def in_out_features(module: nn.Module) -> tuple[int, int]:
    w = get_weight(module)
    return int(w.shape[1]), int(w.shape[0])


def _has_quantizable(module: nn.Module) -> bool:
    return any(isinstance(m, QUANTIZABLE_TYPES) for m in module.modules())


def _num_hidden_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)


def find_block_names(model: nn.Module, to_quant_block_names: str | Iterable[str] | None = None) -> list[str]:
    """Names of the decoder blocks, in order (e.g. ``model.layers.0`` ... ``model.layers.N``).

    Found automatically as the ModuleList of blocks that contain Linear/Conv1D layers (preferring the
    one whose length is the config's ``num_hidden_layers``; a VLM's are its language model's); ``to_quant_block_names`` overrides it with
    ModuleList names (their children become blocks) or individual block names, comma-separated or a list.
    """
    modules = dict(model.named_modules())
    if to_quant_block_names:
        names = (
            [n.strip() for n in to_quant_block_names.split(",")]
            if isinstance(to_quant_block_names, str)
            else list(to_quant_block_names)
        )
        blocks: list[str] = []
        for name in names:
            if name not in modules:
                raise ConfigError(
                    f"to_quant_block_names entry {name!r} is not a module of this model; "
                    f"candidates: {', '.join(_candidate_lists(model)) or 'none found'}"
                )
            mod = modules[name]
            if isinstance(mod, nn.ModuleList):
                blocks += [f"{name}.{i}" for i in range(len(mod))]
            else:
                blocks.append(name)
        return blocks

    candidates = _candidate_lists(model)
    from .vlm import text_model_name

    text = text_model_name(model)
    if text is not None:  # a VLM: the language model's blocks (the vision tower's are not calibrated on text)
        candidates = [c for c in candidates if c.startswith(text + ".")]
    if not candidates:
        raise ConfigError(
            "could not find the decoder blocks of this model (no ModuleList of layers containing "
            "Linear modules); name them with to_quant_block_names, e.g. 'model.layers'"
        )
    n_layers = _num_hidden_layers(model)
    preferred = [c for c in candidates if len(modules[c]) == n_layers]
    pool = preferred or candidates
    best = max(pool, key=lambda c: sum(1 for m in modules[c].modules() if isinstance(m, QUANTIZABLE_TYPES)))
    return [f"{best}.{i}" for i in range(len(modules[best]))]


def _candidate_lists(model: nn.Module) -> list[str]:
    found: list[str] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if any(name.startswith(f + ".") for f in found):
            continue  # nested lists (MoE experts) belong to a block already found
        if all(_has_quantizable(child) for child in mod):
            found.append(name)
    return found


def quantizable_layer_names(model: nn.Module, block_names: Iterable[str]) -> list[str]:
    """Linear/Conv1D layers inside the given blocks, in module order."""
    names: list[str] = []
    for block in block_names:
        for sub, mod in get_module(model, block).named_modules():
            if isinstance(mod, QUANTIZABLE_TYPES):
                names.append(f"{block}.{sub}")
    return names


def lm_head_name(model: nn.Module) -> str | None:
    """Module name of the output projection, if it is a Linear."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(head, QUANTIZABLE_TYPES):
        return None
    for name, mod in model.named_modules():
        if mod is head:
            return name
    return None


def tied_lm_head(model: nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return head is not None and emb is not None and head.weight is emb.weight


_ACT_HOOK = "_signround_act_quant"


def attach_act_quant(module: nn.Module, spec, amax: torch.Tensor | None) -> None:
    """Fake-quantize the module's input on every call from now on (replacing an earlier hook).

    Weights are baked into the module; activations of W4A4 / W8A8 schemes are not, so the
    in-memory quantized model keeps this hook to compute what the exported model computes.
    """
    from ..qdq.act import qdq_act

    old = getattr(module, _ACT_HOOK, None)
    if old is not None:
        old.remove()
    if not spec.act_quantized:
        return

    def hook(_m, args):
        return (qdq_act(args[0], spec, amax), *args[1:])

    setattr(module, _ACT_HOOK, module.register_forward_pre_hook(hook))
