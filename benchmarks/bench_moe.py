"""Mixture-of-experts benchmark: a Mixtral upcycled from SmolLM2-135M, signround vs upstream auto-round.

    python3 benchmarks/bench_moe.py [--experts 4] [--top_k 2] [--runs ours:W4G64:0,upstream:W4G64:0,...]

The model ("SmolMoE"): SmolLM2-135M's attention, norms and embeddings in a Mixtral; every MoE layer
has ``--experts`` copies of SmolLM2's MLP, each perturbed by 1% Gaussian noise (relative to the
weights' std) so experts differ, and a random router choosing ``--top_k`` of them. Mixtral weights
the chosen experts' outputs by a softmax that sums to one, so the model computes close to SmolLM2
and has a real perplexity, with SmolLM2's tokenizer. Written as a Mixtral checkpoint
(``block_sparse_moe.experts.N.w1/w2/w3``), what transformers 5 fuses on load.

Then ``benchmarks/bench_vs_upstream.py`` runs the given runs on it (same calibration texts for both
tools, one process each, wall time and peak RSS, WikiText-2 / tinyshakespeare perplexity of every
output through signround's loader, so it also says whether signround loads upstream's files), and
this script adds: per-expert routed-token counts (our report.json), seconds per block of the MoE
runs against the dense SmolLM2 run with the same settings (``--dense_runs``), and whether upstream
loads our files (its ``from_pretrained``, logits against ours).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(HERE))
from bench_memory import finish_model_dir  # noqa: E402
from upstream_env import upstream_python  # noqa: E402

SMOLLM2 = REPO / ".bench" / "SmolLM2-135M"

UPSTREAM_LOAD = r"""
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
ids = load_file(sys.argv[1])["ids"]
m = AutoModelForCausalLM.from_pretrained(sys.argv[2], device_map="cpu", dtype=torch.float32)
with torch.no_grad():
    save_file({"logits": m(ids).logits.float().contiguous()}, sys.argv[3])
