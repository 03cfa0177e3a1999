"""Turn a dataset spec or in-memory samples into a ``[n, seqlen]`` LongTensor of token ids."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from typing import Any

import torch

from ..errors import CalibrationError
from .images import image_text_rows, is_image_text
from .sources import Sample, load_samples
from .spec import DatasetSpec, parse_dataset_spec

logger = logging.getLogger(__name__)


def _from_python(data: Any) -> list[Sample]:
    """Samples from a list of strings / token-id lists / tokenizer outputs, a tensor, or a DataLoader."""
    if isinstance(data, torch.Tensor):
        return [row.tolist() for row in data.reshape(-1, data.shape[-1])]
    out: list[Sample] = []
    for item in data:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, torch.Tensor):
            out += _from_python(item.unsqueeze(0) if item.dim() == 1 else item)
        elif isinstance(item, dict) or hasattr(item, "keys"):
            ids = item["input_ids"]
            if isinstance(ids, torch.Tensor):
                out += _from_python(ids.unsqueeze(0) if ids.dim() == 1 else ids)
            elif ids and isinstance(ids[0], list):
                out += [list(r) for r in ids]
            else:
                out.append(list(ids))
        elif isinstance(item, (list, tuple)) and all(isinstance(x, int) for x in item):
            out.append(list(item))
        else:
            raise CalibrationError(
                f"calibration item of type {type(item).__name__} is not understood; pass strings, "
                "token-id lists, tokenizer outputs (dicts with input_ids) or tensors"
            )
    return out


def _encode(sample: Sample, tokenizer: Any, spec: DatasetSpec) -> list[int]:
    if not isinstance(sample, str):
        return sample
    if tokenizer is None:
        raise CalibrationError("text calibration data needs a tokenizer; pass tokenizer= or token ids")
    if spec.apply_chat_template:
        messages = ([{"role": "system", "content": spec.system_prompt}] if spec.system_prompt else [])
        messages.append({"role": "user", "content": sample})
        try:
            sample = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as e:
            raise CalibrationError(f"{spec.name!r}: apply_chat_template failed ({e}); the tokenizer may have no chat template") from e
        return tokenizer(sample, add_special_tokens=False)["input_ids"]
    return tokenizer(sample)["input_ids"]


def _chunks(spec: DatasetSpec, samples: list[Sample], tokenizer: Any, seqlen: int, want: int, seed: int) -> list[list[int]]:
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    kept: list[list[int]] = []
    if spec.concat:
        eos = getattr(tokenizer, "eos_token_id", None)
        stream: list[int] = []
        for i in order:
            stream += _encode(samples[i], tokenizer, spec) + ([eos] if eos is not None else [])
            while len(stream) >= seqlen and len(kept) < want:
                kept.append(stream[:seqlen])
                stream = stream[seqlen:]
            if len(kept) >= want:
                break
        logger.info("calibration %s: %d samples concatenated into %d chunks of %d tokens", spec.name, len(samples), len(kept), seqlen)
        return kept
    seen = 0
    for i in order:
        seen += 1
        ids = _encode(samples[i], tokenizer, spec)
        if len(ids) >= seqlen:
            kept.append(ids[:seqlen])
            if len(kept) >= want:
                break
    logger.info(
        "calibration %s: kept %d of %d samples looked at (samples shorter than seqlen=%d are dropped; "
        "add :concat=True to join them)", spec.name, len(kept), seen, seqlen,
    )
    return kept


def build_calibration(
    dataset: Any,
    tokenizer: Any,
    seqlen: int,
    nsamples: int,
    seed: int = 42,
) -> torch.Tensor:
    """Token ids ``[n, seqlen]`` with ``n <= nsamples``; raises when nothing usable remains."""
    _check_sizes(seqlen, nsamples)
    if isinstance(dataset, str):
        specs = parse_dataset_spec(dataset)
        groups = [(s, load_samples(s)) for s in specs]
    elif isinstance(dataset, Iterable):
        groups = [(DatasetSpec(name="<in-memory>"), _from_python(dataset))]
    else:
        raise CalibrationError(f"dataset must be a spec string, a list or a DataLoader, got {type(dataset).__name__}")
    rows: list[list[int]] = []
    for i, (spec, samples) in enumerate(groups):
        rows += _text_rows(spec, samples, tokenizer, seqlen, nsamples, seed + i)
    return torch.tensor(_take(rows, seqlen, nsamples, seed), dtype=torch.long)


def _check_sizes(seqlen: int, nsamples: int) -> None:
    if seqlen <= 0 or nsamples <= 0:
        raise CalibrationError(f"seqlen and nsamples must be positive (got seqlen={seqlen}, nsamples={nsamples})")


def _text_rows(spec: DatasetSpec, samples: list[Sample], tokenizer: Any, seqlen: int, nsamples: int,
               seed: int) -> list[list[int]]:
    """Up to ``num`` (or ``nsamples``) chunks of ``seqlen`` tokens from one text dataset."""
    if not samples:
        raise CalibrationError(f"calibration dataset {spec.name!r} is empty")
    return _chunks(spec, samples, tokenizer, seqlen, min(spec.num or nsamples, nsamples), seed)


def _take(rows: list, seqlen: int, nsamples: int, seed: int) -> list:
    """``nsamples`` of the rows of every dataset, in an order shuffled by ``seed`` (all of them, with a
    warning, when fewer are available; none is an error naming the fix)."""
    if not rows:
        raise CalibrationError(
            f"no calibration sample has {seqlen} tokens; lower --seqlen, add :concat=True to the dataset "
            "spec to join short samples, or provide more text"
        )
    random.Random(seed).shuffle(rows)
    if len(rows) < nsamples:
        logger.warning("only %d calibration samples of %d tokens are available (asked for %d); using them all", len(rows), seqlen, nsamples)
    return rows[:nsamples]


def uses_images(dataset: Any) -> bool:
    """A dataset spec naming image-text data (a VLM's calibration on images)."""
    return isinstance(dataset, str) and bool(dataset.strip()) and any(
        is_image_text(s) for s in parse_dataset_spec(dataset))


def build_image_text_calibration(
    dataset: str,
    processor: Any,
    image_token_id: int | None,
    seqlen: int,
    nsamples: int,
    seed: int = 42,
    extra_data_dir: str | None = None,
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Token ids ``[n, seqlen]`` and each sample's other model inputs (pixel values, image grids, token
    types; ``{}`` for text samples) for a spec naming image-text data, text datasets beside it allowed."""
    _check_sizes(seqlen, nsamples)
    tokenizer = getattr(processor, "tokenizer", processor)
    rows: list[tuple[list[int], dict[str, torch.Tensor]]] = []
    for i, spec in enumerate(parse_dataset_spec(dataset)):
        if is_image_text(spec):
            want = min(spec.num or nsamples, nsamples)
            rows += image_text_rows(spec, processor, image_token_id, seqlen, want, seed + i, extra_data_dir)
        else:
            rows += [(r, {}) for r in _text_rows(spec, load_samples(spec), tokenizer, seqlen, nsamples, seed + i)]
    rows = _take(rows, seqlen, nsamples, seed)
    return torch.tensor([r for r, _ in rows], dtype=torch.long), [e for _, e in rows]
