"""Command line.

    signround --model PATH --scheme W4A16 ... --format auto_round --output_dir OUT [--tasks ...]
    signround eval --model DIR --tasks ppl:wiki.txt,my_task [--limit N]
    signround list formats|schemes
    signround report OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError, SignRoundError
from .tune.config import RECIPES, describe_recipes
from .upstream_only import CLI_ONLY

logger = logging.getLogger("signround")


def _default_scheme(formats: str) -> str:
    """W4A16, or GGUF:TYPE when the only formats asked for are gguf:TYPE (as upstream does)."""
    ggml = {f.strip().lower()[5:] for f in formats.split(",") if f.strip().lower().startswith("gguf:")}
    return f"GGUF:{ggml.pop().upper()}" if len(ggml) == 1 else "W4A16"


def _implied_format(scheme: str | None, auto: Any) -> str:
    """No --format: gguf:TYPE for a GGUF scheme (AutoScheme of GGUF options: the dearest), else auto_round."""
    from .schemes import preset

    if auto is not None:
        from .autoscheme import base_spec

        ggml = base_spec(auto.specs).ggml_type
    else:
        ggml = preset(scheme.upper()).ggml_type if scheme and scheme.upper().startswith("GGUF:") else None
    return f"gguf:{ggml}" if ggml else "auto_round"


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _backend_names() -> list[str]:
    from .inference.backends import BACKENDS

    return ["auto", "packed", *BACKENDS]


def build_parser(prog: str = "signround", recipe: str = "default") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Quantize a Hugging Face causal LM with SignRound.")
    p.add_argument("--recipe", default=recipe, choices=list(RECIPES),
                   help=describe_recipes())
    p.add_argument("model_pos", nargs="?", default=None, metavar="MODEL",
                   help="model directory or Hugging Face Hub id (or --model)")
    p.add_argument("--model", "--model_name", "--model_name_or_path", dest="model", default=None,
                   help="model directory or Hugging Face Hub id (downloaded into the HF cache; from the cache alone "
                        "with HF_HUB_OFFLINE=1)")
    p.add_argument("--platform", "--model_source", dest="model_source", default=None, choices=["hf", "model_scope",
                   "modelscope", "huggingface"], help="where Hub ids come from (default hf; AR_USE_MODELSCOPE=1)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of a Hub id")
    p.add_argument("--scheme", default=None,
                   help="preset: W2A16, W2A16G64, W2A16G32, W3A16, W4A16, W8A16, MXFP4, MXFP8, NVFP4, "
                        "MXFP4A16, NVFP4A16, FPW8A16, FP8_STATIC, GGUF:Q4_K_M ... (default W4A16, or the "
                        "GGUF scheme of a gguf:TYPE format)")
    p.add_argument("--bits", type=float, default=None,
                   help="override the preset's weight bits (with --options: AutoScheme's average bits)")
    p.add_argument("--group_size", type=int, default=None, help="override the group size (-1: per output channel)")
    p.add_argument("--asym", action="store_true", help="asymmetric quantization (zero point)")
    p.add_argument("--data_type", "--dtype", dest="data_type", default=None,
                   help="weight data type: int, mx_fp, nv_fp, fp (upstream's --dtype means this too)")
    p.add_argument("--act_bits", type=int, default=None, help="activation bits (16: weights only)")
    p.add_argument("--act_data_type", "--act_dtype", dest="act_data_type", default=None,
                   help="activation data type: mx_fp, nv_fp, fp, int")
    p.add_argument("--act_group_size", type=int, default=None, help="activation group size (0: per tensor)")
    p.add_argument("--act_dynamic", default=None, type=_bool, help="activation scales per call (True) or static")
    p.add_argument("--disable_act_dynamic", action="store_true", help="static activation scales (= --act_dynamic False)")
    p.add_argument("--layer_config", default=None,
                   help='JSON (or a path to a JSON file): {"name|regex|substring": "W8A16" or {"bits": 8}}')
    a = p.add_argument_group("AutoScheme (mixed per-layer schemes at an average-bit budget)")
    a.add_argument("--avg_bits", "--target_bits", dest="avg_bits", type=float, default=None,
                   help="average bits per weight of the layers chosen for, e.g. 3.0")
    a.add_argument("--options", "--option", "--schemes", dest="options", nargs="+", default=None,
                   help="candidate schemes, e.g. W2A16G64,W3A16G64,W4A16G64 (also MXFP4, MXFP8, NVFP4, BF16; or "
                        "GGUF file types such as GGUF:Q2_K_S,GGUF:Q4_K_M, written as one .gguf)")
    a.add_argument("--ignore_scale_zp_bits", action="store_true",
                   help="count weight bits only (not scales and zero points) against the budget")
    a.add_argument("--shared_layers", nargs="+", action="append", default=None,
                   help="layers that share a scheme, comma-separated names or patterns (repeatable); q/k/v and "
                        "gate/up share one already")
    p.add_argument("--ignore_layers", "--fp_layers", dest="ignore_layers", default=None,
                   help="comma-separated names/patterns kept in full precision")
    p.add_argument("--quant_lm_head", action="store_true", help="also quantize lm_head (unties tied embeddings)")
    p.add_argument("--to_quant_block_names", default=None, help="override block discovery, e.g. model.layers")
    p.add_argument("--iters", "--iter", dest="iters", type=int, default=None,
                   help="tuning iterations per block (default 200; 0: RTN)")
    p.add_argument("--disable_opt_rtn", "--disable-opt-rtn", dest="disable_opt_rtn",
                   action=argparse.BooleanOptionalAction, default=None, help="with --iters 0: plain round-to-nearest")
    p.add_argument("--dataset", default=None,
                   help="calibration data: a.json,b.txt,org/name:num=256:concat=True:apply_chat_template "
                        "(default: the built-in offline corpus)")
    p.add_argument("--nsamples", "--nsample", dest="nsamples", type=int, default=None,
                   help="calibration samples (default 128)")
    p.add_argument("--seqlen", "--seq_len", dest="seqlen", type=int, default=None,
                   help="tokens per calibration sample (default 2048)")
    p.add_argument("--batch_size", "--train_bs", "--bs", dest="batch_size", type=int, default=None, help="default 8")
    p.add_argument("--gradient_accumulate_steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="rounding lr (default 1/iters)")
    p.add_argument("--minmax_lr", type=float, default=None, help="clipping lr (default lr)")
    p.add_argument("--disable_minmax_tuning", action="store_true", help="tune rounding only")
    p.add_argument("--disable_quanted_input", action="store_true", help="feed blocks fp inputs instead of quantized ones")
    p.add_argument("--not_use_best_mse", action="store_true", help="keep the last iteration, not the best")
    p.add_argument("--low_gpu_mem_usage", action="store_true", help="keep cached activations on the CPU")
    p.add_argument("--adam", action="store_true", help="AdamW instead of signed steps (default lr 5e-3)")
    p.add_argument("--momentum", type=float, default=None, help="momentum of the signed steps (default 0)")
    p.add_argument("--enable_deterministic_algorithms", action="store_true",
                   help="torch's deterministic algorithms while tuning (reproducible on GPUs; slower)")
    p.add_argument("--disable_deterministic_algorithms", action="store_true",
                   help="(deprecated upstream; the default)")
    p.add_argument("--enable_alg_ext", action="store_true",
                   help="SignRoundV2's tuning extensions: below 4 bits the block loss leaves out each sample's largest "
                        "0.1%% of output errors, and clipping scales may grow to 2x (symmetric int / MX / NV schemes)")
    p.add_argument("--nblocks", type=int, default=None,
                   help="tune N consecutive blocks as one unit (their layers together, the loss on the last block's "
                        "output; default 1); measured: docs/benchmarks.md")
    p.add_argument("--enable_norm_bias_tuning", action="store_true",
                   help="also tune the blocks' norm weights and the quantized layers' biases (offsets of up to half "
                        "a 4-bit step of each tensor's range, signed steps as the rounding); measured: docs/benchmarks.md")
    p.add_argument("--calibrate_all_experts", action="store_true",
                   help="MoE: every expert computes every calibration token (its importance statistics see them all); "
                        "the block output and the gradients still follow the router")
    p.add_argument("--min_expert_tokens", type=int, default=None,
                   help="MoE: experts routed fewer calibration tokens keep their optimized-RTN start (default 32)")
    p.add_argument("--scale_dtype", default=None,
                   help="dtype integer scales are rounded to and stored in: fp16 (default, what every packed kernel "
                        "reads), bf16 or fp32 (auto_round and llm_compressor files)")
    p.add_argument("--static_kv_dtype", default=None,
                   help="fp8: static per-tensor FP8 scales for the KV cache (k_scale / v_scale of every attention "
                        "layer, measured on the calibration data, in the llm_compressor config's kv_cache_scheme)")
    p.add_argument("--static_attention_dtype", default=None,
                   help="fp8: as --static_kv_dtype, plus the query's q_scale (FP8 attention)")
    p.add_argument("--cache_dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the cached activations (default auto: bf16 where native, fp16 on other GPUs, "
                        "fp32 on CPUs without native bf16); losses stay float32")
    p.add_argument("--disable_amp", action="store_true",
                   help="tune in fp32 instead of bf16 autocast (used on GPUs and CPUs with native bf16)")
    p.add_argument("--enable_torch_compile", action="store_true", help="(default) compile the qdq kernels")
    p.add_argument("--disable_torch_compile", action="store_true", help="eager qdq (no C++ compiler needed)")
    p.add_argument("--device_map", "--device", "--devices", dest="device_map", default=None,
                   help="where tuning runs: cpu, 0 (GPU 0), cuda:1, 0,1,2 (a block spread over GPUs), auto "
                        "(every GPU, else the CPU; the default)")
    p.add_argument("--model_dtype", default="auto",
                   help="dtype to load the model in (auto, float32, float16, bfloat16)")
    p.add_argument("--format", "--formats", dest="format", default=None,
                   help="default: auto_round (gguf:TYPE for a GGUF scheme); auto_round, auto_gptq, auto_awq, llm_compressor, fake, gguf:TYPE (q4_0, q4_1, q5_0, q5_1, "
                        "q8_0, q2_k, q2_k_s, q3_k_s/m/l, q4_k_s/m, q5_k_s/m, q6_k); comma-separated for several "
                        "(one subdirectory each)")
    p.add_argument("--output_dir", default=None,
                   help="the model is written to exactly this directory (default: ./tmp_autoround/NAME-w4g128, "
                        "named as upstream names it)")
    p.add_argument("--max_shard_size", default=None, help="largest safetensors shard, e.g. 5GB (default) or 500MB")
    p.add_argument("--disable_low_cpu_mem_usage", action="store_true",
                   help="load the whole model instead of streaming it block by block from its safetensors")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run into the same --output_dir after its last finished block")
    p.add_argument("--start_over", action="store_true",
                   help="delete an interrupted run's files in --output_dir's location and start again")
    p.add_argument("--skip_self_check", action="store_true",
                   help="do not load the saved files back to compare their logits with the quantized model")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--trust_remote_code", action="store_true", help="run the model repository's own code")
    p.add_argument("--mllm", action="store_true",
                   help="load the model as an image-text-to-text model (detected from the config otherwise)")
    p.add_argument("--quant_nontext_module", action="store_true",
                   help="also quantize a vision-language model's vision tower and projector (rounded without "
                        "data; kept exact by default)")
    p.add_argument("--extra_data_dir", default=None,
                   help="folder of the images an image-text --dataset names (LLaVA conversation JSON); also "
                        "image=DIR as upstream writes it")
    p.add_argument("--disable_trust_remote_code", action="store_true",
                   help="(the default here: remote code runs only with --trust_remote_code)")
    p.add_argument("--low_cpu_mem_usage", action="store_true", help="(the default here: weights are streamed)")
    p.add_argument("--quiet", action="store_true", help="only warnings and errors")
    _add_unsupported(p)
    _add_eval_args(p, required=False)
    return p


UNSUPPORTED = CLI_ONLY  # upstream flags not offered here, each with what to use instead


class _Unsupported(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string}: {UNSUPPORTED[option_string]}")


def _add_unsupported(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("upstream options not offered here (each says what to use)")
    for flag in UNSUPPORTED:
        g.add_argument(flag, nargs="*", action=_Unsupported, help=argparse.SUPPRESS)


# upstream's default task list (``--tasks`` with no value, or ``--eval`` without ``--tasks``)
DEFAULT_TASKS = ("lambada_openai,hellaswag,winogrande,piqa,mmlu,wikitext,truthfulqa_mc1,openbookqa,boolq,"
                 "arc_easy,arc_challenge")


def _limit(text: str) -> float:
    """Examples per task / perplexity windows (an integer), or a fraction 0 < N < 1 of them."""
    try:
        v = float(text)
    except ValueError:
        v = 0.0
    if v <= 0 or (v >= 1 and v != int(v)):
        raise argparse.ArgumentTypeError(f"expected a positive integer or a fraction between 0 and 1, got {text!r}")
    return int(v) if v >= 1 else v


def _add_eval_args(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("evaluation" + ("" if required else " (after quantizing, of the saved model)"))
    g.add_argument("--tasks", "--task", dest="tasks", nargs="?", const=DEFAULT_TASKS, default=None,
                   help="comma-separated: ppl:PATH (perplexity of a local text file) and/or lm-eval task names; "
                        "without a value, upstream's default set (tasks whose data cannot be reached are skipped)")
    g.add_argument("--eval_bs", type=int, default=4, help="evaluation batch size")
    g.add_argument("--limit", type=_limit, default=None,
                   help="perplexity windows per file / examples per lm-eval task, or a fraction (default: all)")
    g.add_argument("--eval_seqlen", type=_positive, default=512, help="perplexity window length in tokens")
    g.add_argument("--include_path", default=None, help="folder of local lm-eval task YAMLs")
    g.add_argument("--eval_backend", default="auto", choices=_backend_names(),
                   help="QuantLinear backend for quantized models")
    g.add_argument("--eval_model_dtype", default=None,
                   help="dtype to evaluate in (default: by device; float32 on CPUs without native bf16/fp16)")
    g.add_argument("--eval_task_by_task", action="store_true", help="run lm-eval tasks one at a time")
    g.add_argument("--add_bos_token", action="store_true", help="prepend BOS in lm-eval requests")
    g.add_argument("--eval_json", default=None,
                   help="where to save results (default: eval_results.json in the output directory, or ./)")


def build_eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="signround eval", description="Evaluate an fp or quantized model directory.")
    p.add_argument("model_pos", nargs="?", default=None, metavar="MODEL", help="model directory or Hub id")
    p.add_argument("--model", "--model_name", "--model_name_or_path", dest="model", default=None,
                   help="model directory or Hub id")
    p.add_argument("--device", "--device_map", "--devices", dest="device", default=None,
                   help="cpu, cuda, cuda:N or N (default: cuda when available)")
    p.add_argument("--trust_remote_code", action="store_true", help="run the model repository's own code")
    p.add_argument("--disable_trust_remote_code", action="store_true", help="(the default here)")
    p.add_argument("--quiet", action="store_true", help="only warnings and errors")
    _add_eval_args(p, required=False)
    return p


def run_eval(args: argparse.Namespace, model_dir: str, default_json: Path, tasks=None) -> int:
    from .eval import evaluate, load_for_eval, parse_tasks, results_table, save_results

    if not tasks:
        from .eval import check_windows
        from .model.loading import check_model_path, load_tokenizer

        path = check_model_path(model_dir)  # the model first: a damaged checkpoint is the bigger news
        tasks = parse_tasks(args.tasks, args.include_path)
        tok = load_tokenizer(path, args.trust_remote_code)
        if tok is not None:
            check_windows(tasks, tok, args.eval_seqlen)
    device = getattr(args, "device", None)
    if device is not None:
        from .devices import parse_device_map

        device = str(parse_device_map(device).primary)
    model, tok = load_for_eval(model_dir, device, args.eval_backend, args.trust_remote_code, args.eval_model_dtype)
    results = evaluate(model, tok, tasks, batch_size=args.eval_bs, limit=args.limit, seqlen=args.eval_seqlen,
                       include_path=args.include_path, task_by_task=args.eval_task_by_task,
                       add_bos_token=args.add_bos_token, skip_unreachable=args.tasks == DEFAULT_TASKS)
    print(results_table(results))
    out = save_results(results, args.eval_json or default_json, model_dir)
    logger.info("evaluation results saved to %s", out)
    return 0


def _parse_layer_config(value: str | None) -> dict[str, Any] | None:
    if not value:
        return None
    if value.strip().endswith(".json") and not value.lstrip().startswith("{"):
        if not Path(value).is_file():
            raise ConfigError(f"--layer_config file {value} does not exist; give a JSON file or inline JSON")
    text = Path(value).read_text() if value.strip().endswith(".json") and Path(value).is_file() else value
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--layer_config is not valid JSON ({e}); example: '{{\"mlp.down_proj\": {{\"bits\": 8}}}}'") from e
    if not isinstance(cfg, dict):
        raise ConfigError("--layer_config must be a JSON object mapping layer names/patterns to settings")
    return cfg


def _default_output_dir(args: argparse.Namespace) -> str:
    """Upstream's naming: ./tmp_autoround/NAME-w{bits}g{group} (NAME-gguf for GGUF)."""
    from .schemes import resolve_scheme

    name = Path(str(args.model).rstrip("/")).name
    if args.options:
        return str(Path("tmp_autoround") / f"{name}-autoscheme-{args.avg_bits:g}bits")
    if all(f.strip().lower().startswith("gguf:") for f in args.format.split(",")):
        return str(Path("tmp_autoround") / f"{name}-gguf")
    spec = resolve_scheme(args.scheme or _default_scheme(args.format), _int_bits(args.bits), args.group_size)
    return str(Path("tmp_autoround") / f"{name}-w{spec.bits}g{spec.group_size}")


