"""Image-text calibration data for vision-language models.

A local ``.json`` / ``.jsonl`` file whose records name an image: LLaVA's conversation files (upstream's
``liuhaotian/llava_conv_58k``: ``{"image": "000000033471.jpg", "conversations": [{"from": "human",
"value": "<image>\\nWhat ..."}, {"from": "gpt", "value": "..."}]}``), chat records (``"messages"``) or
captions (``"text"``). Images are read from ``extra_data_dir`` (upstream's ``--extra_data_dir``, also as
``image=DIR``) or beside the file; nothing is downloaded.

Each record becomes a chat whose first user turn holds its image(s), rendered by the processor's chat
template, and the model's own processor turns text and image into the model's inputs (it expands an
image into its image tokens). Samples are made exactly ``seqlen`` tokens, as text samples are, since
the pipeline keeps all samples full length and unpadded: a longer one is cut after its image tokens (a
sample whose image tokens do not fit is skipped), a shorter one continues with text of the other
records. What the processor returns besides the ids (pixel values, image grids, token types) stays
with the sample and reaches the model's forward when the blocks' inputs are captured.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CalibrationError
from .spec import DatasetSpec

logger = logging.getLogger(__name__)

# upstream's image-text dataset names; they are LLaVA's conversation files plus COCO images
_HUB_SETS = {"liuhaotian/llava": "conversation_58k.json", "liuhaotian/llava_conv_58k": "conversation_58k.json",
             "liuhaotian/llava_instruct_80k": "llava_instruct_80k.json",
             "liuhaotian/llava_instruct_150k": "llava_instruct_150k.json"}
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_PLACEHOLDER = "<image>"
# per-token inputs a processor returns beside input_ids, and what a text continuation takes in them
_FILL = {"attention_mask": 1}


@dataclass(frozen=True)
class ImageTextSample:
    messages: list[dict[str, Any]]  # chat turns, content as typed items ({"type": "image"} / "text")
    images: list[str]  # as the record names them; found when the sample is used
    where: str  # "file record N", for messages


def _read_records(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{str(path)!r} is not valid JSON ({e})") from e
    return records if isinstance(records, list) else []


def is_image_text(spec: DatasetSpec) -> bool:
    """A dataset whose records name images: a local JSON/JSONL file whose first record has ``image``
    (or one of upstream's LLaVA dataset names)."""
    if spec.name in _HUB_SETS:
        return True
    path = Path(spec.name).expanduser()
    if path.suffix not in (".json", ".jsonl") or not path.is_file():
        return False
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            line = next((ln for ln in f if ln.strip()), "")
        try:
            first = json.loads(line) if line else None
        except json.JSONDecodeError:
            return False  # the text loader names the bad line
        return isinstance(first, dict) and "image" in first
    records = _read_records(path)
    return bool(records) and isinstance(records[0], dict) and "image" in records[0]


def image_dir(extra_data_dir: str | None) -> Path | None:
    """The image folder of ``--extra_data_dir``: a folder, or ``image=DIR[,video=DIR...]`` as upstream takes it."""
    if not extra_data_dir:
        return None
    if "=" in extra_data_dir:
        parts = dict(p.split("=", 1) for p in extra_data_dir.split(",") if "=" in p)
        if "image" not in parts:
            raise CalibrationError(f"--extra_data_dir {extra_data_dir!r} names no image folder; pass DIR or image=DIR")
        extra_data_dir = parts["image"]
    d = Path(extra_data_dir).expanduser()
    if not d.is_dir():
        raise CalibrationError(f"--extra_data_dir: {str(d)!r} is not a folder; pass the folder that holds the images")
    return d


def _turns(rec: dict[str, Any], where: str) -> list[tuple[str, str]]:
    if isinstance(rec.get("conversations"), list):
        return [(_ROLES.get(str(t.get("from", "")).lower(), "user"), str(t.get("value", ""))) for t in rec["conversations"]]
    if isinstance(rec.get("messages"), list):
        return [(_ROLES.get(str(t.get("role", "")).lower(), "user"), str(t.get("content", ""))) for t in rec["messages"]]
    for field in ("text", "caption", "content"):
        if isinstance(rec.get(field), str):
            return [("user", rec[field])]
    raise CalibrationError(f"{where}: an image-text record needs 'conversations' (LLaVA), 'messages' or 'text'; "
                           f"got keys {sorted(rec)}")


def _image_paths(ref: str, base: Path, folder: Path | None) -> list[Path]:
    """Where an image the record names may be: the folder of --extra_data_dir (by file name, as upstream
    looks up COCO images, or by the record's relative path), else beside the data file."""
    name = Path(ref.split("?")[0])
    tried = [name] if name.is_absolute() else []
    if folder is not None:
        tried += [folder / name.name] + ([] if name.is_absolute() else [folder / ref])
    return tried + ([] if name.is_absolute() or ref.startswith(("http://", "https://")) else [base / ref])


def _find_images(sample: ImageTextSample, base: Path, folder: Path | None) -> tuple[list[Path] | None, list[Path]]:
    """The sample's image files, or None and the places looked at for the first one missing."""
    found = []
    for ref in sample.images:
        tried = _image_paths(ref, base, folder)
        path = next((p for p in tried if p.is_file()), None)
        if path is None:
            return None, tried
        found.append(path)
    return found, []


def load_image_text(spec: DatasetSpec, extra_data_dir: str | None) -> list[ImageTextSample]:
    """The records of an image-text dataset as chats naming their images."""
    if spec.name in _HUB_SETS:
        raise CalibrationError(
            f"{spec.name!r}: image-text data is read from local files (nothing is downloaded): fetch "
            f"{_HUB_SETS[spec.name]} of the Hub dataset liuhaotian/LLaVA-Instruct-150K and the COCO train2017 images, "
            f"then pass --dataset ./{_HUB_SETS[spec.name]} --extra_data_dir ./train2017")
    path = Path(spec.name).expanduser()
    out = []
    for i, rec in enumerate(_read_records(path)):
        where = f"{spec.name} record {i}"
        if not isinstance(rec, dict) or "image" not in rec:
            raise CalibrationError(f"{where}: every record of an image-text dataset needs an 'image'")
        images = [str(r) for r in (rec["image"] if isinstance(rec["image"], list) else [rec["image"]])]
        turns = [(role, text.replace(_PLACEHOLDER, "").strip()) for role, text in _turns(rec, where)]
        messages = []
        for role, text in turns:
            content: list[dict[str, Any]] = []
            if role == "user" and not any(m["role"] == "user" for m in messages):
                content += [{"type": "image"} for _ in images]  # upstream too moves <image> to the front
            content.append({"type": "text", "text": text})
            messages.append({"role": role, "content": content})
        if not any(m["role"] == "user" for m in messages):
            messages.insert(0, {"role": "user", "content": [{"type": "image"} for _ in images]})
        out.append(ImageTextSample(messages, images, where))
    if not out:
        raise CalibrationError(f"calibration dataset {spec.name!r} is empty")
    return out


def _prompt(processor: Any, messages: list[dict[str, Any]]) -> str:
    """The chat rendered by the processor's template; without one, image tokens then the turns' text."""
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, tokenize=False)
    token = getattr(processor, "boi_token", None) or getattr(processor, "image_token", None) or _PLACEHOLDER
    parts = []
    for m in messages:
        parts += [token if c["type"] == "image" else c["text"] for c in m["content"]]
    return "\n".join(p for p in parts if p)


