"""Command line: ``signround --model PATH --scheme W4A16 ... --format auto_round --output_dir OUT``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError, SignRoundError

logger = logging.getLogger("signround")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="signround", description="Quantize a Hugging Face causal LM with SignRound.")
    p.add_argument("--model", "--model_name", dest="model", required=True, help="local model directory")
    p.add_argument("--scheme", default="W4A16", help="preset: W2A16, W2A16G64, W2A16G32, W3A16, W4A16, W8A16")
    p.add_argument("--bits", type=int, default=None, help="override the preset's weight bits")
    p.add_argument("--group_size", type=int, default=None, help="override the group size (-1: per output channel)")
    p.add_argument("--asym", action="store_true", help="asymmetric quantization (zero point)")
    p.add_argument("--layer_config", default=None,
                   help='JSON (or a path to a JSON file): {"name|regex|substring": "W8A16" or {"bits": 8}}')
    p.add_argument("--ignore_layers", default=None, help="comma-separated names/patterns kept in full precision")
    p.add_argument("--quant_lm_head", action="store_true", help="also quantize lm_head (unties tied embeddings)")
    p.add_argument("--to_quant_block_names", default=None, help="override block discovery, e.g. model.layers")
    p.add_argument("--iters", type=int, default=200, help="tuning iterations per block (0: RTN)")
    p.add_argument("--disable_opt_rtn", action="store_true", help="with --iters 0: plain round-to-nearest")
    p.add_argument("--device_map", default=None, help="cpu, cuda, auto or an accelerate device map")
    p.add_argument("--dtype", default="auto", help="dtype to load the model in (auto, float32, float16, bfloat16)")
    p.add_argument("--format", default="auto_round", help="auto_round or fake")
    p.add_argument("--output_dir", required=True, help="the model is written to exactly this directory")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--trust_remote_code", action="store_true", help="run the model repository's own code")
    p.add_argument("--quiet", action="store_true", help="only warnings and errors")
    return p


def _parse_layer_config(value: str | None) -> dict[str, Any] | None:
    if not value:
        return None
    text = Path(value).read_text() if value.strip().endswith(".json") and Path(value).is_file() else value
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--layer_config is not valid JSON ({e}); example: '{{\"mlp.down_proj\": {{\"bits\": 8}}}}'") from e
    if not isinstance(cfg, dict):
        raise ConfigError("--layer_config must be a JSON object mapping layer names/patterns to settings")
    return cfg


def run_quantize(args: argparse.Namespace) -> int:
    from . import export
    from .api import AutoRound

    # Cheap checks first: nothing is loaded before the output target and the format are known good.
    exporter = export.get_exporter(args.format)
    export.check_output_dir(args.output_dir)
    ar = AutoRound(
        args.model,
        scheme=args.scheme,
        bits=args.bits,
        group_size=args.group_size,
        sym=False if args.asym else None,
        layer_config=_parse_layer_config(args.layer_config),
        ignore_layers=args.ignore_layers,
        quant_lm_head=args.quant_lm_head,
        iters=args.iters,
        disable_opt_rtn=args.disable_opt_rtn,
        to_quant_block_names=args.to_quant_block_names,
        device_map=args.device_map,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        seed=args.seed,
    )
    ar.quantize_and_save(args.output_dir, format=exporter.name)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return run_quantize(args)
    except SignRoundError as e:
        print(f"signround: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
