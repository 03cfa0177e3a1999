"""Peak memory and wall time of quantizing a 1.1B-class model: streamed vs whole-model vs upstream.

    python3 benchmarks/bench_memory.py [--work .bench/memory] [--layers 11,22] [--modes rtn,signround]
                                       [--tools ours,ours-whole,upstream]

Builds TinyLlama-1.1B-shaped Llamas with random bf16 weights (hidden 2048, intermediate 5632,
32 heads over 4 KV heads, untied head, SmolLM2's 49152-token vocabulary and tokenizer), one per
``--layers`` depth, written shard by shard (at most one ~1 GB shard in memory, never the model).
Then for each depth, mode and tool, one process quantizes it to W4A16 in the auto_round format:

- rtn: ``--iters 0 --disable_opt_rtn``; signround: ``--iters 2 --nsamples 4 --seqlen 128``;
- ours: signround's defaults (streamed, with the export self-check); ours-whole:
  ``--disable_low_cpu_mem_usage``; upstream: auto-round 0.16.1 (its own venv,
  ``scripts/upstream_env.py``) with the same settings and calibration texts.

Peak RSS is the process's maximum resident set size as GNU time reports it (%M); runs go in the
order given, tools alternating within each depth and mode. Prints a markdown table, writes JSON.
Needs ``benchmarks/prepare_smollm2.py`` first (for the tokenizer).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "scripts"))
from upstream_env import MISSING, upstream_python  # noqa: E402

SMOLLM2 = REPO / ".bench" / "SmolLM2-135M"
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
             vocab_size=49152, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2)
SHARD_BYTES = 1 << 30
MODES = {"rtn": ["--iters", "0", "--disable_opt_rtn"],
         "signround": ["--iters", "2", "--nsamples", "4", "--seqlen", "128"]}

UPSTREAM_CHILD = r"""
import json, sys
def main():
    from auto_round import AutoRound
    a = json.loads(sys.argv[1])
    kw = dict(iters=a["iters"])
    if a["iters"]:
        kw.update(nsamples=a["nsamples"], seqlen=a["seqlen"], dataset=json.load(open(a["calib"])))
    else:
        kw["disable_opt_rtn"] = True
    ar = AutoRound(a["model"], scheme="W4A16", **kw)
    ar.quantize_and_save(a["out"], format="auto_round")
if __name__ == "__main__":
    main()
"""


def build_model(out: Path, layers: int, seed: int = 0, shape: dict | None = None,
                tokenizer: Path = SMOLLM2) -> Path:
    """A random Llama checkpoint (TinyLlama's shape unless ``shape`` gives another), written one
    shard (<= 1 GB) at a time, with ``tokenizer``'s tokenizer files."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shape = shape or SHAPE
    cfg = LlamaConfig(num_hidden_layers=layers, **shape)
    cfg.dtype = "bfloat16"
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    tied = bool(shape.get("tie_word_embeddings"))
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    def tensors():
        yield "model.embed_tokens.weight", rand(v, h)
        for n in range(layers):
            p = f"model.layers.{n}."
            for name, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv, h)),
                                ("self_attn.v_proj", (kv, h)), ("self_attn.o_proj", (h, h)),
                                ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)), ("mlp.down_proj", (h, i))):
                yield p + name + ".weight", rand(*shape)
            yield p + "input_layernorm.weight", torch.ones(h, dtype=torch.bfloat16)
            yield p + "post_attention_layernorm.weight", torch.ones(h, dtype=torch.bfloat16)
        yield "model.norm.weight", torch.ones(h, dtype=torch.bfloat16)
        if not tied:
            yield "lm_head.weight", rand(v, h)

    shards: list[dict] = [{}]
    size = 0
    names: list[list[str]] = [[]]

    def flush():
        idx = len(names) - 1
        save_file(shards[-1], str(tmp / f"part-{idx}.safetensors"), metadata={"format": "pt"})
        shards[-1] = {}

    for name, t in tensors():
        nbytes = t.numel() * 2
        if size and size + nbytes > SHARD_BYTES:
            flush()
            names.append([])
            size = 0
        shards[-1][name] = t
        names[-1].append(name)
        size += nbytes
    flush()
    n = len(names)
    weight_map, total = {}, 0
    for k, group in enumerate(names):
        final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        (tmp / f"part-{k}.safetensors").rename(tmp / final)
        weight_map.update({name: final for name in group})
        total += (tmp / final).stat().st_size
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return finish_model_dir(tmp, out, cfg, tokenizer)


