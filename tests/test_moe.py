"""Mixture-of-experts: every expert quantized, stored per expert under the checkpoint's names,
streamed and whole runs identical, routers kept, fused layouts we cannot split refused."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from signround import AutoRound, QuantLinear, load_quantized
from signround.errors import ConfigError, ExportError
from signround.model.moe import UnfusedExperts, unfuse_experts
from test_e2e import logits
from test_streaming import FAST, run_both
from tiny_models import MOE_ARCHS, _moe_configs

EXPERTS = 8  # tiny_models' MoE configs
# (name of the MoE module on disk, the checkpoint's gate / up / down names)
ON_DISK = {"qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
           "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
           "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
           # fused on disk (gate/up interleaved, biases): split per expert as upstream auto-round splits it
           "gpt_oss": ("mlp", ("gate_proj", "up_proj", "down_proj")),
           # fused on disk (gate columns, then up; inputs scaled by the routing weight), a shared expert
           "llama4": ("feed_forward", ("gate_proj", "up_proj", "down_proj"))}
ROUTER = {"gpt_oss": "router", "llama4": "router"}  # the others' is "gate"
SHARED = {"qwen2_moe": 3, "llama4": 3}  # shared expert projections per block


def ids(n=8, seqlen=32, seed=0):
    return torch.randint(3, 120, (n, seqlen), generator=torch.Generator().manual_seed(seed)).tolist()


def file_keys(d: Path) -> list[str]:
    return sorted(k for f in d.glob("*.safetensors") for k in safe_open(str(f), "pt").keys())


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_unfused_experts_compute_what_the_fused_ones_do(arch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_moe_configs()[arch]()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    ref = logits(model, 128)
    moe = "feed_forward" if arch == "llama4" else "mlp"  # the module's name in transformers 5
    assert unfuse_experts(model) == [f"model.layers.0.{moe}.experts", f"model.layers.1.{moe}.experts"]
    experts = model.get_submodule(f"model.layers.0.{moe}.experts")
    assert isinstance(experts, UnfusedExperts) and len(experts) == EXPERTS
    gate, up, down = ON_DISK[arch][1]
    assert {n for n, m in experts[3].named_children() if isinstance(m, torch.nn.Linear)} == {gate, up, down}
    torch.testing.assert_close(logits(model, 128), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_every_expert_is_quantized_stored_per_expert_and_loads_back(arch, tiny_model_dir, tmp_path):
    src = tiny_model_dir(arch)
    ar = AutoRound(str(src), scheme="W4A16", group_size=16, iters=0, disable_opt_rtn=True, low_cpu_mem_usage=False)
    per_block = 4 + 3 * EXPERTS + SHARED.get(arch, 0)  # attention, experts, shared expert
    assert len(ar.plan.quantized) == 2 * per_block
    kept = [n for n, s in ar.plan.specs.items() if not s.quantized]
    routers = {"qwen2_moe": "mlp.shared_expert_gate", "llama4": "feed_forward.router"}  # Linear routers
    assert kept == ([f"model.layers.{b}.{routers[arch]}" for b in (0, 1)] if arch in routers else []) + ["lm_head"]
    out = tmp_path / "q"
    ar.quantize_and_save(out)
    moe, (gate, up, down) = ON_DISK[arch]
    keys = file_keys(out)
    for e in range(EXPERTS):
        for proj in (gate, up, down):
            assert f"model.layers.1.{moe}.experts.{e}.{proj}.qweight" in keys
    router = ROUTER.get(arch, "gate")
    assert f"model.layers.0.{moe}.{router}.weight" in keys  # the router, in full precision
    # ... and listed as kept, as upstream lists it (its loader would expect a quantized router otherwise)
    extra = json.loads((out / "config.json").read_text())["quantization_config"]["extra_config"]
    assert extra[f"model.layers.1.{moe}.{router}"] == {"bits": 16, "data_type": "float"}
    assert not any("gate_up_proj" in k for k in keys)
    loaded = load_quantized(str(out))
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == len(ar.plan.quantized)
    torch.testing.assert_close(logits(loaded, 128), logits(ar.model, 128), rtol=1e-4, atol=1e-4)
    report = json.loads((out / "report.json").read_text())
    assert [c["status"] for c in report["self_check"]] == ["passed"]


def test_streamed_signround_on_moe_writes_the_whole_runs_files(tiny_model_dir, tmp_path):
    streamed, _ = run_both(tiny_model_dir("qwen3_moe"), tmp_path, "auto_round,fake", scheme="W4A16", group_size=16,
                           iters=3, dataset=ids(4, 16), **FAST)
    # each expert is tuned on the tokens routed to it: 4 x 16 calibration tokens, 2 experts each
    for block in ("model.layers.0", "model.layers.1"):
        counts = streamed.result.block_stats[block]["expert_tokens"]["mlp.experts"]
        assert len(counts) == EXPERTS and sum(counts) == 4 * 16 * 2


@pytest.mark.parametrize("fmt", ["auto_gptq", "auto_awq", "llm_compressor", "fake"])
def test_mixtral_formats_use_the_checkpoint_names(fmt, tiny_model_dir, tmp_path):
    """Mixtral's MoE module is ``mlp`` in transformers 5 but ``block_sparse_moe`` in its checkpoints
    (what vLLM reads): every format writes the checkpoint's names, and each loads back."""
    src = tiny_model_dir("mixtral")
    ar = AutoRound(str(src), scheme="W4A16", group_size=16, iters=0, disable_opt_rtn=True, low_cpu_mem_usage=False)
    out = tmp_path / "q"
    ar.quantize_and_save(out, format=fmt)
    keys = file_keys(out)
    assert not any(".mlp." in k for k in keys)
    assert any(k.startswith("model.layers.1.block_sparse_moe.experts.7.w2.") for k in keys)
    if fmt == "fake":
        loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    else:
        loaded = load_quantized(str(out))
    torch.testing.assert_close(logits(loaded, 128), logits(ar.model, 128), rtol=1e-4, atol=1e-4)


