"""Input capture: the per-block keyword arguments come from a forward in which only the first
block computes; they must equal those of a full forward."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from signround.model.capture import _block_kwargs, capture_block_inputs
from signround.model.layers import find_block_names
from tiny_models import ARCHS


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("arch", ARCHS)
def test_pass_through_capture_matches_full_forward(arch, tiny_model_dir, caplog):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch)).eval()
    names = find_block_names(model)
    calls = {n: 0 for n in names}
    own = {}
    for n in names:  # counts real forwards only (a pass-through replaces the bound method)
        blk = model.get_submodule(n)
        real = type(blk).forward

        def counted(self, *a, _n=n, _real=real, **k):
            calls[_n] += 1
            return _real(self, *a, **k)

        blk.forward = own[n] = counted.__get__(blk)  # an instance forward, as accelerate's hooks set
    sample = {"input_ids": torch.randint(3, 120, (1, 24))}
    with caplog.at_level(logging.DEBUG, logger="signround.model.capture"), torch.no_grad():
        full = _block_kwargs(model, names, sample, "cpu", shortcut=False)
        assert all(c == 1 for c in calls.values())
        fast = _block_kwargs(model, names, sample, "cpu")
    assert "failed" not in caplog.text
    assert calls[names[0]] == 2 and all(calls[n] == 1 for n in names[1:]), "later blocks must not compute"
    assert set(fast) == set(full) == set(names)
    for n in names:
        assert _same(fast[n], full[n]), n
    assert all(model.get_submodule(n).__dict__["forward"] is own[n] for n in names), "instance forwards restored"


@dataclass
class _Out:
    hidden: torch.Tensor


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, hidden_states, scale=None):
        return _Out(self.lin(hidden_states) * scale)


class _Toy(nn.Module):
    """A loop that reads an attribute of each block's output: a passed-through tensor has none."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList(_Block() for _ in range(3))

    def forward(self, input_ids, use_cache=False):
        h = self.emb(input_ids)
        for i, b in enumerate(self.blocks):
            h = b(h, scale=torch.tensor(float(i + 1))).hidden
        return h


def test_capture_falls_back_to_full_forward_and_restores_blocks():
    toy = _Toy()
    names = [f"blocks.{i}" for i in range(3)]
    ids = torch.randint(0, 16, (4, 5))
    x, kw, _ = capture_block_inputs(toy, names, ids, 2)
    assert torch.equal(x, toy.emb(ids).detach())
    assert [float(kw[n]["scale"]) for n in names] == [1.0, 2.0, 3.0]
    assert all("forward" not in toy.get_submodule(n).__dict__ for n in names)
    assert torch.equal(toy(ids), toy(ids))  # still runs its real blocks
