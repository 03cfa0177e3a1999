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
        # the processor's files come along (Qwen2-VL's image processor alone: see tiny_models)
        wanted = (["preprocessor_config.json"] if arch in ("qwen2_vl", "qwen3_vl")
                  else ["processor_config.json", "chat_template.jinja"])
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


# -- image-text calibration ---------------------------------------------------------------------
def image_text_data(root: Path, n: int = 6) -> tuple[Path, Path]:
    """A LLaVA-style conversation file and its image folder; images of 28x28, 56x56 and 28x56 pixels
    (Qwen2-VL gives them 1, 4 and 2 image tokens)."""
    import numpy as np
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        h, w = [(28, 28), (56, 56), (28, 56)][i % 3]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
        records.append({"id": str(i), "image": f"coco/train2017/{i:03d}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?" if i % 2 else "Tell me about it <image>"},
            {"from": "gpt", "value": "Once upon a time there was a little girl named Lily. " * (1 + i % 2)}]})
    data = root / "conversation.json"
    data.write_text(json.dumps(records))
    text = root / "stories.txt"
    text.write_text("\n".join(["Tom and Sue went to the park to play with a big red ball all day long."] * 4))
    return data, images


def _processor(arch: str, src: Path):
    from tiny_models import vlm_processor

    return vlm_processor(arch, src) if arch in ("qwen2_vl", "qwen3_vl") else None  # the others' AutoProcessor loads


