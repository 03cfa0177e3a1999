"""Importance-weighted weight error of GGUF files against their f16 source, per tensor kind and type.

    python3 benchmarks/gguf_weight_error.py --f16 .bench/gguf_cmp/f16.gguf --imatrix .bench/gguf_cmp/imatrix.gguf \\
        FILE.gguf [FILE.gguf ...]

For every 2-D tensor the imatrix covers: sum_ij imp_j (w_ij - w'_ij)^2 / sum_ij imp_j w_ij^2, with
imp = llama-imatrix's mean squared activation per input column (the measure llama.cpp's own
quantizer minimizes), summed over the layers of each (tensor kind, block type). Tells which
tensors a file loses on against another at the same file type; perplexity remains the judge.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
from gguf import GGUFReader, dequantize


def load(path: str) -> dict[str, tuple[str, np.ndarray]]:
    out = {}
    for t in GGUFReader(path).tensors:
        if len(t.shape) == 2:
            out[t.name] = (t.tensor_type.name, dequantize(t.data, t.tensor_type).reshape(-1, int(t.shape[0])))
    return out


def imatrix(path: str) -> dict[str, np.ndarray]:
    raw = {t.name: np.array(t.data, dtype=np.float64) for t in GGUFReader(path).tensors}
    return {n[: -len(".in_sum2")]: v / raw[n[: -len(".in_sum2")] + ".counts"][0]
            for n, v in raw.items() if n.endswith(".in_sum2")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--f16", required=True)
    ap.add_argument("--imatrix", required=True)
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    ref, imp = load(args.f16), imatrix(args.imatrix)
    quant = [load(f) for f in args.files]
    total: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0] * len(quant))
    for name, (_, w) in ref.items():
        if name not in imp:
            continue
        wi = imp[name][None, :]
        den = float((w.astype(np.float64) ** 2 * wi).sum())
        kind = name.split(".")[-2]
        for i, q in enumerate(quant):
            qtype, wq = q[name]
            total[(kind, qtype)][i] += float(((wq - w) ** 2 * wi).sum()) / den
    print("| tensor | type | " + " | ".join(args.files) + " |")
    print("|---|---|" + "---|" * len(quant))
    for (kind, qtype), v in sorted(total.items()):
        print(f"| {kind} | {qtype} | " + " | ".join(f"{x:.5f}" for x in v) + " |")


if __name__ == "__main__":
    main()