def _int_bits(bits: float | None) -> int | None:
    if bits is None:
        return None
    if bits != int(bits):
        raise ConfigError(f"--bits {bits:g} is not a whole number of bits; for a mixed average give --options "
                          "(AutoScheme), e.g. --options W2A16G64,W3A16G64,W4A16G64 --avg_bits 3.0")
    return int(bits)


def _autoscheme(args: argparse.Namespace) -> Any:
    """``--options`` (upstream also spells it ``--schemes``) with ``--avg_bits`` (or ``--bits``) makes an
    AutoScheme; the option words are split at commas and ``--shared_layers`` groups as upstream does."""
    if args.options is None:
        if args.avg_bits is not None or args.shared_layers or args.ignore_scale_zp_bits:
            raise ConfigError("--avg_bits / --shared_layers / --ignore_scale_zp_bits need --options, the schemes "
                              "AutoScheme chooses from, e.g. --options W2A16G64,W3A16G64,W4A16G64")
        return None
    from .autoscheme import AutoScheme

    if args.scheme:
        raise ConfigError("--scheme and --options cannot be used together: with --options AutoScheme picks each "
                          "layer's scheme; drop --scheme")
    if args.avg_bits is None:
        args.avg_bits, args.bits = args.bits, None
    if args.avg_bits is None:
        raise ConfigError("--options needs the budget: --avg_bits 3.0 (or --bits 3.0)")
    options = [o for word in args.options for o in word.split(",") if o.strip()]
    groups = []
    for flag in args.shared_layers or []:
        if any("," in w for w in flag):  # each comma-separated word is a group of its own
            groups += [[p for p in w.split(",") if p.strip()] for w in flag]
        else:  # bare names: one group
            groups.append(list(flag))
    return AutoScheme(avg_bits=args.avg_bits, options=options, shared_layers=groups or None,
                      ignore_scale_zp_bits=args.ignore_scale_zp_bits)


