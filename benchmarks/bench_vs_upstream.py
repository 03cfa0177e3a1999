"""Side-by-side benchmark: signround vs upstream auto-round on the same model, data and settings.

    python3 benchmarks/bench_vs_upstream.py --runs ours:W4G64:50,upstream:W4G64:50,ours:W2G64:50,upstream:W2G64:50

Each run is a separate process (wall time; peak RSS = the process's VmHWM plus its children's RSS, sampled);
runs are executed in the order given, so list them alternating between tools. Both tools get the same
calibration texts (``--nsamples`` texts from signround's built-in corpus, each at least ``--seqlen``
tokens long, so both keep all of them) and the same settings. Every output (auto_round format) is
then loaded with ``signround.load_quantized`` and scored on WikiText-2 test and tinyshakespeare with
fixed windows. Prints a markdown table and writes JSON next to the outputs.

Run specs: ``TOOL:SCHEME:ITERS[:LABEL]`` with TOOL ours|upstream, SCHEME W{bits}G{group}[A] (A: asym),
ITERS an integer; ``ours:W4G64:rtn`` is plain RTN (iters 0, no opt-RTN) and ITERS 0 is optimized RTN;
LABEL names a repeat of the same run (its own output directory), for ABBA timing orders.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "scripts"))
from upstream_env import MISSING, upstream_python  # noqa: E402

CORPORA = {"wikitext2": REPO.parent / "shared" / "corpora" / "wikitext2_test.txt",
           "tinyshakespeare": REPO.parent / "shared" / "corpora" / "tinyshakespeare.txt"}

UPSTREAM_CHILD = r"""
import json, sys
def main():
    from auto_round import AutoRound
    a = json.loads(sys.argv[1])
    texts = json.load(open(a["calib"]))
    kw = dict(iters=a["iters"], nsamples=a["nsamples"], seqlen=a["seqlen"], batch_size=a["batch_size"],
              dataset=texts, seed=a["seed"])
    kw.update({k: a[k] for k in ("lr", "minmax_lr") if k in a})
    if a["preset"] is None:
        kw.update(bits=a["bits"], group_size=a["group_size"], sym=a["sym"])
    if a["plain_rtn"]:
        kw["disable_opt_rtn"] = True
    ar = AutoRound(a["model"], scheme=a["preset"] or "W4A16", **kw)
    ar.quantize_and_save(a["out"], format="llm_compressor" if a["preset"] else "auto_round")
if __name__ == "__main__":
    main()
"""


FP_PRESETS = ("MXFP4", "MXFP8", "NVFP4", "MXFP4A16", "NVFP4A16", "FPW8A16", "FP8_STATIC")


def parse_run(spec: str) -> dict:
    """``ours|upstream:W4G64[A]:ITERS`` (int, A = asymmetric) or ``ours|upstream:MXFP4:ITERS`` (an FP
    preset, saved as llm_compressor); ITERS ``rtn`` is plain round-to-nearest, 0 optimized RTN.
    A fourth field labels a repeat of the same run (``ours:W2G64:50:b``), e.g. to time in ABBA order."""
    parts = spec.split(":")
    if len(parts) not in (3, 4) or (len(parts) == 4 and not re.fullmatch(r"\w+", parts[3])):
        raise SystemExit(f"bad run spec {spec!r}; expected TOOL:SCHEME:ITERS[:LABEL]")
    tool, scheme, iters = parts[:3]
    m = re.fullmatch(r"W(\d)G(-?\d+)(A?)", scheme)
    if tool not in ("ours", "upstream") or not (m or scheme in FP_PRESETS):
        raise SystemExit(f"bad run spec {spec!r}; expected ours|upstream:W4G64[A]:ITERS or ours|upstream:MXFP4:ITERS")
    plain = iters == "rtn"
    run = {"tool": tool, "scheme": scheme, "preset": None if m else scheme, "iters": 0 if plain else int(iters),
           "plain_rtn": plain, "name": spec.replace(":", "_"),
           "label": parts[3] if len(parts) == 4 else None}
    if m:
        run.update(bits=int(m.group(1)), group_size=int(m.group(2)), sym=not m.group(3))
    return run


def corpus_texts() -> list[str]:
    """Every text of signround's built-in calibration corpus, in order."""
    from signround.calib.sources import load_default
    from signround.calib.spec import DatasetSpec

    return load_default(DatasetSpec(name="signround-default"))