@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_image_text_calibration_feeds_each_block_what_the_models_forward_gives_it(arch, vlm_dir, tmp_path):
    """Image-text samples (images of three sizes, a text dataset beside) reach the blocks as the model's
    own forward gives them: the inputs of block 0 and block 1 (block 0 run on the captured arguments,
    in batches of two samples whose arguments differ: Qwen2-VL's M-RoPE positions, Gemma 3's image
    masks, Qwen3-VL's deepstack features added after the block) equal what the model's forward passes
    each block, sample by sample."""
    from signround.model.capture import block_forward, capture_block_inputs
    from signround.model.samples import AFTER, PerSample

    src = vlm_dir(arch)
    data, images = image_text_data(tmp_path)
    ar = AutoRound(str(src), iters=2, scheme="W4A16", group_size=16, nsamples=6, seqlen=40, batch_size=2,
                   dataset=f"{data},{tmp_path / 'stories.txt'}:concat=True:num=2", extra_data_dir=str(images),
                   processor=_processor(arch, src))
    ids, extras = ar.calibration_ids(), ar._calib_extras
    assert ids.shape == (6, 40) and sum(bool(e) for e in extras) == 4 and all("pixel_values" in e for e in extras if e)
    model = AutoModelForImageTextToText.from_pretrained(str(src), dtype=torch.float32).eval()
    blocks = ["model.language_model.layers.0", "model.language_model.layers.1"]
    cap = capture_block_inputs(model, blocks, ids, 2, extras=extras)
    args = cap.kwargs[blocks[0]]
    per_sample = [x for k, v in args.items() if k != AFTER for x in (v if isinstance(v, tuple) else (v,))
                  if isinstance(x, PerSample)]
    if arch != "llava":  # LLaVA's blocks get plain causal masks and positions
        assert per_sample, "the samples' block arguments should differ"
    assert (AFTER in args) == (arch == "qwen3_vl")
    # stored once per distinct value: Gemma 3's 4-token images all open the prompt (one mask for them,
    # one for text); Qwen2-VL's and Qwen3-VL's positions follow the image's size (three sizes, and text)
    assert all(p.distinct() <= {"gemma3_vlm": 2, "qwen2_vl": 4, "qwen3_vl": 4}[arch] for p in per_sample)
    block0, block1 = (model.get_submodule(b) for b in blocks)
    seen: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda _m, a, kw: seen.append(a[0] if a else kw["hidden_states"]),
                                         with_kwargs=True) for b in (block0, block1)]
    with torch.no_grad():
        out = torch.cat([block_forward(block0, cap.hidden[i:i + 2], args, slice(i, i + 2)) for i in range(0, 6, 2)])
        for i in range(6):
            seen.clear()
            model(input_ids=ids[i:i + 1], **extras[i])
            torch.testing.assert_close(cap.hidden[i:i + 1], seen[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out[i:i + 1], seen[1], rtol=1e-4, atol=1e-4)
            if extras[i]:  # the image reached the language model
                seen.clear()
                model(input_ids=ids[i:i + 1])
                assert (seen[0] - cap.hidden[i:i + 1]).abs().max() > 1e-3
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl"])
def test_image_text_calibration_quantizes_and_resumes_to_the_same_files(arch, vlm_dir, tmp_path, monkeypatch):
    """SignRound on image-text samples (Qwen3-VL: with its deepstack features between blocks): tuned on
    them (other files than text calibration gives), the self-check passes, the output runs on an image;
    a run stopped after block 1 resumes to the same files."""
    from signround.resume import RunCheckpoint
    from test_streaming import same_files
    from tiny_models import vlm_processor

    src = vlm_dir(arch)
    data, images = image_text_data(tmp_path)
    kw = dict(iters=3, scheme="W4A16", group_size=16, nsamples=4, seqlen=40, batch_size=2, dataset=str(data),
              extra_data_dir=str(images))
    AutoRound(str(src), processor=vlm_processor(arch, src), **kw).quantize_and_save(tmp_path / "ref", format="auto_round")
    report = json.loads((tmp_path / "ref" / "report.json").read_text())
    assert report["self_check"][0]["status"] == "passed"
    text = dict(kw, dataset=TEXT_IDS * 2, seqlen=16)
    text.pop("extra_data_dir")
    AutoRound(str(src), **text).quantize_and_save(tmp_path / "text", format="auto_round")
    assert tensors(tmp_path / "ref") .keys() == tensors(tmp_path / "text").keys()
    assert any(not torch.equal(v, tensors(tmp_path / "text")[k]) for k, v in tensors(tmp_path / "ref").items())
    ours = load_quantized(str(tmp_path / "ref"), dtype=torch.float32)
    assert torch.isfinite(image_logits(ours, image_inputs(arch, src))).all()

    save = RunCheckpoint.save

    def crash_after_one(self, point):
        save(self, point)
        if point.blocks_done == 1:
            raise RuntimeError("simulated crash")

    out = tmp_path / "out"
    monkeypatch.setattr(RunCheckpoint, "save", crash_after_one)
    with pytest.raises(RuntimeError, match="simulated crash"):
        AutoRound(str(src), processor=vlm_processor(arch, src), **kw).quantize_and_save(out, format="auto_round")
    monkeypatch.setattr(RunCheckpoint, "save", save)
    ar = AutoRound(str(src), processor=vlm_processor(arch, src), **kw)
    ar.quantize_and_save(out, format="auto_round", resume=True)
    assert ar.result.resumed_from == 1
    same_files(out, tmp_path / "ref")


def test_cli_calibrates_a_vlm_on_images(vlm_dir, tmp_path):
    """--dataset FILE --extra_data_dir DIR: the processor saved with the model makes the samples."""
    from signround.cli import main

    src = vlm_dir("gemma3_vlm")
    data, images = image_text_data(tmp_path)
    out = tmp_path / "q"
    main([str(src), "--scheme", "W4A16", "--group_size", "16", "--iters", "2", "--nsamples", "4", "--seqlen", "40",
          "--batch_size", "2", "--dataset", str(data), "--extra_data_dir", str(images), "--output_dir", str(out),
          "--format", "auto_round"])
    report = json.loads((out / "report.json").read_text())
    assert report["self_check"][0]["status"] == "passed"


def test_image_text_data_bad_inputs_are_named(vlm_dir, tiny_model_dir, tmp_path):
    from signround.errors import CalibrationError

    data, images = image_text_data(tmp_path)
    src = vlm_dir("llava")
    with pytest.raises(ConfigError, match="no vision tower"):  # a text model
        AutoRound(str(tiny_model_dir("llama")), dataset=str(data), extra_data_dir=str(images), **FAST)
    with pytest.raises(CalibrationError, match="--extra_data_dir"):  # images not where the records say
        AutoRound(str(src), dataset=str(data), **FAST)
    with pytest.raises(CalibrationError, match="not a folder"):
        AutoRound(str(src), dataset=str(data), extra_data_dir=str(tmp_path / "nowhere"), **FAST)
    with pytest.raises(CalibrationError, match="conversation_58k.json"):  # upstream's name: no download
        AutoRound(str(src), dataset="liuhaotian/llava_conv_58k", **FAST)
    with pytest.raises(CalibrationError, match="raise --seqlen"):  # image tokens past seqlen
        AutoRound(str(src), dataset=str(data), extra_data_dir=str(images), **dict(FAST, seqlen=3))
    with pytest.raises(ConfigError, match="torchvision"):  # Qwen2-VL's AutoProcessor wants a video processor
        AutoRound(str(vlm_dir("qwen2_vl")), dataset=str(data), extra_data_dir=str(images), **FAST)


def test_image_text_data_skips_records_whose_image_is_missing(vlm_dir, tmp_path, caplog):
    """A partial image folder (a subset of COCO) is enough: records without their image are skipped and
    counted."""
    import logging

    data, images = image_text_data(tmp_path)
    for i in (0, 3):
        (images / f"{i:03d}.png").unlink()
    with caplog.at_level(logging.INFO, logger="signround.calib.images"):
        ar = AutoRound(str(vlm_dir("llava")), dataset=str(data), extra_data_dir=str(images),
                       **dict(FAST, nsamples=6, seqlen=40))
    assert ar.calibration_ids().shape == (4, 40)
    assert "skipped 2 whose image is not on disk" in caplog.text


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl"])
def test_autoscheme_scores_on_image_text_samples(arch, vlm_dir, tmp_path):
    """AutoScheme's DeltaLoss runs the blocks on the image-text samples (per-sample M-RoPE arguments,
    Qwen3-VL's deepstack features in its forward and backward)."""
    from signround import AutoScheme
    from tiny_models import vlm_processor

    src = vlm_dir(arch)
    data, images = image_text_data(tmp_path)
    ar = AutoRound(str(src), scheme=AutoScheme(3.5, "W2A16G16,W4A16G16"), iters=0, nsamples=4, seqlen=40,
                   batch_size=2, dataset=str(data), extra_data_dir=str(images), processor=vlm_processor(arch, src))
    ar.quantize_and_save(tmp_path / "q", format="auto_round")
    assert {r["option"] for r in ar.selection.rows} == {"W2A16G16", "W4A16G16"}
    assert all(r["scores"]["W2A16G16"] > r["scores"]["W4A16G16"] > 0 for r in ar.selection.rows)
    assert json.loads((tmp_path / "q" / "report.json").read_text())["self_check"][0]["status"] == "passed"


def test_llama4_vlm_quantizes_every_expert_of_its_language_model_and_keeps_the_vision_model(tmp_path):
    """Llama 4's image-text model nests a whole causal LM (``language_model.model.layers``, its own
    ``lm_head``) beside ``vision_model`` and ``multi_modal_projector``; its fused experts are split and
    quantized, the vision side is written byte for byte, and the output runs on an image."""
    from tiny_models import build_tiny_llama4_vlm

    src, image_id = build_tiny_llama4_vlm(tmp_path / "src", STORIES)
    ar = AutoRound(str(src), iters=2, **QUICK)
    assert ar.streamed and is_multimodal(ar._config)
    assert ar.plan.block_names == ["language_model.model.layers.0", "language_model.model.layers.1"]
    assert len(ar.plan.quantized) == 2 * (4 + 3 + 4 * 3)  # attention, shared expert, 4 experts x 3
    ar.quantize_and_save(tmp_path / "q", format="auto_round")
    assert json.loads((tmp_path / "q" / "report.json").read_text())["self_check"][0]["status"] == "passed"
    before, after = tensors(src), tensors(tmp_path / "q")
    vision = [k for k in before if k.startswith(("vision_model.", "multi_modal_projector."))]
    assert vision and all(torch.equal(after[k], before[k]) for k in vision)
    assert "language_model.model.layers.1.feed_forward.experts.3.down_proj.qweight" in after
    model = load_quantized(str(tmp_path / "q"), dtype=torch.float32)
    ids = torch.tensor([[1, image_id, 5, 6, 7]])
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_image = model(input_ids=ids, pixel_values=pixels).logits
        other_image = model(input_ids=ids, pixel_values=pixels.flip(-1)).logits
    assert torch.isfinite(with_image).all() and (with_image - other_image).abs().max() > 1e-3


def test_a_chat_template_that_writes_bos_gets_no_second_one(vlm_dir, tmp_path):
    from transformers import AutoProcessor

    from signround.calib.build import build_image_text_calibration

    data, images = image_text_data(tmp_path)
    src = vlm_dir("gemma3_vlm")
    processor = AutoProcessor.from_pretrained(str(src))
    plain = build_image_text_calibration(str(data), processor, None, 40, 2, extra_data_dir=str(images))[0]
    processor.chat_template = "<s>" + processor.chat_template  # as Gemma's own template starts with <bos>
    with_bos = build_image_text_calibration(str(data), processor, None, 40, 2, extra_data_dir=str(images))[0]
    assert plain[:, 0].tolist() == with_bos[:, 0].tolist() == [1, 1] and (with_bos[:, 1] != 1).all()
    assert torch.equal(plain, with_bos)


def test_vision_tower_rounding_searches_its_clipping_on_the_calibration_images(vlm_dir, tmp_path, caplog):
    """--quant_nontext_module with image-text data: each vision layer's clipping is searched weighting
    its input channels by their energy on the images, so the tower's image features stay closer to the
    full-precision ones than plain rounding (text calibration) leaves them; streamed and whole runs
    write the same files."""
    import logging

    src = vlm_dir("llava")
    data, images = image_text_data(tmp_path, n=8)
    fp = AutoModelForImageTextToText.from_pretrained(str(src), dtype=torch.float32).eval()
    image_kw = dict(dataset=str(data), extra_data_dir=str(images), seqlen=40)
    common = dict(scheme="W4A16", group_size=16, iters=0, nsamples=8, batch_size=2, quant_nontext_module=True)
    tuned = {}
    for kind, kw in (("images", image_kw), ("text", dict(dataset=TEXT_IDS * 2, seqlen=16))):
        with caplog.at_level(logging.INFO, logger="signround.tune.pipeline"):
            ar = AutoRound(str(src), low_cpu_mem_usage=False, **common, **kw)
            tuned[kind] = ar.quantize()[0]
        assert ("rounded with clipping searched on the calibration images" in caplog.text) == (kind == "images")
        if kind == "images":
            pixels = [e["pixel_values"] for e in ar._calib_extras if e]
        caplog.clear()

    def feature_error(model) -> float:
        with torch.no_grad():
            return sum(float((model.model.get_image_features(pixel_values=p).pooler_output[0]
                              - fp.model.get_image_features(pixel_values=p).pooler_output[0]).pow(2).sum())
                       for p in pixels)

    assert feature_error(tuned["images"]) < 0.95 * feature_error(tuned["text"])
    run_both(src, tmp_path, "auto_round", **common, **image_kw)
