"""Model ids from the Hugging Face Hub (or ModelScope): downloaded into the usual cache, or resolved
from it offline, as transformers does.

Only what a quantizer needs is fetched: configs, safetensors weights and tokenizer files (no
pickled ``.bin`` weights). ``HF_HUB_OFFLINE=1`` resolves from the cache alone; ``HF_HOME`` /
``HF_HUB_CACHE`` choose the cache; ``HF_TOKEN`` is read by huggingface_hub for gated models.
``AR_USE_MODELSCOPE=1`` or ``model_source="modelscope"`` downloads through ``modelscope`` instead.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from ..errors import ModelError

logger = logging.getLogger(__name__)

ALLOW = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]
_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(name: str) -> bool:
    return bool(_ID.match(name)) and not name.startswith((".", "/", "~"))


def hub_cache() -> Path:
    """The cache huggingface_hub uses now (environment read at call time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


_REACHABLE: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub endpoint opens (``HF_ENDPOINT``); asked once per process."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    if host not in _REACHABLE:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            _REACHABLE[host] = True
        except OSError:
            _REACHABLE[host] = False
    return _REACHABLE[host]


def offline_unless_reachable() -> bool:
    """Switch huggingface_hub and datasets to cache-only lookups when the Hub cannot be reached.

    Without this, every lookup of an uncached file retries with back-off (about 25 s per file, and
    an lm-eval task asks for several), so a machine without network waits minutes for an error it
    could have had at once. Returns whether lookups are cache-only now."""
    if _offline():
        return True
    if hub_reachable():
        return False
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    # both libraries read the variables at import; patch the copies already imported
    for module, attrs in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                          ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        mod = sys.modules.get(module)
        for attr in attrs:
            if mod is not None and hasattr(mod, attr):
                setattr(mod, attr, True)
    logger.info("the Hugging Face Hub is not reachable from here: models and datasets come from the cache only")
    return True


def resolve_model(name: str | os.PathLike, revision: str | None = None, source: str | None = None) -> str:
    """A local directory for ``name``: itself when it exists, else a Hub snapshot (downloaded, or
    from the cache when offline). A name that is neither gets a message naming the cache and
    ``HF_HUB_OFFLINE``. ``source``: ``hf`` (default) or ``modelscope`` (upstream's ``huggingface`` /
    ``model_scope`` too)."""
    text = str(name)
    if Path(text).expanduser().exists() or not looks_like_hub_id(text):
        return text
    source = source or ("modelscope" if os.environ.get("AR_USE_MODELSCOPE", "").lower() in ("1", "true") else "hf")
    source = {"model_scope": "modelscope", "huggingface": "hf"}.get(source, source)  # upstream's spellings too
    if source == "modelscope":
        return _modelscope(text, revision)
    if source != "hf":
        raise ModelError(f"model_source {source!r} is unknown; use huggingface or modelscope")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # transformers depends on it; only a broken install lacks it
        raise ModelError(f"{text!r} looks like a Hub id but huggingface_hub is not installed") from e
    cache, offline = hub_cache(), offline_unless_reachable()
    try:
        path = snapshot_download(repo_id=text, revision=revision, cache_dir=str(cache), allow_patterns=ALLOW,
                                 local_files_only=offline)
    except Exception as e:  # noqa: BLE001 - not cached / not reachable / gated: one message with the fixes
        how = ("the Hub is not reachable (or HF_HUB_OFFLINE=1 is set), so only the cache was looked at" if offline else
               f"the Hub was not reachable or refused it ({type(e).__name__})")
        raise ModelError(
            f"model {text!r} is not a local directory and looks like a Hugging Face Hub id; it is not in the cache "
            f"{cache} and {how}. Download it where there is network (huggingface-cli download {text}) into that "
            "cache or pass the local directory; HF_HOME/HF_HUB_CACHE choose the cache, HF_TOKEN gives access to "
            "gated models"
        ) from e
    logger.info("%s: %s %s", text, "found in the cache at" if offline else "downloaded to / found at", path)
    return path


def _modelscope(name: str, revision: str | None) -> str:
    try:
        from modelscope import snapshot_download
    except ImportError as e:
        raise ModelError(f"{name!r} is to come from ModelScope (AR_USE_MODELSCOPE / --model_source), but the "
                         "modelscope package is not installed: pip install modelscope") from e
    try:
        return snapshot_download(name, revision=revision or "master")
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"ModelScope could not provide {name!r} ({e}); pass a local directory instead") from e