def test_experts_we_cannot_split_are_refused_with_the_fix(tiny_model_dir, monkeypatch):
    """A fused layout the conversion mapping does not describe (simulated) would stay unquantized:
    refused naming the class and the layer_config that keeps it in full precision, which works."""
    import signround.model.moe as moe

    monkeypatch.setattr(moe, "expert_layout", lambda model: None)
    src = str(tiny_model_dir("qwen3_moe"))
    with pytest.raises(ConfigError, match=r"model.layers.0.mlp.experts \(Qwen3MoeExperts\).*\"mlp.experts\": \{\"bits\": 16\}"):
        AutoRound(src, scheme="W4A16", group_size=16, iters=0, disable_opt_rtn=True)
    ar = AutoRound(src, scheme="W4A16", group_size=16, iters=0, disable_opt_rtn=True, layer_config={"mlp.experts": {"bits": 16}})
    assert len(ar.plan.quantized) == 2 * 4  # attention only; the experts stay fused and exact


def test_calibrate_all_experts_changes_the_statistics_not_the_output(tiny_model_dir):
    """Every expert computes every token (so its importance statistics see them all), while the
    block's output, and so the routed-token counts and the files' shapes, follow the router."""
    from signround.model.moe import RoutedTokens, set_calibrate_all

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("qwen3_moe"))).eval()
    unfuse_experts(model)
    block = model.model.layers[0]
    seen = []
    hook = block.mlp.experts[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    x = torch.tensor(ids(2, 24))
    with torch.no_grad(), RoutedTokens(block) as routed:
        ref = model(x).logits
    set_calibrate_all(block, True)
    with torch.no_grad():
        out = model(x).logits
    hook.remove()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert seen[-1] == 48 and seen[0] == routed.counts["mlp.experts"][0] < 48


def test_calibrate_all_experts_tunes_on_routed_tokens(tiny_model_dir, tmp_path):
    ar = AutoRound(str(tiny_model_dir("mixtral")), scheme="W4A16", group_size=16, iters=2, dataset=ids(4, 16),
                   calibrate_all_experts=True, **FAST)
    ar.quantize_and_save(tmp_path / "q")
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    counts = report["blocks"]["model.layers.0"]["expert_tokens"]["mlp.experts"]
    assert sum(counts) == 4 * 16 * 2  # routed tokens, not tokens x experts
    assert [c["status"] for c in report["self_check"]] == ["passed"]


def test_experts_routed_too_few_tokens_keep_their_start(tiny_model_dir, tmp_path, caplog):
    from safetensors.torch import load_file

    def experts(out: Path) -> dict:
        t = {k: v for f in out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
        # block 0's: later blocks' starts depend on the tuned blocks before them (their inputs)
        return {k: v for k, v in t.items() if k.startswith("model.layers.0.mlp.experts.")}

    src = str(tiny_model_dir("qwen3_moe"))
    outs = {}
    for label, iters, least in (("frozen20", 20, 10**6), ("frozen40", 40, 10**6), ("tuned20", 20, 0)):
        with caplog.at_level("INFO", logger="signround"):
            ar = AutoRound(src, scheme="W2A16", group_size=16, iters=iters, dataset=ids(4, 16),
                           min_expert_tokens=least, **FAST)
            ar.quantize_and_save(tmp_path / label)
        outs[label] = experts(tmp_path / label)
    assert "model.layers.1: 8 of 8 experts were routed fewer than 1000000 calibration tokens" in caplog.text
    # experts below the threshold never move off their start, however long the others tune
    assert all(torch.equal(outs["frozen20"][k], outs["frozen40"][k]) for k in outs["frozen20"])
    assert any(not torch.equal(outs["frozen20"][k], outs["tuned20"][k]) for k in outs["frozen20"])


def test_mixtral_files_with_generic_expert_names_load(tiny_model_dir, tmp_path):
    """Upstream auto-round 0.16.1, loading a Mixtral whole, writes its experts as
    block_sparse_moe.experts.N.{gate,up,down}_proj: those files load as the w1 / w3 / w2 ones do."""
    from safetensors.torch import load_file, save_file

    ar = AutoRound(str(tiny_model_dir("mixtral")), scheme="W4A16", group_size=16, iters=0, disable_opt_rtn=True,
                   low_cpu_mem_usage=False)
    out = tmp_path / "q"
    ar.quantize_and_save(out)
    generic = {".w1.": ".gate_proj.", ".w3.": ".up_proj.", ".w2.": ".down_proj."}
    for f in out.glob("*.safetensors"):
        tensors = load_file(str(f))
        renamed = {}
        for k, v in tensors.items():
            for a, b in generic.items():
                k = k.replace(a, b)
            renamed[k] = v
        save_file(renamed, str(f), metadata={"format": "pt"})
    assert any(".experts.3.up_proj.qweight" in k for k in file_keys(out))
    loaded = load_quantized(str(out))
    torch.testing.assert_close(logits(loaded, 128), logits(ar.model, 128), rtol=1e-4, atol=1e-4)


def test_gpt_oss_experts_fused_on_disk_stream_slice_by_slice(tiny_model_dir, tmp_path):
    """gpt-oss stores its experts fused (gate/up interleaved, with biases): streaming reads each
    expert's slice of the fused tensors, and the files equal a whole-model run's; every expert is
    stored per expert with its biases; fake (a plain transformers checkpoint) is refused."""
    src = tiny_model_dir("gpt_oss")
    streamed, whole = run_both(src, tmp_path, "auto_round,llm_compressor", scheme="W4A16", group_size=16, iters=2,
                               dataset=ids(4, 16), **FAST)
    keys = file_keys(tmp_path / "streamed" / "auto_round")
    assert "model.layers.1.mlp.experts.7.up_proj.bias" in keys and "model.layers.1.mlp.experts.7.up_proj.qweight" in keys
    loaded = load_quantized(str(tmp_path / "streamed" / "auto_round"))
    torch.testing.assert_close(logits(loaded, 128), logits(whole.model, 128), rtol=1e-4, atol=1e-4)
    with pytest.raises(ExportError, match="fake.*auto_round"):
        AutoRound(str(src), iters=0, disable_opt_rtn=True).quantize_and_save(tmp_path / "f", format="fake")


def test_llama4_experts_fused_on_disk_stream_and_get_only_their_routed_tokens(tiny_model_dir, tmp_path):
    """Llama 4 stores its experts fused (gate columns, then up): streaming reads each expert's
    slice, the files equal a whole-model run's and load back; each expert is tuned on the tokens
    routed to it (top-1: one per token), not on every token as Llama4TextMoe computes them."""
    src = tiny_model_dir("llama4")
    streamed, whole = run_both(src, tmp_path, "auto_round,auto_gptq", scheme="W4A16", group_size=16, iters=2,
                               dataset=ids(4, 16), **FAST)
    counts = streamed.result.block_stats["model.layers.0"]["expert_tokens"]["feed_forward.experts"]
    assert len(counts) == EXPERTS and sum(counts) == 4 * 16
    keys = file_keys(tmp_path / "streamed" / "auto_gptq")
    assert "model.layers.1.feed_forward.experts.7.up_proj.qweight" in keys and not any("gate_up_proj" in k for k in keys)
    for fmt in ("auto_round", "auto_gptq"):
        loaded = load_quantized(str(tmp_path / "streamed" / fmt))
        torch.testing.assert_close(logits(loaded, 128), logits(whole.model, 128), rtol=1e-4, atol=1e-4)
    with pytest.raises(ExportError, match="fake.*auto_round"):
        AutoRound(str(src), iters=0, disable_opt_rtn=True).quantize_and_save(tmp_path / "f", format="fake")
