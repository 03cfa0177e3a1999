"""Vision-language models: the language model's blocks quantized, the vision tower and projector
kept byte for byte (or rounded with --quant_nontext_module), processor files copied, the output
loading in transformers' AutoModelForImageTextToText and in our loader and running on an image."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText

from signround import AutoRound, load_quantized
from signround.errors import ConfigError, ExportError
from signround.model.vlm import is_multimodal
from conftest import STORIES
from test_streaming import FAST, run_both
from tiny_models import VLM_ARCHS, build_tiny_vlm, image_inputs

# names of the vision tower and projector tensors in the checkpoints transformers writes
NONTEXT = ("vision_tower.", "multi_modal_projector.", "visual.")
TEXT_IDS = [torch.randint(3, 500, (16,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(4)]
QUICK = dict(scheme="W4A16", group_size=16, dataset=TEXT_IDS, **FAST)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = build_tiny_vlm(arch, tmp_path_factory.mktemp(f"vlm-{arch}"), STORIES)
        return cache[arch]

    return get


def tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def is_nontext(key: str) -> bool:
    return any(key.startswith(p) or f".{p}" in key for p in NONTEXT)


@torch.no_grad()
def image_logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits.float()


@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_language_model_quantized_vision_tower_kept_and_loads_on_an_image(arch, vlm_dir, tmp_path):
    src = vlm_dir(arch)
    ar = AutoRound(str(src), iters=2, **QUICK)
    assert ar.streamed and is_multimodal(ar._config)
    assert ar.plan.block_names == ["model.language_model.layers.0", "model.language_model.layers.1"]
    assert len(ar.plan.quantized) == 14 and ar.plan.nontext == []
    out = tmp_path / "q"
    ar.quantize_and_save(out, format="auto_round,llm_compressor,fake")

    before = tensors(src)
    vision = [k for k in before if is_nontext(k)]
    assert vision
    for fmt in ("auto_round", "llm_compressor", "fake"):
        after = tensors(out / fmt)
        for k in vision:  # byte for byte
            assert k in after and after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), (fmt, k)
        report = json.loads((out / fmt / "report.json").read_text())
        assert report["self_check"][0]["status"] == "passed"
        # the processor's files come along (LLaVA's processor; the others' image processor)
        wanted = ["processor_config.json", "chat_template.jinja"] if arch == "llava" else ["preprocessor_config.json"]
        assert all((out / fmt / f).is_file() for f in wanted), fmt
    qc = json.loads((out / "auto_round" / "config.json").read_text())["quantization_config"]
    assert qc["block_name_to_quantize"] == "model.language_model.layers"

    inputs = image_inputs(arch, src)
    ours = load_quantized(str(out / "auto_round"), dtype=torch.float32)
    assert type(ours).__name__.endswith("ForConditionalGeneration")
    theirs = AutoModelForImageTextToText.from_pretrained(str(out / "llm_compressor"), dtype=torch.float32).eval()
    fake = AutoModelForImageTextToText.from_pretrained(str(out / "fake"), dtype=torch.float32).eval()
    ref = image_logits(ours, inputs)
    torch.testing.assert_close(image_logits(theirs, inputs), ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(image_logits(fake, inputs), ref, rtol=0, atol=1e-4)
    # the image changes the answer: the vision tower ran
    text_only = {k: v for k, v in inputs.items() if k == "input_ids"}
    assert (image_logits(ours, text_only) - ref).abs().max() > 1e-2
    # and the language model is quantized: logits differ from the original model's
    orig = AutoModelForImageTextToText.from_pretrained(str(src), dtype=torch.float32).eval()
    assert (image_logits(orig, inputs) - ref).abs().max() > 1e-3


def test_streamed_and_whole_vlm_runs_write_identical_files(vlm_dir, tmp_path):
    run_both(vlm_dir("qwen2_vl"), tmp_path, "auto_round,auto_gptq,auto_awq", iters=2, **QUICK)


def test_quant_nontext_module_rounds_the_vision_tower_and_the_loaded_model_computes_it(vlm_dir, tmp_path):
    src = vlm_dir("llava")
    ar = AutoRound(str(src), iters=2, quant_nontext_module=True, low_cpu_mem_usage=False, **QUICK)
    assert len(ar.plan.nontext) == 14  # 2 CLIP layers x 6 Linear + the projector's 2
    assert all(n.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for n in ar.plan.nontext)
    model, _ = ar.quantize()
    inputs = image_inputs("llava", src)
    ref = image_logits(model, inputs)
    out = tmp_path / "q"
    ar.save_quantized(out, format="auto_round", inplace=False)
    stored = tensors(out)
    assert "vision_tower.encoder.layers.0.mlp.fc1.qweight" in stored
    assert "multi_modal_projector.linear_1.qweight" in stored
    loaded = load_quantized(str(out), dtype=torch.float32)
    torch.testing.assert_close(image_logits(loaded, inputs), ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("fmt", ["auto_gptq", "auto_awq", "gguf:q4_0"])
def test_formats_that_cannot_hold_a_quantized_vision_tower_are_named(fmt, vlm_dir, tmp_path):
    ar = AutoRound(str(vlm_dir("llava")), iters=0, quant_nontext_module=True, scheme="W4A16", group_size=16)
    with pytest.raises(ExportError, match=fmt.split(":")[0] + "|GGUF") as e:
        ar.quantize_and_save(tmp_path / "q", format=fmt)
    assert "auto_round" in str(e.value)
    assert not (tmp_path / "q").exists()


def test_awq_and_gptq_files_of_a_vlm_keep_loaders_off_the_vision_tower(vlm_dir, tmp_path):
    ar = AutoRound(str(vlm_dir("llava")), iters=0, disable_opt_rtn=True, scheme="W4A16", group_size=16)
    ar.quantize_and_save(tmp_path / "q", format="auto_awq,auto_gptq")
    awq = json.loads((tmp_path / "q" / "auto_awq" / "config.json").read_text())["quantization_config"]
    assert {"vision_tower", "multi_modal_projector"} <= set(awq["modules_to_not_convert"])
    gptq = json.loads((tmp_path / "q" / "auto_gptq" / "config.json").read_text())["quantization_config"]
    assert gptq["block_name_to_quantize"] == "model.language_model.layers"


def test_vlm_options_on_a_text_model_are_refused(tiny_model_dir):
    with pytest.raises(ConfigError, match="drop --mllm"):
        AutoRound(str(tiny_model_dir("llama")), iters=0, mllm=True)
    with pytest.raises(ConfigError, match="no vision tower"):
        AutoRound(str(tiny_model_dir("llama")), iters=0, quant_nontext_module=True)


def test_cli_quantizes_a_vlm(vlm_dir, tmp_path):
    from signround.cli import main

    out = tmp_path / "q"
    assert main(["--model", str(vlm_dir("gemma3_vlm")), "--iters", "0", "--scheme", "W4A16", "--group_size", "16",
                 "--nsamples", "4", "--seqlen", "16", "--output_dir", str(out), "--quiet"]) == 0
    model = load_quantized(str(out), dtype=torch.float32)
    assert image_logits(model, image_inputs("gemma3_vlm", vlm_dir("gemma3_vlm"))).isfinite().all()
