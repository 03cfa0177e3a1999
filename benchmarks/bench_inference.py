"""Inference speed and memory: fp32 / bf16 against W4 and W8 on each QuantLinear backend.

    python3 benchmarks/bench_inference.py [--models DIR,DIR] [--prompt 128] [--decode 32]

For every model: RTN-quantize W4 (group 64; per-channel when 64 does not divide the layers) and
W8 (per channel) into the auto_round format, then for each variant start a fresh process that loads
it, runs one prefill of ``--prompt`` tokens and greedy-decodes ``--decode`` tokens at batch 1, and
reports prefill and decode tokens/s, the bytes of weights resident (parameters, buffers and backend
state) and the process's peak RSS. For every quantized variant it also scores WikiText-2 test
(``--ppl_windows`` windows of 512 tokens) with the in-memory qdq model that quantizing produced and
with the saved model loaded back by ``load_quantized`` (default backend), to show they agree.
Prints markdown tables and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = [REPO / ".bench" / "SmolLM2-135M", REPO.parent / "shared" / "models" / "stories260K"]

CHILD = r"""
import json, sys, time
import torch
a = json.loads(sys.argv[1])
torch.manual_seed(0)
if a["kind"] == "fp":
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(a["dir"], dtype=getattr(torch, a["dtype"])).eval()
else:
    from signround import load_quantized
    # dtype None: what a user gets with no dtype (chosen by device: float32 on CPUs without native half)
    model = load_quantized(a["dir"], dtype=getattr(torch, a["dtype"]) if a["dtype"] else None, backend=a["backend"])
vocab = model.config.vocab_size
ids = torch.randint(0, vocab, (1, a["prompt"]))
with torch.no_grad():
    model(input_ids=ids[:, :8])  # warm-up: backends prepare their state at the first call
    t = time.perf_counter(); model(input_ids=ids); prefill = time.perf_counter() - t
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=a["decode"], min_new_tokens=a["decode"], do_sample=False)
    decode = time.perf_counter() - t - prefill  # generate() starts with a prefill of its own
from signround.inference import QuantLinear
state = 0
for m in model.modules():
    if isinstance(m, QuantLinear):
        state += sum(t.numel() * t.element_size() for t in m._state.values() if torch.is_tensor(t))
weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) + state
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
backends = sorted({m.backend for m in model.modules() if isinstance(m, QuantLinear)})
print("RESULT " + json.dumps({"prefill_tok_s": a["prompt"] / prefill, "decode_tok_s": a["decode"] / max(decode, 1e-9),
                              "weights_mb": weights / 2**20, "peak_rss_mb": hwm / 2**20, "backends": backends,
                              "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}))
"""


WIKITEXT = REPO.parent / "shared" / "corpora" / "wikitext2_test.txt"


def quantize(model_dir: Path, out: Path, bits: int, group_size: int, ppl_windows: int, dtype: str = "float32") -> dict:
    """Quantize (RTN) and save; perplexity of the in-memory model and of the reloaded one."""
    from transformers import AutoTokenizer

    from signround import AutoRound, load_quantized
    from signround.eval.perplexity import perplexity

    # the whole model in memory: its qdq weights are the reference the reloaded files are scored against
    ar = AutoRound(str(model_dir), scheme="W4A16", bits=bits, group_size=group_size, iters=0, disable_opt_rtn=True,
                   dtype=dtype, low_cpu_mem_usage=False)
    model, _ = ar.quantize_and_save(str(out), format="auto_round")
    if not ppl_windows:
        return {}
    tok, text = AutoTokenizer.from_pretrained(str(model_dir)), WIKITEXT.read_text()
    with torch.no_grad():
        mem = perplexity(model.eval(), tok, text, 512, ppl_windows)["ppl"]
        reloaded = perplexity(load_quantized(str(out), dtype=torch.float32), tok, text, 512, ppl_windows)["ppl"]
    return {"ppl_in_memory": mem, "ppl_reloaded": reloaded, "rel_diff": abs(reloaded - mem) / mem}


def group_for(model_dir: Path, gs: int) -> int:
    """``gs`` when it divides every layer's input size, else per channel (-1)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    sizes = {cfg["hidden_size"], cfg.get("intermediate_size", cfg["hidden_size"])}
    return gs if all(s % gs == 0 for s in sizes) else -1


def run_child(args: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if r.returncode or line is None:
        return {"error": (r.stderr or r.stdout)[-500:]}
    return json.loads(line[7:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(str(m) for m in DEFAULT_MODELS))
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--ppl_windows", type=int, default=8, help="0: skip the reload perplexity check")
    ap.add_argument("--out", default=str(REPO / ".bench" / "inference.json"))
    a = ap.parse_args()
    rows, ppl_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for model in map(Path, a.models.split(",")):
            if not (model / "config.json").is_file():
                print(f"skip {model}: not a model directory (benchmarks/prepare_smollm2.py makes SmolLM2-135M)")
                continue
            g4 = group_for(model, 64)
            variants = [("fp32", "fp", model, "float32", None), ("bf16", "fp", model, "bfloat16", None)]
            for bits, gs in ((4, g4), (8, -1)):
                qdir = Path(tmp) / f"{model.name}-w{bits}"
                label = f"W{bits}G{gs}"
                check = quantize(model, qdir, bits, gs, a.ppl_windows)
                if check:
                    ppl_rows.append({"model": model.name, "variant": label, **check})
                    print(json.dumps(ppl_rows[-1]), flush=True)
                backends = ["dequant_once", "torch", "int4_cpu" if bits == 4 else "int8_cpu"]
                variants += [(f"{label} {b}", "q", qdir, "float32", b) for b in backends]
                variants.append((f"{label} packed (bf16)", "q", qdir, "bfloat16", "packed"))
                if bits == 4 and json.loads((model / "config.json").read_text()).get("dtype") == "float16":
                    # the checkpoint's own dtype saved: what a user's first load gets with no dtype given,
                    # against computing in that float16 (the default before dtypes were chosen by device)
                    hdir = Path(tmp) / f"{model.name}-w4-fp16"
                    quantize(model, hdir, bits, gs, 0, dtype="auto")
                    variants += [(f"{label} fp16 checkpoint, default load", "q", hdir, None, "auto"),
                                 (f"{label} fp16 checkpoint, dtype float16", "q", hdir, "float16", "auto")]
            for label, kind, d, dtype, backend in variants:
                res = run_child({"kind": kind, "dir": str(d), "dtype": dtype, "backend": backend or "auto",
                                 "prompt": a.prompt, "decode": a.decode})
                rows.append({"model": model.name, "variant": label, **res})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\nprompt {a.prompt} tokens, decode {a.decode} tokens, batch 1\n")
    print("| model | variant | backends | dtype | prefill tok/s | decode tok/s | weights MB | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            why = "backend does not hold these layers" if "cannot run" in r["error"] else f"error: {r['error'][-80:]!r}"
            print(f"| {r['model']} | {r['variant']} | {why} | | | | | |")
            continue
        print(f"| {r['model']} | {r['variant']} | {'/'.join(r['backends']) or '-'} | {r['dtype']} | {r['prefill_tok_s']:.0f} | "
              f"{r['decode_tok_s']:.1f} | {r['weights_mb']:.1f} | {r['peak_rss_mb']:.0f} |")
    if ppl_rows:
        print(f"\nWikiText-2 test, {a.ppl_windows} windows of 512 tokens\n")
        print("| model | variant | in-memory qdq ppl | saved + load_quantized ppl | relative difference |")
        print("|---|---|---|---|---|")
        for r in ppl_rows:
            print(f"| {r['model']} | {r['variant']} | {r['ppl_in_memory']:.4f} | {r['ppl_reloaded']:.4f} | "
                  f"{r['rel_diff']:.2e} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"speed": rows, "reload_ppl": ppl_rows}, indent=2) + "\n")
    print(f"\nJSON: {a.out}")


if __name__ == "__main__":
    main()
