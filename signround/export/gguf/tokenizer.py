"""Tokenizer metadata for GGUF from a Hugging Face fast tokenizer (its tokenizer.json).

Two vocabulary kinds cover the supported families: ``llama`` (SentencePiece-style BPE with byte
fallback: tokens, scores, types, merges) and ``gpt2`` (byte-level BPE: tokens, types, merges, and
the pre-tokenizer name llama.cpp splits text with).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import ExportError

# gguf TokenType values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_SPLIT_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"


def tokenizer_json(tokenizer: Any, source_dir: str | None) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return json.loads(backend.to_str())
    path = Path(source_dir or "") / "tokenizer.json"
    if source_dir and path.is_file():
        return json.loads(path.read_text())
    raise ExportError("GGUF export needs a fast tokenizer (tokenizer.json); none was found with the model")


def _pre_name(pre: dict | None) -> str:
    """llama.cpp's name for the way this tokenizer splits text before BPE."""
    text = json.dumps(pre or {})
    if _LLAMA3_SPLIT_START in text:
        return "llama-bpe"
    if "\\\\p{N}" in text and "qwen" in text.lower():
        return "qwen2"
    if (pre or {}).get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    return "default"


def vocab_metadata(tokenizer: Any, source_dir: str | None, vocab_size: int) -> dict[str, Any]:
    """Everything ``tokenizer.ggml.*`` needs: model, pre, tokens, scores, token_type, merges, ids."""
    tj = tokenizer_json(tokenizer, source_dir)
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"GGUF export handles BPE tokenizers; this one is {model.get('type')!r}")
    kind = "llama" if model.get("byte_fallback") else "gpt2"
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types: dict[int, int] = {}
    for a in tj.get("added_tokens") or []:
        by_id[a["id"]] = a["content"]
        types[a["id"]] = CONTROL if a.get("special") else USER_DEFINED
    n = max(vocab_size, max(by_id) + 1)
    tokens, token_types, scores = [], [], []
    unk = model.get("unk_token")
    for i in range(n):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            token_types.append(UNUSED)
        else:
            tokens.append(tok)
            if i in types:
                token_types.append(types[i])
            elif tok == unk:
                token_types.append(UNKNOWN)
            elif kind == "llama" and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                token_types.append(BYTE)
            else:
                token_types.append(NORMAL)
        # SentencePiece pieces are ordered by score: the id order is the merge priority
        scores.append(0.0 if token_types[-1] != NORMAL else -float(i))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    meta: dict[str, Any] = {
        "model": kind,
        "pre": "default" if kind == "llama" else _pre_name(tj.get("pre_tokenizer")),
        "tokens": tokens,
        "token_types": token_types,
        "merges": merges,
    }
    if kind == "llama":
        meta["scores"] = scores
    for key in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{key}_token_id", None)
        if tid is not None:
            meta[f"{key}_id"] = int(tid)
    if "bos_id" in meta:  # what the tokenizer does, whatever its config calls it
        meta["add_bos"] = tokenizer("a")["input_ids"][:1] == [meta["bos_id"]]
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        meta["chat_template"] = template
    return meta
