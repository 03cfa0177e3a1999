import logging
import os
import shutil
from pathlib import Path

# before anything imports huggingface_hub / datasets: both read these once, at import
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tiny_models import build_tiny_model  # noqa: E402

# Without a GPU, Triton kernels run in its interpreter; this must be set before triton is imported
# (its standard-library functions are wrapped at import time)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO.parent / "shared" / "models" / "stories260K"


@pytest.fixture(scope="session")
def stories_dir(tmp_path_factory) -> Path:
    if not STORIES.is_dir():
        pytest.fail(f"test asset missing: {STORIES} (the shared stories260K model)")
    dst = tmp_path_factory.mktemp("models") / "stories260K"
    shutil.copytree(STORIES, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = build_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return cache[arch]

    return get


@pytest.fixture
def clip_searches(monkeypatch) -> dict[str, set]:
    """Records the (clipping grid, refit grid) of every clipping search the pipeline runs, per
    GGML type (or data type where there is none)."""
    import signround.tune.pipeline as pipeline
    import signround.tune.rtn as rtn
    from signround.tune.rtn import CLIP_GRID

    seen: dict[str, set] = {}
    real = rtn.search_clip

    def spy(w, spec, importance=None, grid=CLIP_GRID, **kw):
        seen.setdefault(spec.ggml_type or spec.data_type, set()).add((grid, kw.get("refit_grid")))
        return real(w, spec, importance, grid, **kw)

    monkeypatch.setattr(pipeline, "search_clip", spy)  # the block layers' searches
    monkeypatch.setattr(rtn, "search_clip", spy)  # single layers' (opt_rtn_layer: GGUF embeddings, vision tower)
    return seen


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO, logger="signround")
