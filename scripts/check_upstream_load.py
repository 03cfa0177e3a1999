"""Check that upstream auto-round loads our auto_round (integer and floating-point), auto_gptq and
auto_awq files with our logits.

Quantizes a tiny random Llama (sizes upstream kernels accept) with several schemes, saves each in the
auto_round format, computes logits with ``signround.load_quantized``, then loads the same directory in
the upstream venv with ``AutoModelForCausalLM.from_pretrained`` and compares.

    python3 scripts/check_upstream_load.py            # skips (exit 0) when upstream is absent
    python3 scripts/check_upstream_load.py --setup    # create .venv-upstream first
    python3 scripts/check_upstream_load.py --model .bench/SmolLM2-135M   # a real model, group 64

With ``--model`` the cases are the auto_gptq / auto_awq / auto_round files of that model at group 64
(optimized RTN, the numbers a user would ship) and the token ids are real text.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from upstream_env import MISSING, setup_upstream, upstream_python  # noqa: E402

CASES = {
    "auto_gptq: W4 sym g32": dict(scheme="W4A16", group_size=32, format="auto_gptq"),
    "auto_gptq: W2 sym g32 + 8-bit down_proj + fp v_proj (dynamic)": dict(
        scheme="W2A16G32", format="auto_gptq", layer_config={"down_proj": {"bits": 8}, "v_proj": {"bits": 16}}),
    "auto_awq: W4 asym g64": dict(scheme="W4A16", group_size=64, sym=False, format="auto_awq"),
    "W4 sym g32 (auto_gptq packing)": dict(scheme="W4A16", group_size=32),
    "W4 asym g64 (auto_awq packing)": dict(scheme="W4A16", group_size=64, sym=False),
    "W2 sym g32": dict(scheme="W2A16G32"),
    "W3 sym g128": dict(scheme="W3A16"),
    "W8 sym per-channel": dict(scheme="W8A16", group_size=-1),
    "mixed 4/8/16 + asym 2 (auto_round packing)": dict(
        scheme="W4A16", group_size=32,
        layer_config={"down_proj": {"bits": 8}, "v_proj": {"bits": 16},
                      r"layers\.1\.self_attn\.q_proj": {"bits": 2, "sym": False}},
    ),
    # floating-point schemes: compressed-tensors tensors under an auto-round config
    "MXFP4 (auto_round:llm_compressor)": dict(scheme="MXFP4"),
    "MXFP8, rceil activations (auto_round:llm_compressor)": dict(scheme="MXFP8"),
    "NVFP4 (auto_round:llm_compressor)": dict(scheme="NVFP4"),
    "FP8_STATIC (auto_round:fp8_static)": dict(scheme="FP8_STATIC"),
    # per-expert tensors, the routers listed as kept (upstream would take them for quantized otherwise)
    "Qwen3-MoE W4 sym g32, every expert (auto_round)": dict(scheme="W4A16", group_size=32, model="qwen3_moe"),
    # a vision-language model: the language model quantized, the vision tower kept exact
    "LLaVA W4 sym g32, language model (auto_round)": dict(scheme="W4A16", group_size=32, model="llava"),
}

# Real-model cases (``--model``): group 64, tuned with optimized RTN.
MODEL_CASES = {
    "auto_gptq: W4 sym g64": dict(scheme="W4A16", group_size=64, format="auto_gptq"),
    "auto_gptq: W2 sym g64": dict(scheme="W2A16", group_size=64, format="auto_gptq"),
    "auto_awq: W4 asym g64": dict(scheme="W4A16", group_size=64, sym=False, format="auto_awq"),
    "W4 sym g64 (auto_round, auto_gptq packing)": dict(scheme="W4A16", group_size=64),
}

UPSTREAM_CHILD = r"""
import glob, sys, json, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
ids = load_file(sys.argv[1])["ids"]
out = {}
for i, d in enumerate(json.loads(sys.argv[3])):
    method = json.load(open(d + "/config.json"))["quantization_config"]["quant_method"]
    kw = {}
    if method != "auto-round":  # GPTQ / AWQ files go through auto-round's converter
        from transformers import AutoRoundConfig
        kw["quantization_config"] = AutoRoundConfig()
    vlm = "vision_config" in json.load(open(d + "/config.json"))
    cls = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
    m = cls.from_pretrained(d, device_map="cpu", dtype=torch.float32, **kw)
    dtype = str(m.dtype).replace("torch.", "")
    fp8 = [(n, x) for n, x in m.named_modules() if type(x).__name__ == "WeightFP8ActFP8StaticQuantLinear"]
    if fp8:  # these layers hold their scales and compute in bfloat16 whatever the model's dtype
        with torch.no_grad():
            out[f"bf16case{i}"] = m(ids).logits.float().contiguous()
        sd = {}
        for f in glob.glob(d + "/*.safetensors"):
            sd.update(load_file(f))
        for n, x in fp8:  # the same layers with the file's float32 scales, in float32
            x.dtype, x.weight_scale, x.input_scale = torch.float32, sd[n + ".weight_scale"].float(), sd[n + ".input_scale"].float()
        dtype = "bfloat16 layers (float32 rerun)"
    with torch.no_grad():
        out[f"case{i}"] = m(ids).logits.float().contiguous()
    print("DTYPE", i, dtype.replace(" ", "_"))