def run_quantize(args: argparse.Namespace) -> int:
    from . import export
    from .api import AutoRound
    from .model.hub import resolve_model

    auto = _autoscheme(args)  # before anything is read: option names and the budget's form
    args.format = args.format or _implied_format(args.scheme, auto)
    args.bits = _int_bits(args.bits)
    # Cheap checks first: nothing is loaded before the output target, format and tasks are known good.
    exporters = export.get_exporters(args.format)
    if args.output_dir is None:
        args.output_dir = _default_output_dir(args)
    export.check_output_dir(args.output_dir)
    if args.disable_act_dynamic:
        args.act_dynamic = False
    args.model = resolve_model(args.model, args.revision, args.model_source)
    tasks = None
    if args.tasks:
        from .eval import check_windows, parse_tasks
        from .model.loading import check_model_path, load_tokenizer

        tasks = parse_tasks(args.tasks, args.include_path)
        tok = load_tokenizer(check_model_path(args.model), args.trust_remote_code)
        if tok is not None:
            check_windows(tasks, tok, args.eval_seqlen)
    layer_config = _parse_layer_config(args.layer_config)
    if args.disable_low_cpu_mem_usage and auto is None:  # AutoRound checks an AutoScheme's formats itself
        _preflight(args, layer_config)
    ar = AutoRound(
        args.model,
        scheme=auto or args.scheme or _default_scheme(args.format),
        bits=args.bits,
        group_size=args.group_size,
        sym=False if args.asym else None,
        data_type=args.data_type,
        act_bits=args.act_bits,
        act_data_type=args.act_data_type,
        act_group_size=args.act_group_size,
        act_dynamic=args.act_dynamic,
        scale_dtype=args.scale_dtype,
        layer_config=layer_config,
        ignore_layers=args.ignore_layers,
        quant_lm_head=args.quant_lm_head,
        recipe=args.recipe,
        dataset=args.dataset,
        iters=args.iters,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        gradient_accumulate_steps=args.gradient_accumulate_steps,
        lr=args.lr,
        minmax_lr=args.minmax_lr,
        enable_minmax_tuning=False if args.disable_minmax_tuning else None,
        enable_quanted_input=False if args.disable_quanted_input else None,
        not_use_best_mse=True if args.not_use_best_mse else None,
        low_gpu_mem_usage=True if args.low_gpu_mem_usage else None,
        amp=False if args.disable_amp else None,
        enable_torch_compile=False if args.disable_torch_compile else None,
        disable_opt_rtn=True if args.disable_opt_rtn else None,
        cache_dtype=args.cache_dtype,
        enable_adam=True if args.adam else None,
        momentum=args.momentum,
        enable_deterministic_algorithms=True if args.enable_deterministic_algorithms else None,
        enable_alg_ext=True if args.enable_alg_ext else None,
        enable_norm_bias_tuning=True if args.enable_norm_bias_tuning else None,
        nblocks=args.nblocks,
        calibrate_all_experts=True if args.calibrate_all_experts else None,
        min_expert_tokens=args.min_expert_tokens,
        static_kv_dtype=args.static_kv_dtype,
        static_attention_dtype=args.static_attention_dtype,
        to_quant_block_names=args.to_quant_block_names,
        mllm=args.mllm,
        quant_nontext_module=args.quant_nontext_module,
        extra_data_dir=args.extra_data_dir,
        device_map=args.device_map,
        dtype=args.model_dtype,
        trust_remote_code=args.trust_remote_code,
        low_cpu_mem_usage=not args.disable_low_cpu_mem_usage,
        seed=args.seed,
    )
    out = ar.run_and_save(args.output_dir, format=args.format, resume=args.resume, start_over=args.start_over,
                          self_check=not args.skip_self_check, max_shard_size=args.max_shard_size)
    if tasks:
        del ar  # free the tuning state before loading the saved model
        # the last format written is evaluated, as upstream's guide says
        model_dir = out if len(exporters) == 1 else out / exporters[-1].name.replace(":", "-")
        args.device = None
        return run_eval(args, str(model_dir), out / "eval_results.json", tasks)
    return 0


