"""Evaluation tasks from one spec string: ``ppl:wiki.txt,ppl:shakes.txt,my_local_task``.

``ppl:PATH`` is the built-in perplexity task on a local text file (fixed, non-overlapping windows);
any other name is an lm-eval task, run through lm-eval's HF model wrapper around the model we
loaded (lm-eval is the optional ``eval`` extra; ``include_path`` adds local task definitions).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError
from .perplexity import perplexity, read_text

logger = logging.getLogger(__name__)

LM_EVAL_HINT = "lm-eval tasks need the eval extra: pip install 'signround[eval]' (or use ppl:FILE tasks)"


@dataclass(frozen=True)
class Task:
    kind: str  # "ppl" | "lm_eval"
    name: str  # the label in results
    path: Path | None = None


def parse_tasks(spec: str | list[str], include_path: str | None = None) -> list[Task]:
    """Parse and check a task list before any model is loaded (missing files, missing lm-eval)."""
    items = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec)]
    items = [t for t in items if t]
    if not items:
        raise ConfigError("--tasks is empty; give e.g. ppl:wikitext2_test.txt or an lm-eval task name")
    tasks = []
    for item in items:
        if item.startswith("ppl:"):
            path = Path(item[4:]).expanduser()
            if not path.is_file():
                raise ConfigError(f"perplexity task {item!r}: no file {path}; give ppl:PATH to a local text file")
            tasks.append(Task("ppl", f"ppl:{path.name}", path))
        else:
            tasks.append(Task("lm_eval", item))
    if any(t.kind == "lm_eval" for t in tasks):
        if importlib.util.find_spec("lm_eval") is None:
            names = ", ".join(t.name for t in tasks if t.kind == "lm_eval")
            raise ConfigError(f"{names}: {LM_EVAL_HINT}")
        if include_path and not Path(include_path).exists():
            raise ConfigError(f"--include_path {include_path} does not exist; point it at a folder of lm-eval task YAMLs")
    return tasks


def check_windows(tasks: list[Task], tokenizer: Any, seqlen: int) -> None:
    """Every perplexity text holds at least one window of ``seqlen`` tokens (checked before any
    model is loaded or tuned)."""
    for t in tasks:
        if t.kind != "ppl":
            continue
        n = len(tokenizer(read_text(t.path))["input_ids"])
        if n < seqlen:
            raise ConfigError(f"{t.name}: the text has {n} tokens, fewer than one window of --eval_seqlen {seqlen}; "
                              "give a longer text or a smaller --eval_seqlen")


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[Task],
    batch_size: int = 4,
    limit: int | None = None,
    seqlen: int = 512,
    include_path: str | None = None,
    task_by_task: bool = False,
    add_bos_token: bool = False,
    skip_unreachable: bool = False,
) -> dict[str, dict[str, Any]]:
    """Run the tasks; returns ``{task: {metric: value, ...}}``.

    ``limit``: perplexity windows per file, or examples per lm-eval task (None: all; a fraction
    0 < limit < 1 of them). ``skip_unreachable`` (the default task set): lm-eval tasks whose data
    cannot be downloaded are skipped and listed, instead of failing the run.
    """
    results: dict[str, dict[str, Any]] = {}
    for t in tasks:
        if t.kind == "ppl":
            text = read_text(t.path)
            windows = limit
            if isinstance(limit, float):  # a fraction of the windows the text holds
                windows = max(1, int(len(tokenizer(text)["input_ids"]) // seqlen * limit))
            r = perplexity(model, tokenizer, text, seqlen=seqlen, n_windows=windows, batch_size=batch_size)
            results[t.name] = r
            logger.info("%s: perplexity %.4f over %d tokens (%d windows of %d)", t.name, r["ppl"], r["tokens"],
                        r["windows"], r["seqlen"])
    lm_tasks = [t.name for t in tasks if t.kind == "lm_eval"]
    if not lm_tasks:
        return results
    session = _LMEval(model, tokenizer, batch_size, include_path, add_bos_token)
    if not (task_by_task or skip_unreachable):
        try:
            results.update(session.run(lm_tasks, limit))
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - most often a dataset that cannot be downloaded here
            first = str(e).splitlines()[0][:200] if str(e) else ""
            raise ConfigError(
                f"lm-eval task(s) {', '.join(lm_tasks)} failed ({type(e).__name__}: {first}); without network the "
                "task data must be in the datasets cache, or use --tasks ppl:FILE / local YAMLs (--include_path)"
            ) from e
        return results
    skipped = {}
    for name in lm_tasks:
        try:
            results.update(session.run([name], limit))
        except Exception as e:  # noqa: BLE001 - datasets that cannot be fetched surface as many error types
            if not skip_unreachable or isinstance(e, ConfigError):
                raise
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    if skipped:
        logger.warning("skipped %d task(s) whose data could not be loaded (no network or not cached): %s",
                       len(skipped), ", ".join(skipped))
        results["skipped"] = skipped
        if len(skipped) == len(lm_tasks) and not any(t.kind == "ppl" for t in tasks):
            raise ConfigError(
                f"none of the tasks could load its data ({', '.join(skipped)}); with no network, use local "
                "tasks: --tasks ppl:FILE or lm-eval YAMLs with --include_path"
            )
    return results


class _LMEval:
    """One lm-eval model wrapper and task index for all tasks of a run (building them costs seconds)."""

    def __init__(self, model, tokenizer, batch_size, include_path, add_bos_token=False):
        try:
            from lm_eval import simple_evaluate
            from lm_eval.models.huggingface import HFLM
            from lm_eval.tasks import TaskManager
        except ImportError as e:
            raise ConfigError(f"{LM_EVAL_HINT} ({e})") from e
        from ..model.hub import offline_unless_reachable

        offline_unless_reachable()  # task data not in the cache then fails at once instead of after retries
        self._simple_evaluate = simple_evaluate
        self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=add_bos_token)
        self.manager = TaskManager(include_path=include_path) if include_path else TaskManager()

    def run(self, names: list[str], limit) -> dict[str, dict[str, Any]]:
        unknown = [n for n in names if n not in self.manager.all_tasks]
        if unknown:
            raise ConfigError(f"unknown lm-eval task(s) {unknown}; define them in a YAML under --include_path")
        out = self._simple_evaluate(model=self.lm, tasks=names, limit=limit, task_manager=self.manager,
                                    log_samples=False)
        results: dict[str, dict[str, Any]] = {}
        for task, metrics in out["results"].items():
            clean = {}
            for k, v in metrics.items():
                if k in ("alias", "sample_len") or not isinstance(v, (int, float)):
                    continue
                clean[k.replace(",none", "")] = v
            n = out.get("n-samples", {}).get(task, {})
            if n:
                clean["samples"] = n.get("effective", n.get("original"))
            results[task] = clean
        return results


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table: one row per task and metric."""
    lines = ["| task | metric | value |", "|---|---|---|"]
    for task, metrics in results.items():
        for k, v in metrics.items():
            val = f"{v:.4f}" if isinstance(v, float) else str(v)
            lines.append(f"| {task} | {k} | {val} |")
    return "\n".join(lines)