def calibration_texts(model: str, nsamples: int, seqlen: int) -> list[str]:
    """The first nsamples texts of the built-in corpus that have >= seqlen tokens (deterministic)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    out = []
    for text in corpus_texts():
        if len(tok(text)["input_ids"]) >= seqlen + 8:
            out.append(text)
        if len(out) == nsamples:
            break
    return out


def _hwm(pid: int) -> int:
    """VmHWM (peak RSS so far) of one process, in bytes; 0 when unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(cmd: list[str], log: Path) -> dict:
    """Run a command; return wall seconds and peak RSS of its whole process tree.

    Every 0.2 s: the process's VmHWM (its own high-water mark, so short spikes between samples
    are still counted) plus the current RSS of any child processes (compile workers and the like).
    """
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        ps = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            try:
                main = _hwm(proc.pid) or ps.memory_info().rss
                peak = max(peak, main + sum(c.memory_info().rss for c in ps.children(recursive=True)))
            except psutil.Error:
                pass
            time.sleep(0.2)
    return {"seconds": time.time() - t0, "peak_rss_mb": peak / 2**20, "returncode": proc.returncode}


def run_one(run: dict, args, calib: Path, work: Path, upy: Path | None) -> dict:
    out = work / run["name"]
    if out.exists():
        import shutil

        shutil.rmtree(out)
    extra = run_ours_args(run, args) if run["tool"] == "ours" else ""
    if run["tool"] == "ours":
        cmd = [sys.executable, "-m", "signround", "--model", args.model, "--iters", str(run["iters"]),
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch_size", str(args.batch_size),
               "--dataset", str(calib), "--output_dir", str(out)]
        if run["preset"]:
            cmd += ["--scheme", run["preset"], "--format", "llm_compressor"]
        else:
            cmd += ["--scheme", f"W{run['bits']}A16", "--group_size", str(run["group_size"])]
            if not run["sym"]:
                cmd.append("--asym")
        if run["plain_rtn"]:
            cmd.append("--disable_opt_rtn")
        cmd += shlex.split(extra)
    else:
        if upy is None:
            return {"skipped": MISSING}
        a = {**run, "model": args.model, "calib": str(calib), "out": str(out), "nsamples": args.nsamples,
             "seqlen": args.seqlen, "batch_size": args.batch_size, **upstream_options(run, args)}
        cmd = [str(upy), "-c", UPSTREAM_CHILD, json.dumps(a)]
    res = measure(cmd, work / f"{run['name']}.log")
    if extra:
        res["ours_args"] = extra
    if run["tool"] == "upstream" and args.label_args.get(run.get("label")):
        res["upstream_args"] = args.label_args[run["label"]]
    # upstream writes tuned models into a subdirectory named after the model and scheme
    found = [out] if (out / "config.json").exists() else sorted(p.parent for p in out.glob("*/config.json"))
    res["dir"] = str(found[0] if found else out)
    if res["returncode"] != 0:
        res["error"] = (work / f"{run['name']}.log").read_text()[-2000:]
    return res


def run_ours_args(run: dict, args) -> str:
    """Extra signround options for one run: ``--ours_args`` plus the ``--label_args`` of its label
    (later options win, so a label can override a shared setting such as ``--batch_size``)."""
    return " ".join(a for a in (args.ours_args, args.label_args.get(run.get("label"), "")) if a)