def _preflight(args: argparse.Namespace, layer_config: dict | None) -> None:
    """Whole-model runs: the plan and the formats checked on a meta-device skeleton first, so a
    scheme a format cannot hold is named before the weights are loaded."""
    from accelerate import init_empty_weights

    from . import export
    from .model.loading import load_config
    from .model.vlm import auto_class
    from .plan import build_plan
    from .schemes import resolve_scheme

    config = load_config(args.model, args.trust_remote_code)
    with init_empty_weights(include_buffers=False):
        skeleton = auto_class(config, args.mllm).from_config(config, trust_remote_code=args.trust_remote_code)
    spec = resolve_scheme(args.scheme or _default_scheme(args.format), args.bits, args.group_size,
                          False if args.asym else None, data_type=args.data_type, act_bits=args.act_bits,
                          act_data_type=args.act_data_type, act_group_size=args.act_group_size,
                          act_dynamic=args.act_dynamic, scale_dtype=args.scale_dtype)
    plan = build_plan(skeleton, spec, layer_config, args.ignore_layers, args.quant_lm_head, args.to_quant_block_names,
                      args.quant_nontext_module)
    export.check_formats(args.format, skeleton, plan, args.output_dir)


def run_report(argv: Sequence[str]) -> int:
    """``signround report OUT_DIR``: the summary table of a run, and report.png beside report.json."""
    from .report import PLOT_FILE, format_report, read_report, render_plot

    p = argparse.ArgumentParser(prog="signround report", description="Show the report of a signround run.")
    p.add_argument("output_dir", help="a directory signround saved (or its report.json)")
    p.add_argument("--no_plot", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    path, report = read_report(args.output_dir)
    print(format_report(report))
    if not args.no_plot:
        png = render_plot(report, path.parent / PLOT_FILE)
        print(f"plot: {png}" if png else "plot: needs matplotlib (pip install 'signround[report]')")
    return 0


def run_list(what: Sequence[str]) -> int:
    """``signround list formats`` / ``signround list schemes``."""
    from .export import FORMATS
    from .schemes import PRESETS

    topic = what[0] if what else ""
    if topic == "formats":
        width = max(map(len, FORMATS))
        for name, e in FORMATS.items():
            print(f"{name:<{width}}  {e.description}")
        return 0
    if topic == "schemes":
        for name, spec in PRESETS.items():
            print(f"{name:<9} {spec.label()}")
        return 0
    print("signround: error: use `signround list formats` or `signround list schemes`", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None, prog: str = "signround", recipe: str = "default") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "list":
        return run_list(argv[1:])
    if argv and argv[0] == "report":
        try:
            return run_report(argv[1:])
        except SignRoundError as e:
            print(f"signround: error: {e}", file=sys.stderr)
            return 2
    evaluating = bool(argv) and argv[0] == "eval" or "--eval" in argv  # upstream spells it both ways
    if evaluating:
        argv = [a for a in (argv[1:] if argv[0] == "eval" else argv) if a != "--eval"]
    parser = build_eval_parser() if evaluating else build_parser(prog, recipe)
    args = parser.parse_args(argv)
    args.model = args.model or args.model_pos
    if not args.model:
        parser.error("give the model: signround MODEL ... or --model MODEL")
    if evaluating and not args.tasks:
        args.tasks = DEFAULT_TASKS
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    previous = _terminate_as_exception()
    try:
        if evaluating:
            from .model.hub import resolve_model

            return run_eval(args, resolve_model(args.model), Path("eval_results.json"))
        return run_quantize(args)
    except SignRoundError as e:
        print(f"signround: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("signround: interrupted (SIGINT)", file=sys.stderr)
        return 130
    except Terminated:
        print("signround: terminated (SIGTERM)", file=sys.stderr)
        return 143
    finally:
        for sig, old in (previous or {}).items():
            signal.signal(sig, old)


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that cleanups run (like KeyboardInterrupt for SIGINT)."""


def _terminate_as_exception():
    """Turn SIGTERM (and SIGINT) into exceptions for the duration of a command, safely; returns the
    old handlers (None when this is not the main thread, where handlers cannot be set)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        # an exception raised inside a finalizer (__del__, run by the garbage collector at any
        # bytecode) is printed and swallowed; deliver the signal again a moment later instead
        f = frame
        while f is not None:
            if f.f_code.co_name == "__del__":
                import _thread

                threading.Timer(0.05, _thread.interrupt_main, args=(signum,)).start()
                return
            f = f.f_back
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}


def main_best() -> int:
    return main(prog="signround-best", recipe="best")


def main_light() -> int:
    return main(prog="signround-light", recipe="light")


def main_fast() -> int:
    return main(prog="signround-fast", recipe="fast")


if __name__ == "__main__":
    sys.exit(main())