def finish_model_dir(tmp: Path, out: Path, cfg, tokenizer: Path = SMOLLM2) -> Path:
    """Config and ``tokenizer``'s tokenizer files into ``tmp``, then ``tmp`` renamed to ``out``
    (a build that dies leaves no directory that looks finished)."""
    cfg.save_pretrained(tmp)
    for f in tokenizer.iterdir():
        if "token" in f.name or f.name.endswith(".jinja"):
            shutil.copy(f, tmp / f.name)
    tmp.rename(out)
    return out


def calibration_texts(path: Path, n: int, seqlen: int = 128) -> Path:
    """The first ``n`` texts of signround's built-in corpus with at least ``seqlen`` tokens (both
    tools keep all of them, so they tune on the same samples)."""
    sys.path.insert(0, str(HERE))
    from bench_vs_upstream import calibration_texts as texts

    path.write_text(json.dumps(texts(str(SMOLLM2), n, seqlen)))
    return path


def timed(cmd: list[str], log: Path) -> dict:
    """Run under GNU time; wall seconds and peak RSS (MiB) of the process."""
    t0 = time.time()
    with open(log, "w") as f:
        r = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", *cmd], stdout=f, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    kb = [int(line.split()[1]) for line in log.read_text().splitlines() if line.startswith("MAXRSS_KB")]
    return {"rc": r.returncode, "seconds": round(wall, 1), "peak_rss_mib": round(kb[-1] / 1024) if kb else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=str(REPO / ".bench" / "memory"))
    ap.add_argument("--layers", default="11,22")
    ap.add_argument("--modes", default="rtn,signround")
    ap.add_argument("--tools", default="ours,ours-whole,upstream")
    a = ap.parse_args()
    if not (SMOLLM2 / "tokenizer.json").is_file():
        sys.exit("run benchmarks/prepare_smollm2.py first (the tokenizer comes from SmolLM2-135M)")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    calib = calibration_texts(work / "calib.json", 4)
    upstream = upstream_python() if "upstream" in a.tools else None
    if "upstream" in a.tools and upstream is None:
        print(f"upstream skipped: {MISSING}")
    rows = []
    for layers in map(int, a.layers.split(",")):
        model = build_model(work / f"tinyllama-{layers}L", layers)
        for mode in a.modes.split(","):
            for tool in a.tools.split(","):
                out = work / "out" / f"{layers}L-{mode}-{tool}"
                shutil.rmtree(out, ignore_errors=True)
                if tool == "upstream":
                    if upstream is None:
                        continue
                    args = {"model": str(model), "out": str(out), "iters": 2 if mode == "signround" else 0,
                            "nsamples": 4, "seqlen": 128, "calib": str(calib)}
                    cmd = [str(upstream), "-c", UPSTREAM_CHILD, json.dumps(args)]
                else:
                    data = ["--dataset", str(calib)] if mode == "signround" else []
                    cmd = [sys.executable, "-m", "signround.cli", "--model", str(model), "--scheme", "W4A16",
                           *MODES[mode], *data, "--output_dir", str(out)]
                    if tool == "ours-whole":
                        cmd.append("--disable_low_cpu_mem_usage")
                res = timed(cmd, work / f"{layers}L-{mode}-{tool}.log")
                rows.append({"layers": layers, "mode": mode, "tool": tool, **res})
                print(json.dumps(rows[-1]), flush=True)
                shutil.rmtree(out, ignore_errors=True)
    print("\n| layers | mode | tool | wall s | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        status = "" if r["rc"] == 0 else f" (exit {r['rc']})"
        print(f"| {r['layers']} | {r['mode']} | {r['tool']}{status} | {r['seconds']} | {r['peak_rss_mib']} |")
    (work / "memory.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nJSON: {work / 'memory.json'}")


if __name__ == "__main__":
    main()
