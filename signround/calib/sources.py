"""Where calibration samples come from: a registry of loaders, tried in order.

Each loader returns a list of samples (strings, or token-id lists) or None when the name is not its kind.
"""

from __future__ import annotations

import gzip
import json
import logging
from importlib import resources
from pathlib import Path
from typing import Callable, Union

from ..errors import CalibrationError
from .spec import DatasetSpec

logger = logging.getLogger(__name__)

Sample = Union[str, list[int]]
_TEXT_FIELDS = ("text", "content", "prompt", "question", "code")
_LOCAL_SUFFIXES = (".json", ".jsonl", ".txt")


def _record_text(rec, where: str) -> Sample:
    if isinstance(rec, str):
        return rec
    if isinstance(rec, list) and all(isinstance(x, int) for x in rec):
        return rec
    if isinstance(rec, dict):
        if "input_ids" in rec:
            return list(rec["input_ids"])
        for f in _TEXT_FIELDS:
            if isinstance(rec.get(f), str):
                return rec[f]
    raise CalibrationError(
        f"{where}: records must be strings, token-id lists, or objects with one of the fields "
        f"{', '.join(_TEXT_FIELDS)} or input_ids; got {str(rec)[:80]!r}"
    )


def load_default(spec: DatasetSpec) -> list[Sample] | None:
    if spec.name not in ("signround-default", "default"):
        return None
    path = resources.files("signround.calib") / "data" / "default_corpus.jsonl.gz"
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def load_local(spec: DatasetSpec) -> list[Sample] | None:
    path = Path(spec.name).expanduser()
    looks_local = spec.name.endswith(_LOCAL_SUFFIXES) or spec.name.startswith((".", "/", "~"))
    if not path.exists():
        if looks_local:
            raise CalibrationError(f"calibration file {spec.name!r} does not exist; check the path")
        return None
    if path.is_dir() or path.suffix not in _LOCAL_SUFFIXES:
        raise CalibrationError(f"{spec.name!r}: local calibration data must be a .json, .jsonl or .txt file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return [line for line in text.splitlines() if line.strip()]
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{spec.name!r} is not valid JSON ({e})") from e
    if isinstance(records, dict):  # {"text": [...]} style
        records = next((v for v in records.values() if isinstance(v, list)), None)
    if not isinstance(records, list):
        raise CalibrationError(f"{spec.name!r}: expected a list of samples")
    return [_record_text(r, spec.name) for r in records]


def load_hub(spec: DatasetSpec) -> list[Sample] | None:
    try:
        import datasets
    except ImportError as e:
        raise CalibrationError(
            f"{spec.name!r} is not a local file, and loading Hugging Face datasets needs the `datasets` "
            "package (pip install datasets); or pass a local .json/.jsonl/.txt file"
        ) from e
    from ..model.hub import offline_unless_reachable

    split = spec.split or "train"
    offline_unless_reachable()  # an uncached dataset then fails at once instead of after retries
    try:
        ds = datasets.load_dataset(spec.name, split=split)
    except Exception as e:
        raise CalibrationError(
            f"could not load dataset {spec.name!r} (split {split!r}): {type(e).__name__}: {str(e)[:200]}. "
            "Without network access, pass a local .json/.jsonl/.txt file instead, or leave --dataset out "
            "to use the built-in offline corpus"
        ) from e
    field = next((f for f in _TEXT_FIELDS if f in ds.column_names), None)
    if field is None:
        raise CalibrationError(f"dataset {spec.name!r} has no text column (looked for {_TEXT_FIELDS})")
    return list(ds[field])


SOURCES: list[Callable[[DatasetSpec], list[Sample] | None]] = [load_default, load_local, load_hub]


def load_samples(spec: DatasetSpec) -> list[Sample]:
    for loader in SOURCES:
        samples = loader(spec)
        if samples is not None:
            return samples
    raise CalibrationError(f"no source can load {spec.name!r}")
