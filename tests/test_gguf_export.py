"""GGUF export: files that transformers loads (gguf_file=) with the logits of our qdq model."""

import pytest
import torch

from signround import AutoRound
from signround.cli import main
from signround.errors import ConfigError, ExportError
from signround.schemes import resolve_scheme

pytest.importorskip("gguf", reason="pip install gguf (the gguf extra)")

TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]


def _logits(model, vocab=500):
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("ggml_type", TYPES)
def test_gguf_loads_in_transformers_with_our_logits(stories_dir, tmp_path, ggml_type):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ar = AutoRound(str(stories_dir), scheme=f"GGUF:{ggml_type.upper()}", iters=0, nsamples=8, seqlen=64,
                   batch_size=4)
    model, _ = ar.quantize()
    # down_proj has 172 inputs: ggml blocks of 32 do not divide it, so it stays in floating point
    assert not ar.plan.specs["model.layers.0.mlp.down_proj"].quantized
    out = ar.save_quantized(tmp_path / "o", format=f"gguf:{ggml_type}", inplace=False)
    files = [p.name for p in out.iterdir()]
    assert files == [f"{stories_dir.name}-{ggml_type}.gguf"]
    hf = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=files[0], dtype=torch.float32)
    assert torch.allclose(_logits(hf), _logits(model), atol=1e-5, rtol=1e-5)
    tok = AutoTokenizer.from_pretrained(str(out), gguf_file=files[0])
    text = "Once upon a time, there was a little girl named Lily. She had 12 red apples!"
    assert tok(text)["input_ids"] == ar.tokenizer(text)["input_ids"]


def test_cli_gguf_format_implies_the_scheme(stories_dir, tmp_path):
    out = tmp_path / "o"
    rc = main(["--model", str(stories_dir), "--iters", "0", "--disable_opt_rtn", "--format", "gguf:q4_0",
               "--output_dir", str(out)])
    assert rc == 0
    assert [p.suffix for p in out.iterdir()] == [".gguf"]


def test_gguf_refusals_before_tuning(stories_dir, tiny_model_dir, tmp_path):
    ar = AutoRound(str(stories_dir), scheme="W4A16G32", iters=0, disable_opt_rtn=True)
    with pytest.raises(ExportError, match="--scheme GGUF:Q4_0"):
        ar.quantize_and_save(tmp_path / "a", format="gguf:q4_0")
    assert ar.result is None and not (tmp_path / "a").exists()
    ar = AutoRound(str(tiny_model_dir("gpt2")), scheme="GGUF:Q4_0", iters=0, disable_opt_rtn=True)
    with pytest.raises(ExportError, match="supports the model families"):
        ar.quantize_and_save(tmp_path / "b", format="gguf:q4_0")
    assert ar.result is None
    with pytest.raises(ConfigError, match="GGUF q4_0 is 4-bit"):
        resolve_scheme("GGUF:Q4_0", bits=8)
