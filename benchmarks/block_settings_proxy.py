"""Compare tuning settings cheaply: tune a few blocks of a model under each setting and score them
on held-out text.

    python3 benchmarks/block_settings_proxy.py --scheme W4A16 --blocks 3,14,26 \
        --variants '[{"iters": 50}, {"iters": 30, "lr": 0.01, "minmax_lr": 0.0025}]'

Each chosen block gets its inputs from the fp model (the fp chain), is tuned on the benchmark's
calibration texts (the same 16 x 256 tokens ``bench_vs_upstream.py`` gives both tools) with the
settings of a variant (``TuneConfig`` fields; ``label`` names it), and is then scored by the MSE
between its outputs and the fp block's on held-out text: 16 x 256 tokens from the middle of WikiText-2
test and of tinyshakespeare, disjoint from the windows ``bench_vs_upstream.py`` scores perplexity on. A block
takes seconds where a whole-model run takes minutes, so settings can be swept here and only the
promising ones confirmed with ``bench_vs_upstream.py``. Prints one row per variant (per block:
held-out MSE, calibration MSE, tuning seconds) and writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from bench_vs_upstream import CORPORA, calibration_texts  # noqa: E402


def held_out_ids(tok, corpus: str, nsamples: int, seqlen: int) -> torch.Tensor:
    """nsamples x seqlen tokens from the middle of a perplexity corpus (its windows are at the start)."""
    from signround.eval import read_text

    text = read_text(CORPORA[corpus])
    mid = len(text) // 2
    ids = tok(text[mid : mid + 40 * nsamples * seqlen], return_tensors="pt").input_ids[0]
    if ids.numel() < nsamples * seqlen:
        raise SystemExit("not enough held-out text for nsamples x seqlen")
    return ids[: nsamples * seqlen].reshape(nsamples, seqlen)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / ".bench" / "SmolLM2-135M"))
    ap.add_argument("--scheme", default="W4A16")
    ap.add_argument("--group_size", type=int, default=64)
    ap.add_argument("--blocks", default="3,14,26")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--variants", required=True, help="JSON list of TuneConfig overrides, each with an optional label")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    from signround import AutoRound
    from signround.model.capture import block_forward, capture_block_inputs, cast_kwargs
    from signround.model.layers import get_module
    from signround.tune import pipeline
    from signround.errors import ConfigError
    from signround.tune.config import tune_config

    try:
        variants = json.loads(args.variants)
        settings = [{k: x for k, x in v.items() if k != "label"} for v in variants]
        configs = [(v.get("label", json.dumps(v, sort_keys=True)),
                    tune_config(nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size, **o))
                   for v, o in zip(variants, settings)]
    except (json.JSONDecodeError, AttributeError, TypeError, ConfigError) as e:
        raise SystemExit(f"--variants must be a JSON list of objects of TuneConfig fields (and a label): {e}") from None
    blocks = [int(b) for b in args.blocks.split(",")]
    texts = calibration_texts(args.model, args.nsamples, args.seqlen)
    ar = AutoRound(args.model, scheme=args.scheme, group_size=args.group_size, sym=True, nsamples=args.nsamples,
                   seqlen=args.seqlen, batch_size=args.batch_size, dataset=texts)
    model = ar.model.float()
    names = ar.plan.block_names
    if not all(0 <= i < len(names) for i in blocks):
        raise SystemExit(f"--blocks: the model has blocks 0..{len(names) - 1}, got {args.blocks}")
    dev = torch.device("cpu")
    bs = args.batch_size
    x_cal, kwargs, _ = capture_block_inputs(model, names, ar.calibration_ids(), bs, dev)
    corpora = list(CORPORA)
    x_held = {c: capture_block_inputs(model, names, held_out_ids(ar.tokenizer, c, args.nsamples, args.seqlen), bs, dev)[0]
              for c in corpora}

    def batched(fn, x):
        with torch.no_grad():
            return torch.cat([fn(x[i : i + bs]) for i in range(0, x.shape[0], bs)])

    inputs = {}  # block index -> (calibration inputs, held-out inputs, its keyword arguments), fp chain
    for i, name in enumerate(names[: max(blocks) + 1]):
        blk, kw = get_module(model, name), cast_kwargs(kwargs[name], dev, torch.float32)
        if i in blocks:
            inputs[i] = (x_cal, x_held, kw)
        x_cal = batched(lambda xb: block_forward(blk, xb, kw), x_cal)
        x_held = {c: batched(lambda xb: block_forward(blk, xb, kw), h) for c, h in x_held.items()}

    print("| setting | " + " | ".join(" | ".join(f"block {i} {c}" for c in corpora) + " | calibration | s" for i in blocks) + " |")
    print("|---|" + "---|" * ((len(corpora) + 2) * len(blocks)))
    targets = {}  # (block, autocast dtype) -> fp block outputs on (calibration, {corpus: held-out})
    rows = []
    for (label, cfg), o in zip(configs, settings):
        per_block = {}
        for i in blocks:
            x, h, kw = inputs[i]
            fp_blk = get_module(model, names[i])
            blk = copy.deepcopy(fp_blk)
            prefix = names[i] + "."

            def run(unit, xb, kw=kw):
                with pipeline._autocast(dev, cfg):
                    return block_forward(unit, xb, kw)

            key = (i, pipeline.amp_dtype(dev, cfg))
            if key not in targets:
                targets[key] = (batched(lambda xb: run(fp_blk, xb), x),
                                {c: batched(lambda xb: run(fp_blk, xb), hc) for c, hc in h.items()})
            y_cal, y_held = targets[key]
            layers = {n[len(prefix):]: (get_module(blk, n[len(prefix):]), ar.plan.specs[n]) for n in ar.plan.layers_of(names[i])}
            gen = torch.Generator().manual_seed(cfg.seed)
            t0 = time.perf_counter()
            res = pipeline._quantize_unit(blk, layers, run, x, lambda idx, xb: y_cal[idx], cfg, dev, bs, gen)
            seconds = time.perf_counter() - t0
            held = {c: F.mse_loss(batched(lambda xb: run(blk, xb), hc).float(), y_held[c].float()).item()
                    for c, hc in h.items()}
            per_block[i] = {"held_out": held, "calibration": res.stats.loss_final, "start": res.stats.loss_start,
                            "best_iter": res.stats.best_iter, "seconds": round(seconds, 2)}
        rows.append({"label": label, "settings": o, "blocks": per_block})
        cells = " | ".join(" | ".join(f"{d['held_out'][c]:.5f}" for c in corpora) + f" | {d['calibration']:.5f} | {d['seconds']:.1f}"
                           for d in per_block.values())
        print(f"| {label} | {cells} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"scheme": args.scheme, "group_size": args.group_size, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
