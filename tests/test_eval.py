"""Evaluation from the CLI: perplexity of local files, lm-eval tasks, quantize-then-evaluate."""

import math
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from signround import AutoRound
from signround.errors import ConfigError
from signround.eval import evaluate, load_for_eval, parse_tasks, perplexity, read_text

SHAKES = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "tinyshakespeare.txt"


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "signround", *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    if not SHAKES.is_file():
        pytest.fail(f"test asset missing: {SHAKES}")
    p = tmp_path_factory.mktemp("corpus") / "shakes.txt"
    p.write_text(read_text(SHAKES)[:60000])
    return p


def test_eval_ppl_matches_direct_computation(stories_dir, text_file, tmp_path):
    r = run_cli("eval", "--model", stories_dir, "--tasks", f"ppl:{text_file}", "--limit", "6", "--eval_seqlen", "128",
                "--eval_json", tmp_path / "res.json")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "res.json").read_text())["results"]["ppl:shakes.txt"]
    assert res["windows"] == 6 and res["tokens"] == 6 * 127
    # independently: transformers' own loss (mean NLL of each window's shifted tokens) on the same windows
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(stories_dir), dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(str(stories_dir))(read_text(text_file), return_tensors="pt").input_ids[0]
    with torch.no_grad():
        losses = [model(ids[i * 128:(i + 1) * 128][None], labels=ids[i * 128:(i + 1) * 128][None]).loss for i in range(6)]
    assert res["ppl"] == pytest.approx(math.exp(float(torch.stack(losses).mean())), rel=1e-5)
    assert "| ppl:shakes.txt | ppl |" in r.stdout


def test_reloaded_model_ppl_equals_in_memory_qdq_model(stories_dir, text_file, tmp_path):
    ar = AutoRound(str(stories_dir), scheme="W4A16", group_size=32, iters=0, disable_opt_rtn=True)
    ar.quantize()
    text = read_text(text_file)
    in_memory = perplexity(ar.model.float(), ar.tokenizer, text, seqlen=128, n_windows=8)["ppl"]
    ar.model.to(torch.float32)
    out = ar.save_quantized(tmp_path / "q", format="auto_round")
    for backend in ("torch", "dequant_once"):
        model, tok = load_for_eval(str(out), device="cpu", backend=backend)
        reloaded = perplexity(model.float(), tok, text, seqlen=128, n_windows=8)["ppl"]
        assert reloaded == pytest.approx(in_memory, rel=1e-3), backend


def test_quantize_then_evaluate_the_saved_model(stories_dir, text_file, tmp_path):
    out = tmp_path / "out"
    r = run_cli("--model", stories_dir, "--scheme", "W4A16", "--group_size", "32", "--iters", "0",
                "--disable_opt_rtn", "--format", "fake", "--output_dir", out,
                "--tasks", f"ppl:{text_file}", "--limit", "4", "--eval_seqlen", "128")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "eval_results.json").read_text())
    assert res["model"] == str(out) and res["results"]["ppl:shakes.txt"]["windows"] == 4


def test_bad_tasks_fail_before_any_work(stories_dir, tmp_path):
    out = tmp_path / "out"
    r = run_cli("--model", stories_dir, "--iters", "0", "--output_dir", out, "--tasks", "ppl:/no/such/file.txt")
    assert r.returncode == 2 and "no file /no/such/file.txt" in r.stderr
    assert not out.exists()
    with pytest.raises(ConfigError, match="--tasks is empty"):
        parse_tasks(" , ")


MC_ROWS = [
    {"question": "Once upon a time there was a little", "choices": [" girl", " carburetor", " seventeen"], "answer": 0},
    {"question": "The cat sat on the", "choices": [" mat", " quantum", " of"], "answer": 0},
    {"question": "Lily wanted to play with her", "choices": [" friend", " tax return", " the"], "answer": 0},
    {"question": "He was very happy and", "choices": [" smiled", " photosynthesis", " between"], "answer": 0},
    {"question": "They went to the park to", "choices": [" play", " integrate", " whereas"], "answer": 0},
]


@pytest.fixture
def local_mc_task(tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in MC_ROWS) + "\n")
    (d / "mc.yaml").write_text(
        "task: sr_local_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {d / 'mc.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'target_delimiter: ""\n'
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return d


def test_lm_eval_local_multiple_choice_task_end_to_end(stories_dir, local_mc_task, tmp_path):
    pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")
    r = run_cli("eval", "--model", stories_dir, "--tasks", "sr_local_mc", "--include_path", local_mc_task,
                "--eval_json", tmp_path / "res.json")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "res.json").read_text())["results"]["sr_local_mc"]
    assert res["samples"] == len(MC_ROWS) and 0.0 <= res["acc"] <= 1.0

    # the same accuracy, computed by hand from the model's log-likelihoods of each choice
    model, tok = load_for_eval(str(stories_dir), device="cpu")
    correct = 0
    for row in MC_ROWS:
        scores = []
        # as lm-eval does: no special tokens, the continuation is what follows the context's tokens
        ctx = tok(row["question"], add_special_tokens=False)["input_ids"]
        for choice in row["choices"]:
            full = tok(row["question"] + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([full])
            with torch.no_grad():
                logp = model(ids).logits.float().log_softmax(-1)[0]
            scores.append(sum(logp[i - 1, full[i]].item() for i in range(len(ctx), len(full))))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == row["answer"])
    assert res["acc"] == pytest.approx(correct / len(MC_ROWS))


def test_unknown_lm_eval_task_names_the_fix(stories_dir, local_mc_task):
    pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")
    model, tok = load_for_eval(str(stories_dir), device="cpu")
    with pytest.raises(ConfigError, match="include_path"):
        evaluate(model, tok, parse_tasks("no_such_task_xyz", str(local_mc_task)), include_path=str(local_mc_task))
