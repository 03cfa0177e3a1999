"""Mixture-of-experts layers as one Linear per expert projection.

transformers 5 keeps the experts of an MoE layer fused: ``experts.gate_up_proj`` ``[E, 2I, H]``
(each expert's gate rows, then its up rows) and ``experts.down_proj`` ``[E, H, I]``, built on load
from the checkpoint's per-expert tensors by the model's weight conversions (``MergeModulelist`` +
``Concatenate``). Quantizing needs Linear layers, and vLLM and upstream read per-expert tensors
under the checkpoint's names, so each fused experts module is replaced by :class:`UnfusedExperts`:
a ``ModuleList`` of per-expert MLPs whose projections carry the checkpoint's names
(``mlp.experts.7.down_proj``, Mixtral's ``experts.7.w2``) and whose forward is the fused one's.

The layout is read from the model's own conversion mapping, so only layouts transformers itself
splits per expert are unfused that way. gpt-oss, whose checkpoints store the experts fused
(``experts.gate_up_proj`` ``[E, H, 2I]`` with gate and up columns interleaved, biases, a clamped
SwiGLU), is split into :class:`GptOssExpertMLP` modules named ``experts.7.gate_proj`` /
``up_proj`` / ``down_proj``, the per-expert layout upstream auto-round writes for it. Llama 4,
fused on disk too (``gate_up_proj`` ``[E, H, 2I]``: gate columns, then up columns), is split the
same way, and its MoE layer becomes :class:`Llama4MoE`, which hands each expert only its routed
tokens (Llama 4 scales an expert's inputs by the routing weight, not its outputs, and its own layer
runs every expert on every token). Any other fused experts module is left alone and
:func:`fused_experts_left` names it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

ROUTER_NAMES = ("gate", "router", "shared_expert_gate")  # kept in full precision by default


@dataclass(frozen=True)
class ExpertLayout:
    """The checkpoint's names of one expert's gate, up and down projections."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, its Linear layers named as the checkpoint names them."""

    def __init__(self, layout: ExpertLayout, hidden: int, inter: int, act_fn, dtype, device):
        super().__init__()
        self.layout = layout
        self.act_fn = act_fn
        for name, (i, o) in ((layout.gate, (hidden, inter)), (layout.up, (hidden, inter)), (layout.down, (inter, hidden))):
            setattr(self, name, nn.Linear(i, o, bias=False, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo = self.layout
        return getattr(self, lo.down)(self.act_fn(getattr(self, lo.gate)(x)) * getattr(self, lo.up)(x))


class GptOssExpertMLP(nn.Module):
    """One gpt-oss expert: ``down((clamp(up) + 1) * g * sigmoid(alpha * g))`` with ``g = clamp(gate)``,
    every projection with a bias (transformers' ``GptOssExperts._apply_gate`` per expert)."""

    layout = ExpertLayout()

    def __init__(self, hidden: int, inter: int, alpha: float, limit: float, dtype, device):
        super().__init__()
        self.alpha, self.limit = alpha, limit
        self.gate_proj = nn.Linear(hidden, inter, bias=True, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, inter, bias=True, dtype=dtype, device=device)
        self.down_proj = nn.Linear(inter, hidden, bias=True, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x).clamp(max=self.limit)
        up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)
        return self.down_proj((up + 1) * (gate * torch.sigmoid(gate * self.alpha)))


class UnfusedExperts(nn.ModuleList):
    """Drop-in for a fused experts module: ``forward(hidden_states [T, H], top_k_index [T, k],
    top_k_weights [T, k])`` as transformers' eager experts loop computes it (each expert sees
    only the tokens routed to it, weighted by its routing weight, summed per token)."""

    counts: list[int] | None = None  # tokens routed to each expert, while RoutedTokens counts
    calibrate_all = False  # every expert computes every token (upstream's calibrate_all_experts)
    scale_inputs = False  # Llama 4: the routing weight scales an expert's input, not its output
    on_disk: str | None = None  # "gpt_oss" / "llama4": the checkpoint stores these experts fused

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            # the same order as transformers' loop (routing slot, then token), for identical sums
            pos, tok = torch.where(top_k_index.T == e)
            if self.counts is not None:
                self.counts[e] += tok.numel()
            if tok.numel() == 0 and not self.calibrate_all:
                continue
            w = top_k_weights[tok, pos, None]
            if self.scale_inputs:
                if self.calibrate_all:  # hooks see every token; the routed ones as the expert gets them
                    x = hidden_states.clone()
                    x[tok] = x[tok] * w
                    y = expert(x)[tok]
                else:
                    y = expert(hidden_states[tok] * w)
            else:
                # calibrate_all: hooks (importance, activation ranges) see every token
                y = (expert(hidden_states)[tok] if self.calibrate_all else expert(hidden_states[tok])) * w
            out.index_add_(0, tok, y.to(out.dtype))
        return out


class Llama4MoE(nn.Module):
    """Llama 4's MoE layer with :class:`UnfusedExperts`: the router's top-k experts per token, each
    fed the token scaled by its sigmoid routing weight, summed, plus the shared expert
    (``Llama4TextMoe`` computes the same, running every expert on every token)."""

    def __init__(self, moe: nn.Module, experts: UnfusedExperts):
        super().__init__()
        self.top_k, self.hidden_dim = moe.top_k, moe.hidden_dim
        self.router, self.shared_expert, self.experts = moe.router, moe.shared_expert, experts

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = hidden_states.reshape(-1, self.hidden_dim)
        _, logits = self.router(x)  # Llama4Router: (scores, logits)
        top_value, top = torch.topk(logits, self.top_k, dim=1)
        routed = self.experts(x, top, torch.sigmoid(top_value.float()).to(x.dtype))
        out = self.shared_expert(x)
        out.add_(routed)
        return out, logits


def _is_fused(module: nn.Module) -> bool:
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3 and dn.dim() == 3


def _leaf(pattern: str) -> str | None:
    """``mlp.experts.*.w1.weight`` -> ``w1``."""
    m = re.search(r"experts\.\*\.(\w+)\.weight$", pattern)
    return m.group(1) if m else None


def expert_layout(model: nn.Module) -> ExpertLayout | None:
    """The per-expert names of ``model``'s checkpoint conversion (None: transformers does not
    split this model's experts per expert, or this transformers has no conversion mapping)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping

        transforms = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - older transformers: experts are Linear modules already
        return None
    gate = up = down = None
    for t in transforms:
        targets = getattr(t, "target_patterns", None) or []
        sources = getattr(t, "source_patterns", None) or []
        ops = [type(op).__name__ for op in getattr(t, "operations", None) or []]
        if any(str(x).endswith("experts.gate_up_proj") for x in targets) and len(sources) == 2 \
                and ops == ["MergeModulelist", "Concatenate"]:
            gate, up = _leaf(sources[0]), _leaf(sources[1])
        elif any(str(x).endswith("experts.down_proj") for x in targets) and len(sources) == 1 \
                and ops == ["MergeModulelist"]:
            down = _leaf(sources[0])
    if gate and up and down:
        return ExpertLayout(gate, up, down)
    return None


def is_expert_converter(transform) -> bool:
    """A conversion that fuses per-expert tensors (not needed once the experts are unfused)."""
    return any(re.search(r"experts\.(gate_up_proj|down_proj)$", str(x))
               for x in getattr(transform, "target_patterns", None) or [])


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module whose layout is known (the model's conversion mapping, or
    gpt-oss's) by an :class:`UnfusedExperts` (weights copied per expert, or left on the meta device
    for a skeleton). Returns the names of the replaced modules."""
    fused = [(n, m) for n, m in model.named_modules() if _is_fused(m)]
    if not fused:
        return []
    layout = expert_layout(model)
    done = []
    for name, mod in fused:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if type(mod).__name__ == "Llama4TextExperts" and type(parent).__name__ == "Llama4TextMoe":
            new = _unfuse_on_disk(mod, "llama4")
            if new is not None:  # the whole MoE layer: its forward scales the experts' inputs
                grand_name, _, parent_leaf = parent_name.rpartition(".")
                setattr(model.get_submodule(grand_name) if grand_name else model, parent_leaf, Llama4MoE(parent, new))
                done.append(name)
            continue
        new = _unfuse_on_disk(mod, "gpt_oss") if _is_gpt_oss(mod) else _unfuse(mod, layout) if layout else None
        if new is None:
            continue
        setattr(parent, leaf, new)
        done.append(name)
    if done:
        lo = model.get_submodule(done[0])[0].layout
        logger.info("%d MoE layers: experts unfused into %d Linear layers each (%s, %s, %s per expert)",
                    len(done), 3 * len(model.get_submodule(done[0])), lo.gate, lo.up, lo.down)
    return done


def _frozen(ex: nn.Module) -> nn.Module:
    for p in ex.parameters():
        p.requires_grad_(False)
    return ex


def _unfuse(mod: nn.Module, layout: ExpertLayout) -> UnfusedExperts | None:
    """``gate_up_proj`` ``[E, 2I, H]`` (gate rows, then up rows), ``down_proj`` ``[E, H, I]``."""
    if any(getattr(mod, b, None) is not None for b in ("gate_up_proj_bias", "down_proj_bias")):
        return None  # biased experts of a layout we do not know
    gu, dn = mod.gate_up_proj, mod.down_proj
    n_exp, two_inter, hidden = gu.shape
    inter = two_inter // 2
    if tuple(dn.shape) != (n_exp, hidden, inter):
        return None
    new = UnfusedExperts()
    for e in range(n_exp):
        ex = ExpertMLP(layout, hidden, inter, mod.act_fn, gu.dtype, gu.device)
        if not gu.is_meta:
            with torch.no_grad():  # own copies: the fused tensors are freed with the old module
                getattr(ex, layout.gate).weight.copy_(gu[e, :inter])
                getattr(ex, layout.up).weight.copy_(gu[e, inter:])
                getattr(ex, layout.down).weight.copy_(dn[e])
        new.append(_frozen(ex))
    return new


def _is_gpt_oss(mod: nn.Module) -> bool:
    return type(mod).__name__ == "GptOssExperts" and all(
        isinstance(getattr(mod, a, None), torch.Tensor) for a in ("gate_up_proj_bias", "down_proj_bias"))


def _gate_up_cols(kind: str, inter: int) -> tuple[slice, slice]:
    """The gate and up columns of a fused-on-disk ``gate_up_proj`` ``[E, H, 2I]``: gpt-oss
    interleaves them, Llama 4 puts every gate column first."""
    return (slice(0, None, 2), slice(1, None, 2)) if kind == "gpt_oss" else (slice(0, inter), slice(inter, None))


def _unfuse_on_disk(mod: nn.Module, kind: str) -> UnfusedExperts | None:
    """Experts fused on disk (``kind`` "gpt_oss" or "llama4"): ``gate_up_proj`` ``[E, H, 2I]`` in x
    out, ``down_proj`` ``[E, I, H]``; gpt-oss adds biases ``[E, 2I]`` / ``[E, H]`` and its clamped
    SwiGLU, Llama 4 scales each expert's inputs by the routing weight."""
    gu, dn = mod.gate_up_proj, mod.down_proj
    n_exp, hidden, two_inter = gu.shape
    inter = two_inter // 2
    if tuple(dn.shape) != (n_exp, inter, hidden):
        return None
    gate, up = _gate_up_cols(kind, inter)
    new = UnfusedExperts()
    new.on_disk, new.scale_inputs = kind, kind == "llama4"
    for e in range(n_exp):
        if kind == "gpt_oss":
            ex = GptOssExpertMLP(hidden, inter, float(mod.alpha), float(mod.limit), gu.dtype, gu.device)
        else:
            ex = ExpertMLP(ExpertLayout(), hidden, inter, mod.act_fn, gu.dtype, gu.device)
        if not gu.is_meta:
            with torch.no_grad():
                ex.gate_proj.weight.copy_(gu[e][:, gate].T)
                ex.up_proj.weight.copy_(gu[e][:, up].T)
                ex.down_proj.weight.copy_(dn[e].T)
                if kind == "gpt_oss":
                    ex.gate_proj.bias.copy_(mod.gate_up_proj_bias[e][gate])
                    ex.up_proj.bias.copy_(mod.gate_up_proj_bias[e][up])
                    ex.down_proj.bias.copy_(mod.down_proj_bias[e])
        new.append(_frozen(ex))
    return new


def fused_experts_left(model: nn.Module) -> list[tuple[str, str]]:
    """(name, class) of experts modules still fused (a layout signround cannot unfuse)."""
    return [(n, type(m).__name__) for n, m in model.named_modules() if _is_fused(m)]


def is_router(name: str) -> bool:
    """The layer that routes tokens to experts (kept in full precision by default)."""
    return name.rpartition(".")[2] in ROUTER_NAMES


def router_modules(block: nn.Module) -> list[str]:
    """Routers of an MoE block that are not Linear layers (transformers 5's TopKRouter modules)."""
    if not block_has_experts(block):
        return []
    return [n for n, m in block.named_modules() if n and is_router(n) and not isinstance(m, nn.Linear)
            and isinstance(getattr(m, "weight", None), torch.Tensor)]


def set_calibrate_all(block: nn.Module, on: bool) -> None:
    for m in block.modules():
        if isinstance(m, UnfusedExperts):
            m.calibrate_all = on


def has_experts(model: nn.Module) -> bool:
    return any(isinstance(m, UnfusedExperts) for m in model.modules())


def block_has_experts(block: nn.Module) -> bool:
    """A block with an MoE layer (unfused, or still fused)."""
    return any(isinstance(m, UnfusedExperts) or _is_fused(m) for m in block.modules())


class RoutedTokens:
    """Counts the tokens each expert of a block is routed while active (a context manager)."""

    def __init__(self, block: nn.Module):
        self.counts: dict[str, list[int]] = {}
        self._modules = [(n, m) for n, m in block.named_modules() if isinstance(m, UnfusedExperts)]

    def __enter__(self) -> "RoutedTokens":
        for name, mod in self._modules:
            mod.counts = self.counts.setdefault(name, [0] * len(mod))
        return self

    def __exit__(self, *exc) -> None:
        for _, mod in self._modules:
            mod.counts = None

    def starved(self, below: int) -> int:
        return sum(c < below for counts in self.counts.values() for c in counts)

    def layers_below(self, below: int, layers) -> frozenset[str]:
        """The layers (names relative to the block) of experts routed fewer than ``below`` tokens."""
        prefixes = tuple(f"{name}.{e}." for name, counts in self.counts.items() for e, c in enumerate(counts)
                         if c < below)
        return frozenset(n for n in layers if prefixes and n.startswith(prefixes))


def fused_sources(model: nn.Module) -> dict[str, tuple[str, int, object]]:
    """Where a per-expert tensor of an unfused gpt-oss / Llama 4 layer lies in a checkpoint that
    stores the experts fused: model name -> (fused tensor name, expert index, what turns that
    expert's slice into the tensor). Streaming reads one expert's slice at a time through it."""
    def pick(cols: slice, transpose: bool):
        return lambda t: (t[..., cols].T if transpose else t[..., cols]).contiguous()

    out: dict[str, tuple[str, int, object]] = {}
    every = slice(None)
    for name, mod in model.named_modules():
        if not isinstance(mod, UnfusedExperts) or not len(mod) or mod.on_disk is None:
            continue
        gate, up = _gate_up_cols(mod.on_disk, mod[0].gate_proj.out_features)
        for e in range(len(mod)):
            p = f"{name}.{e}"
            out.update({
                f"{p}.gate_proj.weight": (f"{name}.gate_up_proj", e, pick(gate, True)),
                f"{p}.up_proj.weight": (f"{name}.gate_up_proj", e, pick(up, True)),
                f"{p}.down_proj.weight": (f"{name}.down_proj", e, pick(every, True)),
            })
            if mod.on_disk == "gpt_oss":
                out.update({
                    f"{p}.gate_proj.bias": (f"{name}.gate_up_proj_bias", e, pick(gate, False)),
                    f"{p}.up_proj.bias": (f"{name}.gate_up_proj_bias", e, pick(up, False)),
                    f"{p}.down_proj.bias": (f"{name}.down_proj_bias", e, pick(every, False)),
                })
    return out


def experts_fused_on_disk(model: nn.Module) -> bool:
    """Experts transformers keeps fused in its own checkpoints too (gpt-oss, Llama 4): per-expert
    files are read by signround's and upstream's loaders, not by plain transformers."""
    return any(isinstance(m, UnfusedExperts) and m.on_disk is not None for m in model.modules())
