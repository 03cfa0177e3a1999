"""The dataset spec grammar: ``a.json,b.txt,org/name:num=256:split=train+validation:concat=True``.

A bare word after the name is a split, as upstream writes it: ``NeelNanda/pile-10k:train``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import CalibrationError

_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
OPTIONS = ("num", "split", "concat", "apply_chat_template", "system_prompt")
_SPLIT = re.compile(r"^[A-Za-z_][\w-]*(\[[^\]]*\])?(\+[A-Za-z_][\w-]*(\[[^\]]*\])?)*$")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num: int | None = None
    split: str | None = None
    concat: bool = False
    apply_chat_template: bool = False
    system_prompt: str | None = None


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    parts, cur, quote = [], [], None
    for ch in text:
        if quote:
            if ch == quote:
                quote = None
            cur.append(ch)
        elif ch in "\"'":
            quote = ch
            cur.append(ch)
        elif ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if quote:
        raise CalibrationError(f"unbalanced quote in dataset spec {text!r}")
    parts.append("".join(cur))
    return parts


def _unquote(v: str) -> str:
    v = v.strip()
    return v[1:-1] if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'" else v


def _bool(key: str, value: str, item: str) -> bool:
    if value.lower() not in _BOOL:
        raise CalibrationError(f"dataset spec {item!r}: {key}={value!r} is not a boolean; use True or False")
    return _BOOL[value.lower()]


def parse_dataset_spec(spec: str) -> list[DatasetSpec]:
    """Parse a comma-separated list of datasets, each with ``:key=value`` options."""
    if not spec or not spec.strip():
        raise CalibrationError("empty dataset spec; pass e.g. --dataset ./calib.jsonl or leave it out for the default")
    out: list[DatasetSpec] = []
    for item in _split_outside_quotes(spec, ","):
        item = item.strip()
        if not item:
            continue
        name, *opts = _split_outside_quotes(item, ":")
        kw: dict = {}
        for opt in opts:
            key, eq, value = opt.partition("=")
            key = key.strip()
            value = _unquote(value)
            if not eq and key not in OPTIONS and _SPLIT.match(key):
                key, value = "split", key  # upstream's bare split: "NeelNanda/pile-10k:train", "mbpp:train+test"
            if key not in OPTIONS:
                raise CalibrationError(
                    f"dataset spec {item!r}: unknown option {key!r}; options are {', '.join(OPTIONS)}"
                )
            if key == "num":
                if not value.isdigit() or int(value) <= 0:
                    raise CalibrationError(f"dataset spec {item!r}: num must be a positive integer, got {value!r}")
                kw["num"] = int(value)
            elif key in ("concat", "apply_chat_template"):
                kw[key] = True if not eq else _bool(key, value, item)
            else:
                if not value:
                    raise CalibrationError(f"dataset spec {item!r}: {key} needs a value, e.g. {key}=...")
                kw[key] = value
        out.append(DatasetSpec(name=name.strip(), **kw))
    if not out:
        raise CalibrationError(f"dataset spec {spec!r} names no dataset")
    return out
