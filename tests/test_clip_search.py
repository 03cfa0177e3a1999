"""Optimized RTN's clipping search: never worse than plain RTN, and the least-squares refit helps."""

import pytest
import torch

from signround.qdq import qdq
from signround.qdq.common import to_groups
from signround.schemes import GGML_SPECS, QuantSpec
from signround.tune.rtn import search_clip

SPECS = {
    "q2_k": GGML_SPECS["q2_k"],
    "q3_k": GGML_SPECS["q3_k"],
    "q4_k": GGML_SPECS["q4_k"],
    "q6_k": GGML_SPECS["q6_k"],
    "q4_0": GGML_SPECS["q4_0"],
    "W2G64": QuantSpec(2, 64, True),
    "W4G32asym": QuantSpec(4, 32, False),
}


def _weight(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 512, generator=g) * 0.02
    w[3, 17] = 0.9  # an outlier that dominates its group and super-block
    w[5, :256] = -w[5, :256].abs()  # a negative-only super-block
    w[7, 32:64] = 0  # an all-zero group
    imp = torch.rand(512, generator=g) ** 4 * 100  # peaked importance, as activations have
    return w, imp


def _err(w, spec, imp, mn=None, mx=None, per: int = 0) -> torch.Tensor:
    dq = qdq(w, spec, min_scale=mn, max_scale=mx)[0]
    e = (dq - w) ** 2 * imp
    return e.reshape(w.shape[0], -1, per).sum(-1) if per else e.sum()


@pytest.mark.parametrize("name", list(SPECS))
def test_search_never_worse_than_plain_rtn(name):
    spec = SPECS[name]
    w, imp = _weight()
    mn, mx = search_clip(w, spec, imp)
    assert mn.min() >= 0 and mx.max() <= 1
    # k-quants couple sub-blocks through the super-block scale: compare per super-block; other
    # types per group
    per = 256 if spec.data_type.endswith("_dq") else spec.group_size
    searched, plain = _err(w, spec, imp, mn, mx, per), _err(w, spec, imp, per=per)
    assert torch.isfinite(searched).all()
    assert (searched <= plain * (1 + 1e-5) + 1e-12).all()
    assert searched.sum() < 0.9 * plain.sum()


@pytest.mark.parametrize("name", ["q2_k", "q4_k", "q4_0", "q3_k"])
def test_least_squares_refit_improves_on_the_ratio_grid(name):
    spec = SPECS[name]
    w, imp = _weight(1)
    grid_only = _err(w, spec, imp, *search_clip(w, spec, imp, refit=False))
    refit = _err(w, spec, imp, *search_clip(w, spec, imp))
    assert refit < grid_only


def test_search_follows_the_importance():
    """Channels with high importance end up with lower error than under a flat importance."""
    spec = SPECS["q2_k"]
    w, _ = _weight(2)
    hot = torch.zeros(512, dtype=torch.bool)
    hot[::7] = True
    imp = torch.where(hot, torch.tensor(100.0), torch.tensor(0.01))

    def hot_err(importance):
        mn, mx = search_clip(w, spec, importance)
        return ((qdq(w, spec, min_scale=mn, max_scale=mx)[0] - w) ** 2)[:, hot].sum()

    assert hot_err(imp) < hot_err(None)


def test_groups_of_search_are_shaped_like_qparams():
    spec = SPECS["q4_k"]
    w, imp = _weight()
    mn, mx = search_clip(w, spec, imp)
    assert mn.shape == mx.shape == to_groups(w, spec.group_size).shape[:2]


@pytest.mark.parametrize("name", ["q4_0", "q6_k"])
def test_llama_candidates_never_worse_than_plain_rtn(name):
    from signround.tune.rtn import opt_rtn_grids

    spec = SPECS[name]
    w, imp = _weight(2)
    clip_grid, refit_grid = opt_rtn_grids(spec, (1.0, 0.5))
    assert clip_grid == (1.0,) and max(refit_grid) > 1 > min(refit_grid)
    mn, mx = search_clip(w, spec, imp, clip_grid, refit_grid=refit_grid)
    per = 256 if spec.data_type.endswith("_dq") else spec.group_size
    searched, plain = _err(w, spec, imp, mn, mx, per), _err(w, spec, imp, per=per)
    assert (searched <= plain * (1 + 1e-5) + 1e-12).all()
    assert searched.sum() < plain.sum()


def test_llama_refit_grid_is_make_qx_quants_candidates():
    from signround.tune.rtn import llama_refit_grid

    # the extreme weight lands on code -(nmax + 0.1 i), i = -9..9
    assert llama_refit_grid(4) == pytest.approx([8 / (8 + 0.1 * i) for i in range(-9, 10)])
    assert llama_refit_grid(6)[9] == 1.0 and llama_refit_grid(6)[0] == pytest.approx(32 / 31.1)


def test_opt_rtn_searches_q4_0_with_llamas_candidates(stories_dir, clip_searches):
    """GGUF q4_0 layers get llama.cpp's narrow refit search (measured better in perplexity);
    other integer schemes keep the wide clipping grid (q6_k / q4_k: test_gguf_export)."""
    from signround import AutoRound
    from signround.tune.rtn import CLIP_GRID, REFIT_GRID, llama_refit_grid

    for scheme in ("GGUF:Q4_0", "W4A16G32"):
        AutoRound(str(stories_dir), scheme=scheme, iters=0, nsamples=4, seqlen=32, batch_size=4).quantize()
    assert clip_searches["q4_0"] == {((1.0,), llama_refit_grid(4))}
    assert clip_searches["int"] == {(CLIP_GRID, REFIT_GRID)}