def _open(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _fit(inputs: dict[str, torch.Tensor], seqlen: int, image_token_id: int | None, filler: list[int]
         ) -> dict[str, torch.Tensor] | None:
    """``inputs`` made exactly ``seqlen`` tokens (None: its image tokens reach past ``seqlen``)."""
    ids = inputs["input_ids"]
    length = ids.shape[1]
    per_token = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == ids.shape]
    if length >= seqlen:
        if image_token_id is not None and bool((ids[0, seqlen:] == image_token_id).any()):
            return None
        return {k: (v[:, :seqlen] if k in per_token else v) for k, v in inputs.items()}
    more = torch.tensor(filler[: seqlen - length], dtype=ids.dtype).unsqueeze(0)
    out = dict(inputs)
    for k in per_token:
        fill = more if k == "input_ids" else torch.full_like(more, _FILL.get(k, 0), dtype=inputs[k].dtype)
        out[k] = torch.cat([inputs[k], fill], 1)
    return out


def _filler(samples: list[ImageTextSample], tokenizer: Any, skip: int, length: int) -> list[int]:
    """Text tokens of the records after ``skip`` (cycling), to continue a short sample with."""
    eos = getattr(tokenizer, "eos_token_id", None)
    out: list[int] = []
    n = len(samples)
    for j in range(1, n + 1):
        sample = samples[(skip + j) % n]
        text = "\n".join(c["text"] for m in sample.messages for c in m["content"] if c["type"] == "text")
        out += tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        if len(out) >= length:
            return out
    if not out:
        raise CalibrationError("image-text samples are shorter than seqlen and the dataset holds no text to "
                               "continue them with; lower --seqlen")
    return (out * (length // len(out) + 1))[:length]


def image_text_rows(spec: DatasetSpec, processor: Any, image_token_id: int | None, seqlen: int, want: int,
                    seed: int, extra_data_dir: str | None) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    """Up to ``want`` samples of ``spec`` as (ids, the processor's other outputs), each ``seqlen`` tokens.
    Records are taken in a seeded order; one whose image is not on disk is skipped and counted (a
    partial image folder works), and none found at all is an error naming --extra_data_dir."""
    samples = load_image_text(spec, extra_data_dir)
    folder, base = image_dir(extra_data_dir), Path(spec.name).expanduser().parent
    tokenizer = getattr(processor, "tokenizer", processor)
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    rows: list[tuple[list[int], dict[str, torch.Tensor]]] = []
    too_long = missing = 0
    first_missing: tuple[str, list[Path]] | None = None
    for i in order:
        s = samples[i]
        paths, tried = _find_images(s, base, folder)
        if paths is None:
            missing += 1
            first_missing = first_missing or (s.where, tried)
            continue
        prompt = _prompt(processor, s.messages)
        bos = getattr(tokenizer, "bos_token", None)
        # a chat template that writes BOS itself (Gemma's) must not get a second one from the tokenizer
        once = {"add_special_tokens": False} if bos and prompt.startswith(bos) else {}
        try:
            inputs = processor(text=[prompt], images=[_open(p) for p in paths], return_tensors="pt", **once)
        except Exception as e:
            raise CalibrationError(f"{s.where}: the model's processor failed on it (image {paths[0].name}: "
                                   f"{type(e).__name__}: {str(e)[:200]})") from e
        inputs = {k: v for k, v in dict(inputs).items() if isinstance(v, torch.Tensor)}
        length = inputs["input_ids"].shape[1]
        fitted = _fit(inputs, seqlen, image_token_id, _filler(samples, tokenizer, i, seqlen - length)
                      if length < seqlen else [])
        if fitted is None:
            too_long += 1
            continue
        ids = fitted.pop("input_ids")[0].tolist()
        fitted.pop("attention_mask", None)  # samples are unpadded: the model's own causal mask
        rows.append((ids, fitted))
        if len(rows) >= want:
            break
    skipped = [f"{too_long} whose image tokens reach past seqlen"] * bool(too_long) + [
        f"{missing} whose image is not on disk"] * bool(missing)
    logger.info("calibration %s: %d image-text samples of %d tokens%s", spec.name, len(rows), seqlen,
                f" (skipped {' and '.join(skipped)})" if skipped else "")
    if not rows and first_missing is not None and not too_long:
        where, tried = first_missing
        raise CalibrationError(f"{spec.name}: no record's image was found (e.g. {where}: looked at "
                               f"{', '.join(map(str, tried)) or 'nowhere: a URL'}); images are not downloaded: pass "
                               "the folder that holds them with --extra_data_dir")
    if not rows and too_long:
        raise CalibrationError(f"{spec.name}: no sample's image tokens fit in seqlen={seqlen}; raise --seqlen")
    return rows