"""


def build_smolmoe(out: Path, experts: int, top_k: int, noise: float = 0.01, seed: int = 0) -> Path:
    """SmolLM2-135M as a Mixtral with ``experts`` perturbed copies of each MLP (see the module doc)."""
    import shutil

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig, MixtralConfig

    if (out / "config.json").is_file():
        return out
    src = AutoConfig.from_pretrained(str(SMOLLM2))
    cfg = MixtralConfig(
        vocab_size=src.vocab_size, hidden_size=src.hidden_size, intermediate_size=src.intermediate_size,
        num_hidden_layers=src.num_hidden_layers, num_attention_heads=src.num_attention_heads,
        num_key_value_heads=src.num_key_value_heads, head_dim=src.head_dim,
        max_position_embeddings=src.max_position_embeddings, rms_norm_eps=src.rms_norm_eps,
        rope_parameters=src.rope_parameters, tie_word_embeddings=src.tie_word_embeddings,
        bos_token_id=src.bos_token_id, eos_token_id=src.eos_token_id, pad_token_id=src.pad_token_id,
        num_local_experts=experts, num_experts_per_tok=top_k, router_jitter_noise=0.0, sliding_window=None)
    cfg.dtype = "bfloat16"
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(str(SMOLLM2 / "model.safetensors"), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key).float()
            if ".mlp." not in key:
                tensors[key] = t.to(torch.bfloat16)
                continue
            layer, proj = key.split(".mlp.")
            w = {"gate_proj.weight": "w1", "down_proj.weight": "w2", "up_proj.weight": "w3"}[proj]
            for e in range(experts):
                jitter = torch.randn(t.shape, generator=gen) * (noise * t.std())
                tensors[f"{layer}.block_sparse_moe.experts.{e}.{w}.weight"] = (t + jitter).to(torch.bfloat16)
            if w == "w1":
                router = torch.randn(experts, src.hidden_size, generator=gen) * 0.02
                tensors[f"{layer}.block_sparse_moe.gate.weight"] = router.to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return finish_model_dir(tmp, out, cfg)


def bench(model: Path, runs: str, work: Path, extra: list[str]) -> dict:
    subprocess.run([sys.executable, str(HERE / "bench_vs_upstream.py"), "--model", str(model), "--runs", runs,
                    "--work", str(work), *extra], check=True)
    return json.loads((work / "results.json").read_text())


def block_seconds(out_dir: str) -> float | None:
    report = Path(out_dir) / "report.json"
    if not report.is_file():
        return None
    blocks = json.loads(report.read_text()).get("blocks") or {}
    secs = [b["seconds"] for name, b in blocks.items() if name.startswith("model.layers.") and "seconds" in b]
    return statistics.median(secs) if secs else None


def routed_summary(out_dir: str) -> dict | None:
    """Per block min / median / max routed tokens per expert, and experts kept at their start."""
    report = Path(out_dir) / "report.json"
    if not report.is_file():
        return None
    counts, kept = [], 0
    for b in (json.loads(report.read_text()).get("blocks") or {}).values():
        for c in (b.get("expert_tokens") or {}).values():
            counts += c
        kept += b.get("experts_kept_at_start", 0)
    if not counts:
        return None
    return {"min": min(counts), "median": statistics.median(counts), "max": max(counts), "experts": len(counts),
            "kept_at_start": kept}


def upstream_loads(out_dir: str, upy: Path, work: Path) -> str:
    """Upstream's from_pretrained of our files: the relative logit difference to our loader's."""
    import torch
    from safetensors.torch import load_file, save_file

    from signround import load_quantized

    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    save_file({"ids": ids}, str(work / "ids.safetensors"))
    with torch.no_grad():
        ours = load_quantized(out_dir, dtype=torch.float32)(ids).logits.float()
    r = subprocess.run([str(upy), "-c", UPSTREAM_LOAD, str(work / "ids.safetensors"), out_dir,
                        str(work / "theirs.safetensors")], capture_output=True, text=True)
    if r.returncode != 0:
        return f"fails ({r.stderr.strip().splitlines()[-1][:120]})"
    theirs = load_file(str(work / "theirs.safetensors"))["logits"]
    if not torch.isfinite(theirs).all():
        return "loads, but its logits are NaN"
    return f"{((theirs - ours).norm() / ours.norm()).item():.1e}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top_k", type=int, default=2)
    ap.add_argument("--runs", default="ours:W4G64:0,upstream:W4G64:0,ours:W4G64:50,upstream:W4G64:50")
    ap.add_argument("--dense_runs", default="ours:W4G64:50", help="the same runs on dense SmolLM2 ('' skips)")
    ap.add_argument("--work", default=str(REPO / ".bench" / "moe"))
    ap.add_argument("--report_only", action="store_true", help="print the tables of the runs already in --work")
    a, extra = ap.parse_known_args()
    if not (SMOLLM2 / "model.safetensors").is_file():
        subprocess.run([sys.executable, str(HERE / "prepare_smollm2.py"), "--out", str(SMOLLM2)], check=True)
    work = Path(a.work)
    model = build_smolmoe(work / f"smolmoe-{a.experts}x{a.top_k}", a.experts, a.top_k)
    if a.report_only:  # the tables of earlier runs (e.g. after adding upstream runs with AR_DISABLE_META_LOAD=1)
        moe = json.loads((work / "moe-runs" / "results.json").read_text())
        dense_path = work / "dense-runs" / "results.json"
        dense = json.loads(dense_path.read_text()) if dense_path.is_file() else {}
    else:
        moe = bench(model, a.runs, work / "moe-runs", extra)
        dense = bench(SMOLLM2, a.dense_runs, work / "dense-runs", extra) if a.dense_runs else {}
    upy = upstream_python()
    print(f"\nSmolMoE: SmolLM2-135M as a Mixtral, {a.experts} experts, top-{a.top_k}; fp perplexity "
          f"WikiText-2 {moe['fp']['ppl']['wikitext2']:.2f} / tinyshakespeare {moe['fp']['ppl']['tinyshakespeare']:.2f} "
          f"(dense SmolLM2: {dense.get('fp', {}).get('ppl', {}).get('wikitext2', float('nan')):.2f})\n")
    print("| model | run | WikiText-2 | tinyshakespeare | wall s | peak RSS MiB | s/block | routed tokens per expert "
          "(min / median / max) | upstream loads it (logit diff to signround's loader) |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for label, results in (("SmolMoE", moe), ("SmolLM2 (dense)", dense)):
        for name, r in results.items():
            if name == "fp" or "seconds" not in r:
                continue
            ppl = r.get("ppl", {})
            routed = routed_summary(r["dir"]) if name.startswith("ours") else None
            loads = "-"
            if label == "SmolMoE" and upy is not None and r.get("returncode") == 0:  # upstream's own files too
                loads = upstream_loads(r["dir"], upy, work)
            route = f"{routed['min']} / {routed['median']:.0f} / {routed['max']}" if routed else "-"
            secs = block_seconds(r["dir"]) if name.startswith("ours") else None
            row = dict(model=label, run=name, **ppl, seconds=r["seconds"], peak_rss_mb=r["peak_rss_mb"],
                       block_s=secs, routed=routed, upstream_loads=loads, returncode=r.get("returncode"))
            rows.append(row)
            if r.get("returncode"):
                last = (r.get("error") or "").strip().splitlines()[-1:] or [""]
                print(f"| {label} | {name} | failed after {r['seconds']:.0f} s: {last[0][:160]} | | | | | | |")
                continue
            print(f"| {label} | {name} | {ppl.get('wikitext2', float('nan')):.2f} | "
                  f"{ppl.get('tinyshakespeare', float('nan')):.2f} | {r['seconds']:.0f} | {r['peak_rss_mb']:.0f} | "
                  f"{'-' if secs is None else f'{secs:.2f}'} | {route} | {loads} |")
    (work / "moe.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nJSON: {work / 'moe.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
