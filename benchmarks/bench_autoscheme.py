"""AutoScheme benchmark: mixed schemes at a bit budget against uniform schemes and upstream's AutoScheme.

    python3 benchmarks/bench_autoscheme.py                      # opt-RTN (iters 0), every run below
    python3 benchmarks/bench_autoscheme.py --iters 50 --runs ours:auto:3.0,ours:uniform:W3A16G64

Every run is a separate process (wall time and peak RSS of its process tree, as bench_vs_upstream.py
measures them) on SmolLM2-135M with the same 16 x 256 calibration texts. Run specs:

* ``ours|upstream:auto:BUDGET[i][=OPT+OPT+...]``: AutoScheme at BUDGET average bits over the options
  (default W2A16G64+W3A16G64+W4A16G64); ``i``: the budget counts weight bits only
  (``ignore_scale_zp_bits``), e.g. ``ours:auto:3.0i``;
* ``ours:uniform:SCHEME``: one scheme for every layer.

Schemes with MX/NV types are saved as llm_compressor, GGUF ones (``ours:uniform:GGUF:Q4_K_S``,
``ours:auto:3.5=GGUF:Q2_K_S+GGUF:Q4_K_S``) as one .gguf file of the (dearest) option's file type,
others as auto_round. Achieved bits are counted from each saved config (quantization_config, per
layer) with the accounting both tools use (signround.autoscheme.layer_bits); for GGUF files from the
file itself: the bytes of every 2-D tensor (token embedding and output included, as AutoScheme counts
them for GGUF) over their weights. WikiText-2 / tinyshakespeare perplexity from the saved files loaded
with signround.load_quantized (GGUF: transformers' gguf_file loader, which dequantizes).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "scripts"))
from bench_vs_upstream import evaluate, load_results, measure, prepare_work  # noqa: E402
from upstream_env import MISSING  # noqa: E402

INT_OPTIONS = "W2A16G64+W3A16G64+W4A16G64"
DEFAULT_RUNS = ",".join([
    "ours:uniform:W2A16G64", "ours:uniform:W3A16G64", "ours:uniform:W4A16G64",
    "ours:auto:2.5", "upstream:auto:2.5", "ours:auto:3.0", "upstream:auto:3.0", "ours:auto:3.5", "upstream:auto:3.5",
    "ours:uniform:W4A16", "ours:uniform:W8A16", "ours:auto:4.5=W4A16+W8A16", "upstream:auto:4.5=W4A16+W8A16",
    "ours:uniform:MXFP4", "ours:uniform:MXFP8", "ours:auto:6.0=MXFP4+MXFP8", "upstream:auto:6.0=MXFP4+MXFP8",
])

UPSTREAM_CHILD = r"""
import json, sys
def main():
    from auto_round import AutoRound
    from auto_round.auto_scheme import AutoScheme
    a = json.loads(sys.argv[1])
    scheme = AutoScheme(avg_bits=a["budget"], options=a["options"], ignore_scale_zp_bits=a["ignore"])
    ar = AutoRound(a["model"], scheme=scheme, iters=a["iters"], nsamples=a["nsamples"], seqlen=a["seqlen"],
                   batch_size=a["batch_size"], dataset=a["calib"], seed=42)
    ar.quantize_and_save(a["out"], format=a["format"])
if __name__ == "__main__":
    main()
