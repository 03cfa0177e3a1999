"""Which layers must share a scheme: what serving engines fuse (q/k/v, gate/up, the experts of one
MoE layer), plus the user's ``shared_layers``."""

from __future__ import annotations

import re

from ..errors import ConfigError
from ..schemes import name_matches

# projections vLLM / SGLang load as one fused tensor (QKVParallelLinear, MergedColumnParallelLinear)
_FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "query": "qkv", "key": "qkv", "value": "qkv",
          "gate_proj": "gate_up", "up_proj": "gate_up", "w1": "w13", "w3": "w13"}
_EXPERT = re.compile(r"(^|\.)experts\.\d+\.")


def fused_key(rel: str) -> str:
    """The name a layer shares with the layers it is fused with (relative to its block)."""
    rel = _EXPERT.sub(r"\1experts.*.", rel)
    head, _, leaf = rel.rpartition(".")
    return f"{head}.{_FUSED.get(leaf, leaf)}" if head else _FUSED.get(leaf, leaf)


class _Union:
    def __init__(self, items: list[str]):
        self.parent = {i: i for i in items}

    def find(self, x: str) -> str:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def join(self, names: list[str]) -> None:
        for n in names[1:]:
            a, b = self.find(names[0]), self.find(n)
            if a != b:
                self.parent[b] = a


def scheme_groups(block_layers: dict[str, list[str]], searched: list[str], shared: list[list[str]]) -> list[list[str]]:
    """Groups of searched layers that get one scheme, in model order.

    A ``shared`` entry that is a searched layer's full name joins those layers across blocks; any
    other entry is a substring or regex of names, joining the layers it matches within each block.
    Every entry must match a searched layer."""
    wanted = set(searched)
    u = _Union(searched)
    for block, names in block_layers.items():
        keys: dict[str, list[str]] = {}
        for n in names:
            if n in wanted:
                keys.setdefault(fused_key(n[len(block) + 1:]), []).append(n)
        for members in keys.values():
            u.join(members)
    for group in shared:
        exact = [p for p in group if p in wanted]
        if len(exact) > 1:
            u.join(exact)
        patterns = [p for p in group if p not in wanted]
        used: set[str] = set()
        for block, names in block_layers.items():
            members: list[str] = []
            for n in names:
                if n not in wanted:
                    continue
                hit = [p for p in patterns if name_matches(p, n[len(block) + 1:]) or name_matches(p, n)]
                if hit:
                    members.append(n)
                    used.update(hit)
            if len(members) > 1:
                u.join(members)
        missing = [p for p in patterns if p not in used]
        if missing:
            example = ", ".join(searched[:3])
            raise ConfigError(
                f"shared_layers entries {missing} match no layer AutoScheme chooses a scheme for; use full names "
                f"or patterns of names such as {example} (layers fixed by layer_config / ignore_layers are not chosen)"
            )
    groups: dict[str, list[str]] = {}
    for n in searched:
        groups.setdefault(u.find(n), []).append(n)
    return list(groups.values())
