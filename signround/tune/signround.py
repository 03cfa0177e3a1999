"""SignRound: tune rounding offsets V and per-group clipping scales by signed gradient descent.

For one "unit" (a decoder block, or a single layer outside blocks) the quantized unit on quantized
inputs is fit to the fp unit's outputs on fp inputs with MSE; each step moves every parameter by
``lr * sign(grad)`` with lr decaying linearly to 0, V kept in [-0.5, 0.5] and scales in [0, 1].
The parameters of the iteration whose minibatch loss is lowest relative to the same samples'
starting loss are kept, and the result is compared with the starting point (RTN / optimized RTN) on all calibration samples, so tuning never makes a unit worse.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch import nn

from ..model.layers import attach_act_quant, get_weight, set_module, set_weight
from ..qdq import QParams, n_groups, qdq, qdq_in_rows
from ..qdq.act import qdq_act
from ..schemes import QuantSpec
from . import kernels
from .config import TuneConfig
from .rtn import compact

logger = logging.getLogger(__name__)


def _qdq_values(spec: QuantSpec) -> Callable:
    def fn(w, v, mn, mx):
        return qdq(w, spec, v=v, min_scale=mn, max_scale=mx)[0]

    return fn


def compiled_qdq(spec: QuantSpec) -> Callable | None:
    """A torch.compile'd qdq for this spec (fused elementwise kernels), or None when compiling
    is unavailable here."""
    return kernels.compiled(("qdq", spec), _qdq_values(spec))


def qdq_values(spec: QuantSpec, w: torch.Tensor, v: torch.Tensor, min_scale: torch.Tensor,
               max_scale: torch.Tensor, compile_qdq: bool) -> torch.Tensor:
    """qdq(w) values, through the compiled kernel when asked and available (eager otherwise, and
    for good after a compile failure)."""
    if compile_qdq:
        if w.dtype in (torch.float16, torch.bfloat16) and _padded(w.shape[1], spec.group_size):
            # torch 2.13's inductor CPU code stores garbage (even NaN) into a half-precision
            # result's short last group (a padded reduction, then the cast back): SmolLM2's 576
            # inputs at group 128 under bf16 autocast. Such weights go through in float32.
            return kernels.call(("qdq", spec), _qdq_values(spec), w.float(), v, min_scale, max_scale).to(w.dtype)
        return kernels.call(("qdq", spec), _qdq_values(spec), w, v, min_scale, max_scale)
    return qdq(w, spec, v=v, min_scale=min_scale, max_scale=max_scale)[0]


def _padded(in_features: int, group_size: int) -> bool:
    return group_size > 0 and in_features % group_size != 0


class TunableLayer(nn.Module):
    """Stands in for a Linear/Conv1D during tuning: computes with qdq(W; V, min_scale, max_scale)."""

    def __init__(
        self,
        module: nn.Module,
        spec: QuantSpec,
        min_scale: torch.Tensor | None,
        max_scale: torch.Tensor | None,
        tune_minmax: bool,
        compile_qdq: bool = False,
        scale_bound: float = 1.0,
    ):
        super().__init__()
        self.orig = module
        self.spec = spec
        self.compile_qdq = compile_qdq
        self.scale_bound = scale_bound  # the clipping scales are kept in [0, scale_bound]
        # the weight as the module holds it (a bf16 checkpoint's block tuned under autocast keeps
        # its quantized layers in bf16, half a float32 copy): every qdq function upcasts exactly
        w = get_weight(module).detach()
        self.register_buffer("w", w, persistent=False)
        # a buffer, so that --enable_norm_bias_tuning can put a tuned offset on it (TunableOffset)
        self.register_buffer("bias", None if module.bias is None else module.bias.detach().float(), persistent=False)
        ng = n_groups(w.shape[1], spec.group_size)
        ones = torch.ones(w.shape[0], ng, device=w.device)
        self.v = nn.Parameter(torch.zeros_like(w, dtype=torch.float32))
        mn = ones if min_scale is None else min_scale.to(w.device).float()
        mx = ones if max_scale is None else max_scale.to(w.device).float()
        self.min_scale = nn.Parameter(mn.clone(), requires_grad=tune_minmax)
        self.max_scale = nn.Parameter(mx.clone(), requires_grad=tune_minmax)
        # activation quantization: static range measured in a calibration pass (collect_act=True)
        self.act_amax: torch.Tensor | None = None
        self.collect_act = False
        # qdq weights shared by the forwards of one step (see shared_weights): the leaf the
        # forwards use; with ``_w_grad`` its gradient is carried back to (v, min_scale, max_scale)
        self._w_leaf: torch.Tensor | None = None
        self._w_grad = False
        self._momentum: dict[int, torch.Tensor] = {}
        # backprop_shared(sign_only=True): the signs of the gradients as int8, a quarter of float32
        # gradients, when the plain signed step is all that reads them
        self._signs: dict[int, torch.Tensor] = {}
        self.frozen = False  # kept at the start: no gradient is carried to its parameters

    def qdq_weight(self) -> tuple[torch.Tensor, QParams]:
        """The final qdq weight and its QParams, a few rows at a time where the data type allows
        (the end of a block otherwise holds a whole layer's float32 temporaries at once)."""
        with torch.no_grad():
            return qdq_in_rows(self.w, self.spec, v=self.v, min_scale=self.min_scale, max_scale=self.max_scale)

    def qdq_values(self) -> torch.Tensor:
        return qdq_values(self.spec, self.w, self.v, self.min_scale, self.max_scale, self.compile_qdq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.collect_act:
            a = x.detach().abs().amax().float()
            self.act_amax = a if self.act_amax is None else torch.maximum(self.act_amax, a)
        elif self.spec.act_quantized:
            x = qdq_act(x, self.spec, self.act_amax)
        w = self._w_leaf if self._w_leaf is not None else self.qdq_values()
        home = x.device
        if home != w.device:  # a layer placed on another device by --device_map (see tune/placement.py)
            x = x.to(w.device)
        bias = self.bias
        if not torch.is_autocast_enabled(x.device.type):  # autocast casts both itself, without a float32 copy
            w, bias = w.to(x.dtype), None if bias is None else bias.to(x.dtype)
        y = F.linear(x, w, bias)
        return y if y.device == home else y.to(home)

    def fp_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def share_weight(self, grad: bool, dtype: torch.dtype | None = None) -> None:
        """Compute the qdq weight once for the forwards that follow (until backprop_shared);
        ``dtype``: hold it (and its gradient) in the autocast dtype the forwards compute in, which
        autocast would cast it to anyway (half the memory of a float32 copy and its gradient)."""
        with torch.no_grad():
            self._w_leaf = self.qdq_values()
            if dtype is not None:
                self._w_leaf = self._w_leaf.to(dtype)
        self._w_grad = grad
        if grad:  # the graph to the parameters is rebuilt one layer at a time in backprop_shared
            self._w_leaf.requires_grad_()

    def state(self, zero_v: bool = False, compact: bool = False) -> list[torch.Tensor | None]:
        """A copy of the parameters; ``zero_v``: the offsets are all zero (the start), kept as None
        instead of a weight-sized copy; ``compact``: the offsets in float16 (the best iteration's
        copy: half the memory; |v| <= 0.5 keeps them to 1.2e-4, which moves a rounding decision
        for about one weight in 4000)."""
        v = None if zero_v else self.v.detach().to(torch.float16 if compact else self.v.dtype, copy=True)
        return [v, self.min_scale.detach().clone(), self.max_scale.detach().clone()]

    def load(self, state: list[torch.Tensor | None]) -> None:
        with torch.no_grad():
            for p, s in zip((self.v, self.min_scale, self.max_scale), state):
                if s is None:
                    p.zero_()
                else:
                    p.copy_(s)

    def save_into(self, state: list[torch.Tensor]) -> None:
        """Copy the parameters into an existing state (no allocation in the tuning loop)."""
        with torch.no_grad():
            for p, s in zip((self.v, self.min_scale, self.max_scale), state):
                s.copy_(p)

    def _ranges(self) -> tuple[tuple[nn.Parameter, float, float], ...]:
        """Each tuned parameter with the range it is kept in."""
        b = self.scale_bound
        return (self.v, -0.5, 0.5), (self.min_scale, 0.0, b), (self.max_scale, 0.0, b)

    @torch.no_grad()
    def signed_step(self, lr: float, minmax_lr: float, momentum: float = 0.0) -> None:
        """p -= lr * sign(grad) (with ``momentum``: sign of the running sum m = momentum * m + grad,
        upstream's --momentum), in place on the gradient buffers; clear the gradients."""
        for (p, lo, hi), step in zip(self._ranges(), (lr, minmax_lr, minmax_lr)):
            g = self._signs.pop(id(p), None)  # backprop_shared(sign_only=True) kept only the sign
            if g is None:
                g = grad_sign(p, momentum, self._momentum)
            if g is not None:
                p.add_(g, alpha=-step).clamp_(lo, hi)

    def clamp_(self) -> None:
        """Keep the parameters in their ranges after an optimizer step (--adam)."""
        with torch.no_grad():
            for p, lo, hi in self._ranges():
                p.clamp_(lo, hi)

    @torch.no_grad()
    def bake(self) -> QParams:
        """Write the qdq weight into the wrapped module and return its QParams."""
        w_qdq, qp = self.qdq_weight()
        set_weight(self.orig, w_qdq)
        if self.orig.bias is not None:  # tuned by --enable_norm_bias_tuning, else the same values
            self.orig.bias.data.copy_(self.bias.to(self.orig.bias.dtype))
        attach_act_quant(self.orig, self.spec, self.act_amax)
        qp.input_amax = self.act_amax
        return compact(qp)


@torch.no_grad()
def grad_sign(p: nn.Parameter, momentum: float, buffers: dict[int, torch.Tensor]) -> torch.Tensor | None:
    """The sign of ``p``'s gradient (with ``momentum``: of the running sum ``m = momentum * m + grad``
    kept in ``buffers``), the gradient cleared; None without a gradient."""
    if p.grad is None:
        return None
    g = p.grad
    if momentum:
        buf = buffers.get(id(p))
        g = buffers[id(p)] = g if buf is None else buf.mul_(momentum).add_(g)
        g = g.sign()
    else:
        g = g.sign_()
    p.grad = None
    return g


class _Offset(nn.Module):
    def __init__(self, owner: "TunableOffset"):
        super().__init__()
        self.owner = [owner]  # not a submodule: the owner holds this parametrization

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.owner[0]
        return (o.w0 + o.v * o.step).to(x.dtype)


class TunableOffset(nn.Module):
    """--enable_norm_bias_tuning (upstream's): a norm weight or a Linear bias tuned as
    ``w + v * step`` with ``v`` in [-0.5, 0.5] and ``step`` a 4-bit step of the tensor's range,
    through a parametrization of the module's tensor; the same signed steps as the rounding."""

    def __init__(self, module: nn.Module, attr: str):
        super().__init__()
        self.module, self.attr = module, attr
        t = getattr(module, attr).detach()
        self.register_buffer("w0", t.float().clone(), persistent=False)
        self.step = float((self.w0.max() - self.w0.min()).clamp_min(1e-5) / 15)
        self.v = nn.Parameter(torch.zeros_like(self.w0))
        self._momentum: dict[int, torch.Tensor] = {}
        parametrize.register_parametrization(module, attr, _Offset(self), unsafe=True)

    def state(self, zero_v: bool = False, compact: bool = False) -> list[torch.Tensor | None]:
        return [None if zero_v else self.v.detach().clone()]  # norm/bias offsets: small, kept exact

    def load(self, state: list[torch.Tensor | None]) -> None:
        with torch.no_grad():
            self.v.zero_() if state[0] is None else self.v.copy_(state[0])

    def save_into(self, state: list[torch.Tensor]) -> None:
        with torch.no_grad():
            state[0].copy_(self.v)

    @torch.no_grad()
    def signed_step(self, lr: float, minmax_lr: float, momentum: float = 0.0) -> None:
        g = grad_sign(self.v, momentum, self._momentum)
        if g is not None:
            self.v.add_(g, alpha=-lr).clamp_(-0.5, 0.5)

    def clamp_(self) -> None:
        with torch.no_grad():
            self.v.clamp_(-0.5, 0.5)

    @torch.no_grad()
    def bake(self) -> None:
        """Keep the tuned values in the module's own tensor and dtype; drop the parametrization."""
        value = self.w0 + self.v * self.step
        parametrize.remove_parametrizations(self.module, self.attr, leave_parametrized=False)
        getattr(self.module, self.attr).data.copy_(value.to(getattr(self.module, self.attr).dtype))


def norm_bias_offsets(unit: nn.Module, wrappers: dict[str, "TunableLayer"]) -> dict[str, TunableOffset]:
    """The norm weights of ``unit`` and the biases of its quantized layers, as tunable offsets."""
    out: dict[str, TunableOffset] = {}
    for name, m in unit.named_modules():
        if "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), nn.Parameter) \
                and m.weight.dim() == 1:
            out[f"{name}.weight"] = TunableOffset(m, "weight")
    for rel, wr in wrappers.items():
        if wr.bias is not None:
            out[f"{rel}.bias"] = TunableOffset(wr, "bias")
    return out


@contextlib.contextmanager
def shared_weights(wrappers: list[TunableLayer], grad: bool, dtype: torch.dtype | None = None):
    """Inside the context, every forward of these layers uses qdq weights computed once on entry. With ``grad``,
    the forwards' backward passes accumulate gradients on those weights, and ``backprop_shared``
    carries the sum through qdq to the offsets and clipping scales in one pass: a minibatch can
    then run as several smaller forward/backward passes (less activation memory) whose gradient
    is the whole minibatch's, for one qdq forward and backward per step."""
    for w in wrappers:
        w.share_weight(grad and not w.frozen, dtype)
    try:
        yield
    finally:
        for w in wrappers:
            w._w_leaf, w._w_grad = None, False


def backprop_shared(wrappers: list[TunableLayer], sign_only: bool = False) -> None:
    """Carry the gradients gathered on the shared qdq weights back to each layer's parameters.

    The qdq is recomputed here with its graph, one layer at a time: holding every layer's qdq
    graph from the step's start to its end cost several weight-sized intermediates per layer
    (the whole block's at once); recomputing costs one more elementwise qdq per layer and step.
    ``sign_only`` (one backward per step, plain signed steps): keep only each gradient's sign,
    as int8, for :meth:`TunableLayer.signed_step`."""
    for w in wrappers:
        if w._w_grad and w._w_leaf is not None and w._w_leaf.grad is not None:
            grad, w._w_leaf.grad = w._w_leaf.grad, None
            out = w.qdq_values().to(grad.dtype)
            if not sign_only:
                torch.autograd.backward(out, grad)
                continue
            params = [p for p in (w.v, w.min_scale, w.max_scale) if p.requires_grad]
            for p, g in zip(params, torch.autograd.grad(out, params, grad, allow_unused=True)):
                if g is not None:
                    w._signs[id(p)] = g.sign().to(torch.int8)


# On a CPU a minibatch runs as forward/backward passes of at most this many tokens: activation
# memory then stays that of a small batch, and matmuls of this height still run at full speed.
CPU_MICRO_TOKENS = 1024


def micro_batch_size(bs: int, x: torch.Tensor, device: torch.device) -> int:
    """Samples per forward/backward pass within a minibatch of ``bs`` (all of it off the CPU)."""
    if device.type != "cpu" or x.dim() < 3:
        return bs
    tokens = max(1, x[0].numel() // x.shape[-1])
    return max(1, min(bs, CPU_MICRO_TOKENS // tokens))


@dataclass
class UnitStats:
    loss_rtn: float  # plain RTN on all calibration samples
    loss_start: float  # the starting point (RTN or optimized RTN) on all calibration samples
    loss_final: float  # what is kept, on all calibration samples
    loss_iter0: float  # minibatch loss at iteration 0
    loss_best: float  # minibatch loss at the kept iteration
    best_iter: int
    iters_run: int

    def as_dict(self) -> dict[str, Any]:
        # JSON has no inf/nan: statistics of loops that did not run are None
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in self.__dict__.items()}


@dataclass
class UnitResult:
    qparams: dict[str, QParams]
    stats: UnitStats
    outputs: torch.Tensor | None  # the unit's outputs with the kept parameters (keep_outputs=True)


@dataclass
class _Pass:
    loss: float  # MSE over all samples
    per_sample: torch.Tensor  # MSE of each sample (CPU, float64)
    outputs: torch.Tensor | None


def alg_ext(spec: QuantSpec) -> tuple[bool, float]:
    """SignRoundV2's tuning extensions for a layer (``--enable_alg_ext``), as upstream applies them
    to symmetric integer, MX and NV schemes (not GGUF's double-quantized types): (whether the block
    loss leaves out the largest 0.1% of output errors, the upper bound of the clipping scales).

    Below 4 bits (or with activations at 4 bits or fewer) a few outputs with huge errors dominate
    the squared loss and its signs; leaving them out tunes for the bulk. The clipping scales may
    grow to twice the starting range instead of only shrinking it."""
    if not (spec.quantized and spec.sym and spec.ggml_type is None and spec.data_type in ("int", "mx_fp", "nv_fp")):
        return False, 1.0
    return spec.bits < 4 or (spec.act_quantized and spec.act_bits <= 4), 2.0


def sample_errors(out: torch.Tensor, target: torch.Tensor, suppress: bool = False) -> torch.Tensor:
    """Squared errors ``[B, n]`` of each sample's outputs (float32); ``suppress``: the largest 0.1%
    of each sample's errors set to zero (alg_ext)."""
    sq = F.mse_loss(out.float(), target.float(), reduction="none").reshape(out.shape[0], -1)
    if suppress:
        k = max(1, sq.shape[1] // 1000)
        cut = sq.detach().topk(k, dim=1).values[:, -1:]
        sq = torch.where(sq.detach() >= cut, torch.zeros_like(sq), sq)
    return sq


def block_loss(out: torch.Tensor, target: torch.Tensor, suppress: bool = False) -> torch.Tensor:
    """The tuning loss: MSE over the minibatch (without each sample's largest errors when ``suppress``)."""
    return sample_errors(out, target, True).mean() if suppress else F.mse_loss(out.float(), target.float())


def _full_pass(
    run: Callable[[torch.Tensor, slice], torch.Tensor],
    x: torch.Tensor,
    target: Callable[[slice], torch.Tensor],
    bs: int,
    keep_outputs: bool = False,
    suppress: bool = False,
) -> _Pass:
    """MSE against the targets over all samples; optionally the outputs too (stored like x)."""
    per, outs = [], []
    with torch.no_grad():
        for i in range(0, x.shape[0], bs):
            sl = slice(i, i + bs)
            out = run(x[sl], sl)
            per.append(sample_errors(out, target(sl), suppress).double().mean(1).cpu())
            if keep_outputs:
                outs.append(out.to(x.device, x.dtype))  # stored like the inputs (the cache dtype)
    per_sample = torch.cat(per) if per else torch.zeros(0, dtype=torch.float64)
    loss = per_sample.mean().item() if per else 0.0  # samples have equal lengths
    return _Pass(loss, per_sample, torch.cat(outs) if keep_outputs else None)


class _Importance:
    """Per input channel sum of x^2 of each wrapped layer's inputs, while hooked."""

    def __init__(self, wrappers: dict[str, TunableLayer]):
        self.acc: dict[str, torch.Tensor] = {}
        self.handles = [w.register_forward_pre_hook(self._hook(rel)) for rel, w in wrappers.items()]

    def _hook(self, rel: str):
        def hook(_m, args):
            a = args[0].detach().float()
            s = (a * a).reshape(-1, a.shape[-1]).sum(0)
            self.acc[rel] = self.acc[rel] + s if rel in self.acc else s

        return hook

    def close(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        return self.acc


InitFn = Callable[[dict[str, torch.Tensor]], dict[str, tuple[torch.Tensor, torch.Tensor]]]


def tune_unit(
    unit: nn.Module,
    layers: dict[str, tuple[nn.Module, QuantSpec]],
    x_q: torch.Tensor,
    target: Callable[[torch.Tensor, Any], torch.Tensor],
    run: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    cfg: TuneConfig,
    device: torch.device,
    init: InitFn | None = None,
    generator: torch.Generator | None = None,
    keep_outputs: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    compute_dtype: torch.dtype | None = None,
    frozen: frozenset[str] = frozenset(),
) -> UnitResult:
    """Tune the layers of ``unit`` and bake them; returns their QParams and loss statistics.

    ``layers`` maps a name relative to ``unit`` ("" when the unit is the layer itself) to
    (module, spec). ``target(idx_or_slice, x_batch)`` gives the fp outputs for those samples;
    ``run(unit, x, idx)`` computes the unit's output for them. ``init(importance)`` returns starting
    (min_scale, max_scale) per layer from the per-channel input importance, which is collected
    during the plain-RTN pass (inputs of later layers thus see earlier layers quantized).
    With ``keep_outputs`` the unit's outputs for the kept parameters come back too (the next
    unit's quantized-chain inputs), saving a forward pass. ``on_step(iteration, minibatch loss)``
    is called after every iteration (the progress bar's live loss). ``compute_dtype``: the autocast
    dtype ``run`` computes in (None: float32), in which the shared qdq weights are held.
    ``frozen``: layers kept at their start (experts routed too few tokens to tune on).
    """
    wrappers: dict[str, TunableLayer] = {}
    for rel, (mod, spec) in layers.items():
        bound = alg_ext(spec)[1] if cfg.enable_alg_ext else 1.0
        wrappers[rel] = TunableLayer(mod, spec, None, None, cfg.enable_minmax_tuning,
                                     cfg.enable_torch_compile and cfg.iters > 0, bound)
        wrappers[rel].frozen = rel in frozen
    suppress = cfg.enable_alg_ext and any(alg_ext(spec)[0] for _, spec in layers.values())
    holder = unit
    if "" in wrappers:  # the unit is a single layer: tune the wrapper itself
        unit = wrappers[""]
    else:
        for rel, wr in wrappers.items():
            set_module(holder, rel, wr)
    offsets: dict[str, TunableOffset] = {}
    try:
        for p in holder.parameters():
            p.requires_grad_(False)
        if cfg.enable_norm_bias_tuning and cfg.iters:
            offsets = norm_bias_offsets(holder, wrappers)
        for wr in wrappers.values():
            wr.v.requires_grad_(True)
            wr.min_scale.requires_grad_(cfg.enable_minmax_tuning)
            wr.max_scale.requires_grad_(cfg.enable_minmax_tuning)
        n = x_q.shape[0]
        bs = min(cfg.batch_size, n)
        mb = micro_batch_size(bs, x_q, device)
        layer_list = list(wrappers.values())
        # cached activations may be half precision; the block computes in float32 (or autocast)
        full_target = lambda sl: target(sl, x_q[sl].to(device, torch.float32))  # noqa: E731
        run_unit = lambda xb, sl: run(unit, xb.to(device, torch.float32), sl)  # noqa: E731

        def full_pass(keep: bool = False) -> _Pass:
            with shared_weights(layer_list, grad=False, dtype=compute_dtype):  # one qdq per layer for the pass
                return _full_pass(run_unit, x_q, full_target, bs, keep, suppress)

        collect = [w for w in wrappers.values() if w.spec.needs_act_range]
        if collect:  # static activation ranges, measured with the RTN weights of earlier layers
            for w in collect:
                w.collect_act = True
            try:
                full_pass()  # the wrappers record the ranges
            finally:
                for w in collect:
                    w.collect_act = False
        imp = _Importance(wrappers) if init is not None else None
        try:  # plain RTN (the wrappers start with no offsets and full range)
            rtn = full_pass(keep_outputs and init is None)
        finally:
            importance = imp.close() if imp is not None else {}
        start = rtn
        if init is not None:
            for rel, (mn, mx) in init(importance).items():
                wrappers[rel].load([None, mn, mx])  # no offsets at the start
            start = full_pass(keep_outputs)
        loss_rtn, loss_start, out_start = rtn.loss, start.loss, start.outputs
        # Minibatches differ in difficulty (at 2 bits some samples' losses are several times
        # others'), so the best iteration is the one whose minibatch loss is lowest relative to
        # the same samples' starting loss, not the lowest raw loss (which favours easy batches).
        # Choosing between it and the last iterate by the loss on all calibration samples was
        # measured and dropped: lower calibration losses on every block, but SmolLM2-135M W2G64
        # WikiText-2 263.26 vs 251.95 and W4G64 tinyshakespeare 48.19 vs 46.92 (16 x 256 tokens).
        ref = start.per_sample.clamp_min(torch.finfo(torch.float64).tiny)
        # the rounding and clipping of each layer, and the norm / bias offsets, tuned alike
        tunables: dict[str, TunableLayer | TunableOffset] = {**wrappers, **offsets}
        start_state = {k: w.state(zero_v=True) for k, w in tunables.items()}  # the start has no offsets

        lrs = {k: cfg.lrs_for(w.spec) for k, w in wrappers.items()}
        first_lr = next(iter(lrs.values()))
        lrs.update({k: first_lr for k in offsets})
        adam = None
        if cfg.enable_adam and cfg.iters:  # upstream's --adam: AdamW on the same parameters
            groups = []
            for k, w in wrappers.items():
                groups.append({"params": [w.v], "lr": lrs[k][0], "base": lrs[k][0]})
                if cfg.enable_minmax_tuning:
                    groups.append({"params": [w.min_scale, w.max_scale], "lr": lrs[k][1], "base": lrs[k][1]})
            groups += [{"params": [o.v], "lr": lrs[k][0], "base": lrs[k][0]} for k, o in offsets.items()]
            adam = torch.optim.AdamW(groups, weight_decay=0.0)
        # gradients read only by the plain signed step, once per step: their signs are enough
        sign_only = adam is None and not cfg.momentum and cfg.gradient_accumulate_steps == 1
        best = best_score = math.inf
        best_state = {k: w.state(compact=True) for k, w in tunables.items()} if cfg.iters else start_state
        best_iter = 0
        loss_iter0 = math.nan
        perm = torch.randperm(n, generator=generator)
        pos = 0
        for it in range(cfg.iters):
            # the step after the last evaluation is never scored, so it only matters when the
            # final parameters are kept as they are (not_use_best_mse): skip its backward otherwise
            last_unscored = it == cfg.iters - 1 and not cfg.not_use_best_mse
            total = ref_total = 0.0
            for _ in range(cfg.gradient_accumulate_steps):
                if pos + bs > n:
                    perm = torch.randperm(n, generator=generator)
                    pos = 0
                idx = perm[pos : pos + bs]
                pos += bs
                with shared_weights(layer_list, grad=not last_unscored, dtype=compute_dtype):
                    for sub in idx.split(mb):
                        xb = x_q[sub].to(device, torch.float32)
                        with torch.no_grad():
                            tb = target(sub, xb)
                        share = len(sub) / (len(idx) * cfg.gradient_accumulate_steps)
                        with torch.no_grad() if last_unscored else contextlib.nullcontext():
                            loss = block_loss(run(unit, xb, sub), tb, suppress) * share
                        if not last_unscored:
                            loss.backward()
                        total += loss.item()
                    if not last_unscored:
                        backprop_shared(layer_list, sign_only)
                ref_total += ref[idx].mean().item() / cfg.gradient_accumulate_steps
            if not math.isfinite(total):
                logger.warning("non-finite loss at iteration %d; keeping the best parameters found so far", it)
                break
            if it == 0:
                loss_iter0 = total
            if on_step is not None:
                on_step(it, total)
            score = total / ref_total
            if score < best_score:
                best_score, best, best_iter = score, total, it
                if not cfg.not_use_best_mse:
                    for k, w in tunables.items():
                        w.save_into(best_state[k])
            if last_unscored:
                break
            decay = 1.0 - it / cfg.iters
            if adam is not None:
                for group in adam.param_groups:
                    group["lr"] = group["base"] * decay
                adam.step()
                adam.zero_grad(set_to_none=True)
                for wr in tunables.values():
                    wr.clamp_()
                continue
            for k, wr in tunables.items():
                wr.signed_step(lrs[k][0] * decay, lrs[k][1] * decay, cfg.momentum)
        iters_run = it + 1 if cfg.iters else 0
        if cfg.not_use_best_mse:
            best_state = {k: w.state() for k, w in tunables.items()}
        loss_final, outputs = loss_start, out_start
        if iters_run:
            for k, w in tunables.items():
                w.load(best_state[k])
            final = full_pass(keep_outputs)
            loss_final, outputs = final.loss, final.outputs
            if not loss_final <= loss_start:  # worse (or NaN) after tuning: keep the starting point
                for k, w in tunables.items():
                    w.load(start_state[k])
                loss_final, outputs = loss_start, out_start
        for o in offsets.values():
            o.bake()
        offsets = {}
        qparams = {rel: w.bake() for rel, w in wrappers.items()}
    finally:
        for o in offsets.values():  # an error: the modules go back to their own tensors
            parametrize.remove_parametrizations(o.module, o.attr, leave_parametrized=False)
        if "" not in wrappers:
            for rel, wr in wrappers.items():
                set_module(holder, rel, wr.orig)
    stats = UnitStats(loss_rtn, loss_start, loss_final, loss_iter0, best, best_iter, iters_run)
    return UnitResult(qparams, stats, outputs)
