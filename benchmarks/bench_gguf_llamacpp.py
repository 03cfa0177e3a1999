"""Our GGUF files against llama.cpp's own quantizer, measured by llama.cpp's `llama-perplexity`.

    python3 benchmarks/bench_gguf_llamacpp.py [--model .bench/SmolLM2-135M] [--work .bench/gguf_cmp]
        [--runs ours:q4_k_m:0,ours:q2_k_s:50,lcpp:q4_k_m,lcpp:q4_k_m:imatrix,lcpp:q2_k_s,lcpp:q2_k_s:imatrix]

Steps: build llama.cpp's tools from the llama-cpp-python sdist (build_llamacpp.py, cached);
convert the model to an f16 GGUF with llama.cpp's own converter; write the calibration texts
(the same selection bench_vs_upstream.py uses) as JSON for signround and, cut to the
seqlen-token prefixes signround keeps, as one text file for `llama-imatrix` (same seqlen, same
number of chunks); quantize; then `llama-perplexity` on every file over the same WikiText-2 test
windows (`-c 512 --chunks N`). Also compares, tensor by tensor,
the block types of our file with llama.cpp's at the same file type.

Run spec: ``ours:FTYPE:ITERS`` (signround, 0 = optimized RTN) or ``lcpp:FTYPE[:imatrix]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_vs_upstream import calibration_texts, corpus_texts, measure  # noqa: E402
from build_llamacpp import ensure_llamacpp  # noqa: E402

REPO = HERE.parent
DEFAULT_RUNS = "ours:q4_k_m:0,lcpp:q4_k_m,lcpp:q4_k_m:imatrix,ours:q2_k_s:50,lcpp:q2_k_s,lcpp:q2_k_s:imatrix"


def sh(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        rc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        raise SystemExit(f"failed ({rc}): {' '.join(map(str, cmd))}\n{log.read_text()[-3000:]}")


def perplexity(bin_dir: Path, gguf: Path, corpus: Path, ctx: int, chunks: int, log: Path) -> tuple[float, float]:
    for _ in range(3):  # llama.cpp's asynchronous logger now and then loses the tail of its output
        sh([bin_dir / "llama-perplexity", "-m", gguf, "-f", corpus, "-c", ctx, "--chunks", chunks, "-t", 2], log)
        m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", log.read_text())
        if m:
            return float(m.group(1)), float(m.group(2))
    raise SystemExit(f"no perplexity in {log}")


def tensor_types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / ".bench" / "SmolLM2-135M"))
    ap.add_argument("--work", default=str(REPO / ".bench" / "gguf_cmp"))
    ap.add_argument("--runs", default=DEFAULT_RUNS)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--corpus", default=str(REPO.parent / "shared" / "corpora" / "wikitext2_test.txt"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=60)
    ap.add_argument("--heldout_chunks", type=int, default=30,
                    help="also measure on built-in-corpus texts not used for calibration (0: skip)")
    ap.add_argument("--reuse", action="store_true", help="keep files already quantized in --work (no timing)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bin_dir = ensure_llamacpp()
    src = bin_dir.parents[1]  # .../vendor/llama.cpp

    texts = calibration_texts(args.model, args.nsamples, args.seqlen)
    # signround keeps the first seqlen tokens of each text; llama-imatrix cuts one file into chunks
    # of seqlen tokens, so it gets exactly those prefixes, one after another (chunk boundaries may
    # drift by the separator tokens), not the first nsamples x seqlen tokens of the whole texts
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    calib_txt = "\n\n".join(tok.decode(tok(t)["input_ids"][: args.seqlen]) for t in texts)
    (work / "calib.json").write_text(json.dumps(texts))
    (work / "calib.txt").write_text(calib_txt)
    heldout = work / "heldout.txt"
    corpus, used = corpus_texts(), set(texts)
    heldout.write_text("\n\n".join(t for t in corpus[len(corpus) // 2:] if t not in used))
    f16 = work / "f16.gguf"
    if not f16.exists():
        if importlib.util.find_spec("sentencepiece") is None:  # llama.cpp's converter imports it for Llama models
            raise SystemExit("llama.cpp's convert_hf_to_gguf.py needs sentencepiece: pip install sentencepiece")
        sh([sys.executable, src / "convert_hf_to_gguf.py", args.model, "--outtype", "f16", "--outfile", f16],
           work / "convert.log")
    imatrix, imatrix_src = work / "imatrix.gguf", work / "imatrix.calib.txt"
    if imatrix.exists() and not (imatrix_src.exists() and imatrix_src.read_text() == calib_txt):
        imatrix.unlink()  # made from other calibration text
    if any(r.endswith(":imatrix") for r in args.runs.split(",")) and not imatrix.exists():
        sh([bin_dir / "llama-imatrix", "-m", f16, "-f", work / "calib.txt", "-c", args.seqlen, "--chunks",
            args.nsamples, "-t", 2, "-o", imatrix], work / "imatrix.log")
        imatrix_src.write_text(calib_txt)

    rows = [{"name": "f16", "tool": "llama.cpp convert", "ftype": "F16", "file": str(f16)}]
    for spec in args.runs.split(","):
        tool, ftype, *rest = spec.strip().split(":")
        name = spec.strip().replace(":", "_")
        out = work / name
        if tool == "ours":
            iters = int(rest[0]) if rest else 0
            setting = "opt-RTN" if iters == 0 else f"SignRound {iters} iters"
            if args.reuse and list(out.glob("*.gguf")):
                rows.append({"name": name, "tool": "signround", "ftype": ftype.upper(), "setting": setting,
                             "file": str(next(out.glob("*.gguf")))})
                continue
            subprocess.run(["rm", "-rf", str(out)])
            cmd = [sys.executable, "-m", "signround", "--model", args.model, "--scheme", f"GGUF:{ftype.upper()}",
                   "--format", f"gguf:{ftype}", "--iters", iters, "--nsamples", args.nsamples, "--seqlen",
                   args.seqlen, "--batch_size", args.batch_size, "--dataset", work / "calib.json",
                   "--output_dir", out]
            res = measure([str(c) for c in cmd], work / f"{name}.log")
            if res["returncode"]:
                raise SystemExit((work / f"{name}.log").read_text()[-3000:])
            (file,) = out.glob("*.gguf")
            row = {"name": name, "tool": "signround", "ftype": ftype.upper(), "setting": setting, "file": str(file),
                   **res}
        else:
            file = work / f"{name}.gguf"
            cmd = [bin_dir / "llama-quantize"] + (["--imatrix", imatrix] if rest else []) + [f16, file, ftype.upper(), 2]
            t0 = time.time()
            log = work / f"{name}.log"
            rc = subprocess.run([str(c) for c in cmd], stdout=open(log, "w"), stderr=subprocess.STDOUT).returncode
            if rc and "requires an imatrix" in log.read_text():
                print(f"{name}: llama-quantize refuses {ftype.upper()} without an imatrix", flush=True)
                continue
            if rc:
                raise SystemExit(f"llama-quantize failed ({rc}):\n{log.read_text()[-3000:]}")
            row = {"name": name, "tool": "llama-quantize", "ftype": ftype.upper(),
                   "setting": "imatrix" if rest else "no imatrix", "file": str(file), "seconds": time.time() - t0}
        rows.append(row)

    for row in rows:
        row["ppl"], row["ppl_err"] = perplexity(bin_dir, Path(row["file"]), Path(args.corpus), args.ctx, args.chunks,
                                                work / f"ppl_{row['name']}.log")
        if args.heldout_chunks:
            row["heldout_ppl"], _ = perplexity(bin_dir, Path(row["file"]), heldout, args.ctx, args.heldout_chunks,
                                               work / f"ppl_heldout_{row['name']}.log")
        row["size_mb"] = Path(row["file"]).stat().st_size / 1e6
        print(f"{row['name']}: ppl {row['ppl']:.3f}", flush=True)

    # tensor-by-tensor block types: ours vs llama.cpp's at the same file type (no imatrix)
    by_key = {(r["tool"], r["ftype"], r.get("setting")): r for r in rows}
    for r in rows:
        if r["tool"] != "signround":
            continue
        ref = by_key.get(("llama-quantize", r["ftype"], "no imatrix")) or by_key.get(
            ("llama-quantize", r["ftype"], "imatrix"))
        if ref:
            a, b = tensor_types(Path(r["file"])), tensor_types(Path(ref["file"]))
            r["type_diffs"] = {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}

    (work / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"\nmodel {Path(args.model).name}; calibration {args.nsamples} x {args.seqlen} tokens (imatrix: same "
          f"text, {args.nsamples} chunks of {args.seqlen}); llama-perplexity -c {args.ctx} --chunks {args.chunks} "
          f"on {Path(args.corpus).name}\n")
    print("| file type | tool | setting | time s | size MB | WikiText-2 PPL (llama.cpp) | held-out PPL |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        t = f"{r['seconds']:.0f}" if "seconds" in r else ""
        print(f"| {r['ftype']} | {r['tool']} | {r.get('setting', '')} | {t} | {r['size_mb']:.1f} | "
              f"{r['ppl']:.3f} ± {r['ppl_err']:.3f} | {r.get('heldout_ppl', float('nan')):.3f} |")
    for r in rows:
        if "type_diffs" in r:
            print(f"\n{r['name']}: tensor types differing from llama-quantize's {r['ftype']}: "
                  f"{len(r['type_diffs'])} {json.dumps(r['type_diffs'])[:600]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
