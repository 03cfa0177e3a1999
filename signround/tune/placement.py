"""Spreading one block over several devices while it is tuned (``--device_map 0,1`` or a dict).

The block's inputs, outputs and cached activations live on the first device. Modules placed
elsewhere get two hooks: their inputs (positional and keyword tensors) move to their device on the
way in, their outputs back to the first device on the way out, so residual additions and the next
module see one device; autograd carries gradients back across the same moves.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..devices import DeviceMap


def _matches(key: str, name: str) -> bool:
    if key == name:
        return True
    try:
        return re.fullmatch(key, name) is not None
    except re.error:
        return False


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def assign_devices(block: nn.Module, devmap: DeviceMap) -> dict[str, torch.device]:
    """Module name inside ``block`` -> device, for the modules that do not stay on the first device.

    A dict map places the modules it names (exact name or regex; the outermost match wins, the
    first listed entry among several). A list of devices spreads the block's direct children that
    hold parameters, in order, each to the device with the fewest bytes so far (the first device
    starts with the block's own parameters)."""
    out: dict[str, torch.device] = {}
    if devmap.modules:
        for name, _ in block.named_modules():
            if not name or any(name.startswith(p + ".") for p in out):
                continue
            dev = next((d for key, d in devmap.modules if _matches(key, name)), None)
            if dev is not None:
                out[name] = dev
        return {k: v for k, v in out.items() if v != devmap.primary}
    if len(devmap.devices) < 2:
        return {}
    load = {d: 0 for d in devmap.devices}
    load[devmap.primary] = sum(p.numel() * p.element_size() for p in block.parameters(recurse=False))
    for name, child in block.named_children():
        size = _param_bytes(child)
        if not size:
            continue
        dev = min(devmap.devices, key=lambda d: (load[d], devmap.devices.index(d)))
        load[dev] += size
        out[name] = dev
    return {k: v for k, v in out.items() if v != devmap.primary}


def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def place_block(block: nn.Module, devmap: DeviceMap, dtype: torch.dtype, keep_dtype: tuple[nn.Module, ...] = ()
                ) -> list:
    """Move the block to ``devmap.primary`` in ``dtype`` (the modules in ``keep_dtype`` in their
    own) and its assigned modules to their devices; returns the hook handles (remove them when the
    block is done)."""
    block.to(device=devmap.primary)
    keep = {id(m) for m in keep_dtype}
    for mod in block.modules():
        if id(mod) not in keep:
            mod._apply(lambda t: t.to(dtype) if t.is_floating_point() else t, recurse=False)
    handles = []
    for name, dev in assign_devices(block, devmap).items():
        mod = block.get_submodule(name)
        mod.to(dev)
        handles.append(mod.register_forward_pre_hook(
            lambda _m, args, kwargs, dev=dev: (_move(args, dev), _move(kwargs, dev)), with_kwargs=True))
        handles.append(mod.register_forward_hook(lambda _m, _a, out: _move(out, devmap.primary)))
    return handles