"""


def parse_run(spec: str) -> dict:
    m = re.fullmatch(r"(ours|upstream):(auto|uniform):([^=]+?)(i?)(?:=(.+))?", spec)
    if not m or (m.group(2) == "uniform" and (m.group(1) != "ours" or m.group(4) or m.group(5))):
        raise SystemExit(f"bad run spec {spec!r}; expected ours|upstream:auto:BUDGET[i][=OPT+OPT] or ours:uniform:SCHEME")
    tool, kind, value, ignore, opts = m.groups()
    run = {"tool": tool, "kind": kind, "name": spec.replace(":", "_").replace("=", "_").replace("+", "-")}
    if kind == "auto":
        run.update(budget=float(value), options=(opts or INT_OPTIONS).split("+"), ignore_scale_zp_bits=bool(ignore))
    else:
        run["scheme"] = value
    schemes = run.get("options") or [run["scheme"]]
    run["format"] = "llm_compressor" if any(re.search("FP", s) for s in schemes) else "auto_round"
    if any(s.upper().startswith("GGUF:") for s in schemes):
        from signround.autoscheme.options import base_spec, parse_options
        from signround.schemes import preset

        spec = base_spec(parse_options(schemes)) if kind == "auto" else preset(run["scheme"].upper())
        run["format"] = f"gguf:{spec.ggml_type}"
    return run


def run_one(run: dict, args, calib: Path, work: Path, upy: Path | None) -> dict:
    out = work / f"{run['name']}_i{args.iters}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.parent / f".{out.name}.signround-partial", ignore_errors=True)  # an interrupted run's
    if run["tool"] == "upstream":
        if upy is None:
            return {"skipped": MISSING}
        a = {"model": args.model, "budget": run["budget"], "options": ",".join(run["options"]), "iters": args.iters,
             "nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": args.batch_size, "calib": str(calib),
             "out": str(out), "format": run["format"], "ignore": run["ignore_scale_zp_bits"]}
        cmd = [str(upy), "-c", UPSTREAM_CHILD, json.dumps(a)]
    else:
        cmd = [sys.executable, "-m", "signround", args.model, "--iters", str(args.iters), "--nsamples",
               str(args.nsamples), "--seqlen", str(args.seqlen), "--batch_size", str(args.batch_size),
               "--dataset", str(calib), "--output_dir", str(out), "--format", run["format"]]
        if run["kind"] == "auto":
            cmd += ["--avg_bits", str(run["budget"]), "--options", ",".join(run["options"])]
            if run["ignore_scale_zp_bits"]:
                cmd.append("--ignore_scale_zp_bits")
        else:
            cmd += ["--scheme", run["scheme"]]
    res = measure(cmd, work / f"{out.name}.log")
    found = [out] if (out / "config.json").exists() or list(out.glob("*.gguf")) else sorted(
        p.parent for p in [*out.glob("*/config.json"), *out.glob("*/*.gguf")])  # upstream writes a subdirectory
    res["dir"] = str(found[0] if found else out)
    if res["returncode"] != 0:
        res["error"] = (work / f"{out.name}.log").read_text()[-2000:]
    return res


def linear_shapes(model_dir: str) -> dict[str, tuple[int, int]]:
    """[out, in] of every 2-D weight inside the decoder blocks of the full-precision checkpoint."""
    from signround.model.source import checkpoint_index

    shapes = {}
    for name, (_, info) in checkpoint_index(Path(model_dir)).items():
        if name.endswith(".weight") and ".layers." in name and len(info["shape"]) == 2:
            shapes[name[: -len(".weight")]] = tuple(info["shape"])
    return shapes


def _spec_of(d: dict):
    from signround.schemes import QuantSpec

    if d.get("data_type") == "float" or int(d.get("bits", 16)) >= 16:
        return QuantSpec(bits=16)
    dt = d.get("data_type", "int")
    dt = {"mx_fp4": "mx_fp", "mx_fp8": "mx_fp", "mx_fp_rceil": "mx_fp", "nv_fp4": "nv_fp"}.get(dt, dt)
    return QuantSpec(bits=int(d["bits"]), group_size=int(d.get("group_size", 128)), sym=bool(d.get("sym", True)),
                     data_type=dt)


def layer_specs(out_dir: Path, shapes: dict) -> dict:
    """Each block layer's spec as the saved quantization_config states it."""
    qc = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    if "config_groups" in qc:  # compressed-tensors
        specs = {n: _spec_of({"bits": 16}) for n in shapes}
        # a layer named by a group (or a regex) takes that group over a class-wide "Linear" target
        groups = sorted(qc["config_groups"].values(), key=lambda g: g["targets"] != ["Linear"])
        for g in groups:
            w = g["weights"]
            kind = {"float": "mx_fp" if w.get("group_size") == 32 else "nv_fp" if w.get("group_size") == 16 else "fp",
                    "int": "int"}[w["type"]]
            spec = _spec_of({"bits": w["num_bits"], "group_size": w.get("group_size") or -1,
                             "sym": w.get("symmetric", True), "data_type": kind})
            for n in shapes:
                if n in qc.get("ignore", []):
                    continue
                if any(t == "Linear" or t == n or (t.startswith("re:") and re.search(t[3:], n)) for t in g["targets"]):
                    specs[n] = spec
        return specs
    default = {k: qc.get(k) for k in ("bits", "group_size", "sym", "data_type") if qc.get(k) is not None}
    extra = qc.get("extra_config", {})
    specs = {}
    for n in shapes:
        d = dict(default)
        for key, v in extra.items():
            if key == n or (key not in shapes and re.search(key, n)):
                d.update(v)
        specs[n] = _spec_of(d)
    return specs