save_file(out, sys.argv[2])
"""


def build_model(path: Path, arch: str = "llama") -> None:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, LlamaConfig, LlavaConfig, Qwen3MoeConfig

    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "qwen3_moe":
        cfg = Qwen3MoeConfig(intermediate_size=256, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                             head_dim=32, **common)
    elif arch == "llava":
        cfg = LlavaConfig(text_config=dict(model_type="llama", intermediate_size=256, **common),
                          vision_config=dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14),
                          image_token_index=255)
    else:
        cfg = LlamaConfig(intermediate_size=256, **common)
    model = (AutoModelForImageTextToText if arch == "llava" else AutoModelForCausalLM).from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:  # 3-D: fused experts
                p.normal_(0, 0.1)
    model.save_pretrained(path)


def real_ids(model_dir: Path) -> torch.Tensor:
    """Two rows of 64 tokens of WikiText-2 (text the model was not calibrated on)."""
    from transformers import AutoTokenizer

    from signround.eval.perplexity import read_text

    text = read_text(Path(__file__).resolve().parents[2] / "shared" / "corpora" / "wikitext2_test.txt")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(text[:20000], return_tensors="pt").input_ids[0]
    return ids[1000:1128].reshape(2, 64)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--setup", action="store_true", help="create the upstream venv first")
    ap.add_argument("--ensure", action="store_true",
                    help="create the upstream venv only when it is missing; skip (exit 0, reason printed) when it "
                         "cannot be installed (what CI runs)")
    ap.add_argument("--model", help="a Hugging Face model directory to check instead of the tiny random Llama")
    args = ap.parse_args()
    py = setup_upstream() if args.setup else upstream_python()
    if py is None and args.ensure:
        try:
            py = setup_upstream()
        except (subprocess.CalledProcessError, OSError) as e:
            print(f"SKIP: upstream auto-round could not be installed here ({e}); nothing was checked")
            return 0
    if py is None:
        print(f"SKIP: {MISSING}")
        return 0

    from signround import AutoRound, load_quantized

    work = Path(tempfile.mkdtemp(prefix="signround-upstream-"))
    if args.model:
        src, cases = Path(args.model), MODEL_CASES
        if not (src / "config.json").is_file():
            print(f"FAIL: {src} is not a model directory (no config.json)")
            return 1
        ids = real_ids(src)
        tune = dict(iters=0, nsamples=16, seqlen=256)
    else:
        src, cases = work / "fp", CASES
        build_model(src)
        ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
        # token ids as calibration data (the random model has no tokenizer): NVFP4 and FP8_STATIC
        # measure activation ranges on it
        g = torch.Generator().manual_seed(2)
        tune = dict(iters=0, disable_opt_rtn=True, nsamples=4, seqlen=32,
                    dataset=[torch.randint(0, 256, (32,), generator=g).tolist() for _ in range(4)])
    save_file({"ids": ids}, str(work / "ids.safetensors"))
    dirs, ours = [], []
    for i, kw in enumerate(cases.values()):
        out = work / f"case{i}"
        kw = dict(kw)
        fmt = kw.pop("format", "auto_round")
        arch = kw.pop("model", None)  # a case on its own tiny architecture
        src_i = src if arch is None else work / arch
        if arch is not None and not src_i.is_dir():
            build_model(src_i, arch)
        AutoRound(str(src_i), **tune, **kw).quantize_and_save(out, format=fmt)
        with torch.no_grad():
            ours.append(load_quantized(str(out), dtype=torch.float32)(ids).logits.float())
        dirs.append(str(out))
    res = subprocess.run([str(py), "-c", UPSTREAM_CHILD, str(work / "ids.safetensors"),
                          str(work / "upstream.safetensors"), json.dumps(dirs)], capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stdout[-3000:], res.stderr[-6000:])
        print("FAIL: upstream could not load our files")
        return 1
    theirs = load_file(str(work / "upstream.safetensors"))
    dtypes = {int(ln.split()[1]): ln.split()[2] for ln in res.stdout.splitlines() if ln.startswith("DTYPE")}
    version = subprocess.run([str(py), "-c", "import auto_round, transformers; print(auto_round.__version__, transformers.__version__)"],
                             capture_output=True, text=True).stdout.split()
    print(f"upstream auto-round {version[0]} / transformers {version[1]} vs signround load_quantized")
    print("| case | packing | upstream compute dtype | max abs logit diff | max abs logit |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for i, name in enumerate(cases):
        qc = json.loads((Path(dirs[i]) / "config.json").read_text())["quantization_config"]
        packing = qc.get("packing_format", qc["quant_method"])
        diff = (theirs[f"case{i}"] - ours[i]).abs().max().item()
        worst = max(worst, diff / max(ours[i].abs().max().item(), 1e-6))
        note = ""
        if f"bf16case{i}" in theirs:
            note = f" (upstream's own bfloat16 layers: {(theirs[f'bf16case{i}'] - ours[i]).abs().max().item():.2e})"
        print(f"| {name} | {packing} | {dtypes.get(i, '?').replace('_', ' ')} | {diff:.2e}{note} | "
              f"{ours[i].abs().max().item():.2f} |")
    # Upstream forces some paths (3-bit on CPU) to fp16; a packing error would be O(1), not 1e-3.
    ok = worst < 1e-2
    print("PASS" if ok else "FAIL", f"(worst relative diff {worst:.2e})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