def parse_label_args(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        label, sep, opts = item.partition("=")
        if not sep or not re.fullmatch(r"\w+", label):
            raise SystemExit(f"bad --label_args {item!r}; expected LABEL='--option value ...'")
        out[label] = opts
    return out


def _seed(value: str) -> int:
    if not value.isdigit():
        raise ValueError(value)
    return int(value)


def _step(value: str) -> float:
    step = float(value)
    if not step > 0:
        raise ValueError(value)
    return step


# the options an upstream run's label may give it (AutoRound keyword arguments of the same names)
UPSTREAM_OPTIONS = {"--seed": _seed, "--lr": _step, "--minmax_lr": _step}


def parse_upstream_options(opts: str) -> dict:
    """``--seed N`` (default 42, both tools' default), ``--lr X``, ``--minmax_lr X`` as AutoRound
    keyword arguments; ValueError for anything else."""
    words = shlex.split(opts)
    if len(words) % 2:
        raise ValueError(opts)
    out: dict = {"seed": 42}
    for opt, value in zip(words[::2], words[1::2]):
        if opt not in UPSTREAM_OPTIONS:
            raise ValueError(opt)
        out[opt[2:]] = UPSTREAM_OPTIONS[opt](value)
    return out


def upstream_options(run: dict, args) -> dict:
    """Settings of an upstream run from its label's ``--label_args`` (checked by ``check_labels``)."""
    return parse_upstream_options(args.label_args.get(run.get("label"), ""))


def check_labels(runs: list[dict], label_args: dict[str, str]) -> None:
    """A ``--label_args`` label that no run carries would silently change nothing, and upstream runs
    understand only ``--seed N``, ``--lr X`` and ``--minmax_lr X``: refuse either before any work."""
    used = {r["label"] for r in runs}
    for label, opts in label_args.items():
        if label not in used:
            raise SystemExit(f"--label_args {label!r} matches no run in --runs; "
                             f"add ':{label}' to a run spec, e.g. ours:W4G64:50:{label}")
        upstream = any(r["tool"] == "upstream" and r["label"] == label for r in runs)
        try:
            if upstream:
                parse_upstream_options(opts)
        except ValueError:
            raise SystemExit(f"--label_args {label!r}: upstream runs take only '--seed N', '--lr X' and "
                             f"'--minmax_lr X', got {opts!r}; give the upstream run its own label") from None


def evaluate(path: str, fp: bool, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from signround import load_quantized
    from signround.eval import perplexity, read_text

    tok = AutoTokenizer.from_pretrained(args.model)
    if fp:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        model = load_quantized(path, dtype=torch.float32, backend="dequant_once")
    res = {}
    for name, corpus in CORPORA.items():
        r = perplexity(model, tok, read_text(corpus), seqlen=args.eval_seqlen, n_windows=args.eval_windows)
        res[name] = r["ppl"]
    return res


def prepare_work(args) -> tuple[Path, Path, Path | None]:
    """The model (prepared when missing), the work directory with the calibration texts both tools
    get, and upstream's interpreter (None when its venv is missing)."""
    if not Path(args.model).is_dir():
        subprocess.run([sys.executable, str(HERE / "prepare_smollm2.py"), "--out", args.model], check=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    calib = work / "calib.json"
    calib.write_text(json.dumps(calibration_texts(args.model, args.nsamples, args.seqlen)))
    return work, calib, upstream_python()


def load_results(path: Path, args) -> dict:
    """Earlier results of this work directory, with the full-precision model's perplexity."""
    results = json.loads(path.read_text()) if path.exists() else {}
    if "fp" not in results:
        results["fp"] = {"ppl": evaluate(args.model, True, args)}
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / ".bench" / "SmolLM2-135M"))
    ap.add_argument("--runs", default="ours:W4G64:50,upstream:W4G64:50,ours:W2G64:50,upstream:W2G64:50")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--eval_seqlen", type=int, default=512)
    ap.add_argument("--eval_windows", type=int, default=16)
    ap.add_argument("--work", default=str(REPO / ".bench" / "runs"))
    ap.add_argument("--eval_only", action="store_true", help="re-score existing outputs")
    ap.add_argument("--ours_args", default="", help="extra signround CLI options for every ours run, e.g. "
                    "'--lr 0.01' (label such runs: ours:W2G64:50:lr01)")
    ap.add_argument("--label_args", action="append", default=[], metavar="LABEL=ARGS",
                    help="extra signround CLI options for the runs with that label, e.g. "
                    "--label_args 'bs4=--batch_size 4' with run ours:W4G64:50:bs4 (repeatable); "
                    "upstream runs take only '--seed N', '--lr X' and '--minmax_lr X' (e.g. 's43=--seed 43' for a seed "
                    "sweep of both tools)")
    args = ap.parse_args()
    args.label_args = parse_label_args(args.label_args)
    runs = [parse_run(s) for s in args.runs.split(",") if s]
    check_labels(runs, args.label_args)
    work, calib, upy = prepare_work(args)
    results_path = work / "results.json"
    results = load_results(results_path, args)
    for run in runs:
        if not args.eval_only:
            print(f"running {run['name']} ...", flush=True)
            results[run["name"]] = {**run, **run_one(run, args, calib, work, upy)}
            results_path.write_text(json.dumps(results, indent=2))
        r = results.get(run["name"])
        if r and r.get("returncode") == 0:
            r["ppl"] = evaluate(r["dir"], False, args)
        results_path.write_text(json.dumps(results, indent=2))
        print(json.dumps({k: v for k, v in (r or {}).items() if k != "error"}), flush=True)
    fp = results["fp"]["ppl"]
    print(f"\nmodel {Path(args.model).name}; calibration {args.nsamples} x {args.seqlen} tokens, batch {args.batch_size}; "
          f"perplexity over {args.eval_windows} windows x {args.eval_seqlen} tokens")
    for label, opts in args.label_args.items():  # e.g. a batch size that overrides the one above
        print(f"runs labelled {label}: {opts}")
    print()
    print("| run | wall s | peak RSS MiB | WikiText-2 ppl | tinyshakespeare ppl |")
    print("|---|---|---|---|---|")
    print(f"| fp16 model | | | {fp['wikitext2']:.2f} | {fp['tinyshakespeare']:.2f} |")
    for run in runs:
        r = results.get(run["name"], {})
        if "ppl" not in r:
            print(f"| {run['name']} | {r.get('skipped') or r.get('error', 'failed')[-200:]} | | | |")
            continue
        print(f"| {run['name']} | {r['seconds']:.0f} | {r['peak_rss_mb']:.0f} | {r['ppl']['wikitext2']:.2f} | {r['ppl']['tinyshakespeare']:.2f} |")
    print(f"\nJSON: {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