def gguf_bits(out_dir: Path, blocks_only: bool = False) -> float:
    """Bits per weight of the 2-D tensors of the .gguf file in ``out_dir`` (their bytes on disk);
    ``blocks_only``: the decoder blocks' (``blk.*``) alone, what the integer rows count."""
    import numpy as np
    from gguf import GGUFReader

    (f,) = out_dir.glob("*.gguf")
    mats = [t for t in GGUFReader(str(f)).tensors if len(t.shape) == 2 and (t.name.startswith("blk.") or not blocks_only)]
    return sum(int(t.n_bytes) * 8 for t in mats) / sum(int(np.prod(t.shape)) for t in mats)


def evaluate_gguf(out_dir: Path, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench_vs_upstream import CORPORA
    from signround.eval import perplexity, read_text

    (f,) = out_dir.glob("*.gguf")
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(str(out_dir), gguf_file=f.name, dtype=torch.float32)
    return {name: perplexity(model, tok, read_text(c), seqlen=args.eval_seqlen, n_windows=args.eval_windows)["ppl"]
            for name, c in CORPORA.items()}


def achieved_bits(out_dir: Path, shapes: dict) -> float:
    from signround.autoscheme import layer_bits

    specs = layer_specs(out_dir, shapes)
    total = sum(layer_bits(specs[n], o, i) for n, (o, i) in shapes.items())
    return total / sum(o * i for o, i in shapes.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / ".bench" / "SmolLM2-135M"))
    ap.add_argument("--runs", default=DEFAULT_RUNS)
    ap.add_argument("--iters", type=int, default=0)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--eval_seqlen", type=int, default=512)
    ap.add_argument("--eval_windows", type=int, default=16)
    ap.add_argument("--work", default=str(REPO / ".bench" / "autoscheme"))
    ap.add_argument("--table_only", action="store_true", help="print the table of the stored results, running nothing")
    args = ap.parse_args()
    runs = [parse_run(s) for s in args.runs.split(",") if s]
    work, calib, upy = prepare_work(args)
    shapes = linear_shapes(args.model)
    results_path = work / f"results_i{args.iters}.json"
    results = load_results(results_path, args)
    for run in [] if args.table_only else runs:
        print(f"running {run['name']} (iters {args.iters}) ...", flush=True)
        r = {**run, **run_one(run, args, calib, work, upy)}
        if r.get("returncode") == 0 and run["format"].startswith("gguf:"):
            r["avg_bits"], r["block_bits"] = gguf_bits(Path(r["dir"])), gguf_bits(Path(r["dir"]), blocks_only=True)
            r["ppl"] = evaluate_gguf(Path(r["dir"]), args)
        elif r.get("returncode") == 0:
            r["avg_bits"] = achieved_bits(Path(r["dir"]), shapes)
            r["ppl"] = evaluate(r["dir"], False, args)
        results[run["name"]] = r
        results_path.write_text(json.dumps(results, indent=2))
        print(json.dumps({k: v for k, v in r.items() if k != "error"}), flush=True)
    fp = results["fp"]["ppl"]
    print(f"\nmodel {Path(args.model).name}; iters {args.iters}; calibration {args.nsamples} x {args.seqlen} tokens; "
          f"perplexity over {args.eval_windows} windows x {args.eval_seqlen} tokens\n")
    print("| run | budget | achieved bits | wall s | peak RSS MiB | WikiText-2 ppl | tinyshakespeare ppl |")
    print("|---|---|---|---|---|---|---|")
    print(f"| bf16 model | | 16 | | | {fp['wikitext2']:.2f} | {fp['tinyshakespeare']:.2f} |")
    for run in runs:
        r = results.get(run["name"], {})
        label = f"{r.get('tool')} " + ("AutoScheme " + "/".join(run["options"]) if run["kind"] == "auto" else run["scheme"])
        budget = (f"{run['budget']:g}" + (" (weights only)" if run["ignore_scale_zp_bits"] else "")
                  if run["kind"] == "auto" else "")
        if "ppl" not in r:
            why = r.get("skipped") or (r.get("error") or "failed")[-300:].replace("\n", " ").replace("|", "/")
            print(f"| {label} | {budget} | {why} | | | | |")
            continue
        bits = f"{r['avg_bits']:.3f}"
        if run["format"].startswith("gguf:"):  # every 2-D tensor (what AutoScheme counts for GGUF), then blocks only
            bits += f" (blocks {gguf_bits(Path(r['dir']), blocks_only=True):.3f})"
        print(f"| {label} | {budget} | {bits} | {r['seconds']:.0f} | {r['peak_rss_mb']:.0f} | "
              f"{r['ppl']['wikitext2']:.2f} | {r['ppl']['tinyshakespeare']:.2f} |")
    print(f"\nJSON: {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