def save_results(results: dict[str, dict[str, Any]], path: str | Path, model_path: str) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"model": str(model_path), "results": results}, indent=2) + "\n")
    return p


def load_for_eval(
    path: str, device: str | None = None, backend: str = "auto", trust_remote_code: bool = False,
    dtype: Any = None,
) -> tuple[nn.Module, Any]:
    """Any local model directory: quantized ones (auto-round, GPTQ, AWQ, compressed-tensors) through
    ``load_quantized``, others (fp, or our ``fake`` format) through transformers. Returns (model, tokenizer).

    ``dtype`` None or "auto": chosen by device (float32 on CPUs without native half precision, see
    :func:`signround.devices.default_compute_dtype`)."""
    import torch
    from transformers import AutoTokenizer

    from ..devices import resolve_compute_dtype
    from ..inference.loader import QUANT_METHODS, load_quantized
    from ..model.loading import check_model_path, load_model_and_tokenizer, parse_dtype

    p = check_model_path(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    requested = parse_dtype(dtype)
    requested = None if requested == "auto" else requested
    qc = json.loads((p / "config.json").read_text()).get("quantization_config") or {}
    if qc.get("quant_method") in QUANT_METHODS:
        model = load_quantized(str(p), device=device, backend=backend, dtype=requested)
        tokenizer = AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    else:
        model, tokenizer, _, _ = load_model_and_tokenizer(str(p), dtype="auto", trust_remote_code=trust_remote_code)
        stored = next(model.parameters()).dtype
        model = model.to(device=device, dtype=resolve_compute_dtype(device, stored, requested))
    if tokenizer is None:
        raise ConfigError(f"{p} has no tokenizer files; evaluation needs the tokenizer saved with the model")
    return model, tokenizer
