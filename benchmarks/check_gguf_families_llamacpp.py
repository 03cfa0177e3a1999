"""llama.cpp computes what our model computes, for every family in the GGUF table (MoE included:
Qwen3-MoE and Mixtral with 8 experts, stacked expert tensors).

    python3 benchmarks/check_gguf_families_llamacpp.py [--families llama,gemma3] [--work DIR]

For each family: a random 8-layer model with stories260K's tokenizer (tests/tiny_models.wide_model,
weights scaled up so its next-token distributions are peaked and any difference in how the file is
read shows in the perplexity), quantized to GGUF Q4_K_M (optimized RTN) and written as .gguf.
Then `llama-perplexity` (built by build_llamacpp.py) scores a text, and the in-memory quantized
model scores the same windows in Python the way llama-perplexity does (context --ctx, BOS first,
the second half of each window scored). A wrong tensor name, norm, rope layout or attention
pattern moves the perplexity far more than llama.cpp's 8-bit activation rounding does; the
unquantized model's perplexity is printed as the scale of a small change (quantization itself).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))
from bench_gguf_llamacpp import perplexity  # noqa: E402
from build_llamacpp import ensure_llamacpp  # noqa: E402
from tiny_models import WIDE_FAMILIES, WIDE_MOE, wide_model  # noqa: E402

STORIES = REPO.parent / "shared" / "models" / "stories260K"


def python_perplexity(model, ids: list[int], bos: int, ctx: int, chunks: int) -> float:
    """llama-perplexity's windows: chunk i is ids[i*ctx:(i+1)*ctx] with its first token set to BOS;
    logits at positions ctx/2 .. ctx-2 predict the next token."""
    nll, count, first = 0.0, 0, ctx // 2
    for i in range(chunks):
        window = torch.tensor(ids[i * ctx:(i + 1) * ctx])
        targets = window[first + 1:].clone()
        window[0] = bos
        with torch.no_grad():
            logp = torch.log_softmax(model(window[None]).logits[0, first:ctx - 1].double(), -1)
        nll -= logp.gather(1, targets[:, None]).sum().item()
        count += targets.numel()
    return math.exp(nll / count)


def main() -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from signround import AutoRound

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(WIDE_FAMILIES))
    ap.add_argument("--work", default=str(REPO / ".bench" / "gguf_families"))
    ap.add_argument("--text", default=str(REPO.parent / "shared" / "corpora" / "tinyshakespeare.txt"))
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--std", type=float, default=0.1, help="weight scale of the random models")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bin_dir = ensure_llamacpp()
    text = work / "text.txt"
    text.write_text(Path(args.text).read_text()[:12000])
    tok = AutoTokenizer.from_pretrained(str(STORIES))
    ids = tok(text.read_text())["input_ids"]
    rows = []
    for family in args.families.split(","):
        # a neutral directory name: it becomes general.name, and llama.cpp gives models named "phi3"
        # special-token handling that looks up Phi-3's own tokens (absent from stories260K's vocab)
        src = wide_model(work, STORIES, tied=family == "gemma3", family=family, std=args.std, name=f"random-{len(rows)}")
        # MoE: the in-memory quantized model is the reference (transformers cannot read Mixtral's GGUF back)
        ar = AutoRound(str(src), scheme="GGUF:Q4_K_M", iters=0, nsamples=4, seqlen=32, batch_size=4,
                       low_cpu_mem_usage=family not in WIDE_MOE)
        model, out = ar.quantize_and_save(work / f"{family}-q4_k_m", format="gguf:q4_k_m")
        (gguf,) = out.glob("*.gguf")
        ours = python_perplexity(model, ids, tok.bos_token_id, args.ctx, args.chunks)
        fp = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
        fp_ppl = python_perplexity(fp, ids, tok.bos_token_id, args.ctx, args.chunks)
        lcpp, err = perplexity(bin_dir, gguf, text, args.ctx, args.chunks, work / f"ppl_{family}.log")
        rows.append({"family": family, "fp_python": fp_ppl, "ours_python": ours, "llama_cpp": lcpp, "llama_cpp_err": err,
                     "rel_diff": abs(lcpp - ours) / ours})
        print(f"{family}: fp {fp_ppl:.3f}  python {ours:.3f}  llama.cpp {lcpp:.3f} +/- {err:.3f}  rel diff {rows[-1]['rel_diff']:.2%}",
              flush=True)
    (work / "results.json").write_text(json.dumps(rows, indent=1))
    print("\n| family | fp model (Python) | our Q4_K_M model (Python) | our .gguf in llama.cpp | relative difference |"
          "\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['fp_python']:.3f} | {r['ours_python']:.3f} | {r['llama_cpp']:.3f} ± {r['llama_cpp_err']:.3f} | "
              f"{r['rel_diff']:.2%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
