"""The upstream benchmark's run specs: what a user types decides which settings each run gets."""

import argparse
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vs_upstream.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_vs_upstream", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_run_specs_parse_scheme_iters_and_label(bench):
    r = bench.parse_run("ours:W2G64A:50:bs4")
    assert (r["tool"], r["bits"], r["group_size"], r["sym"], r["iters"], r["label"]) == ("ours", 2, 64, False, 50, "bs4")
    assert r["name"] == "ours_W2G64A_50_bs4"
    plain = bench.parse_run("ours:W4G128:rtn")
    assert plain["plain_rtn"] and plain["iters"] == 0 and plain["label"] is None
    with pytest.raises(SystemExit, match="expected TOOL:SCHEME:ITERS"):
        bench.parse_run("ours:W4G64")
    with pytest.raises(SystemExit, match="ours\\|upstream"):
        bench.parse_run("theirs:W4G64:50")


def test_label_args_reach_only_runs_with_that_label_and_come_last(bench):
    labels = bench.parse_label_args(["bs4=--batch_size 4", "lr=--lr 0.01 --minmax_lr 0.01"])
    args = argparse.Namespace(ours_args="--seed 1", label_args=labels)
    assert bench.run_ours_args(bench.parse_run("ours:W4G64:50:bs4"), args) == "--seed 1 --batch_size 4"
    assert bench.run_ours_args(bench.parse_run("ours:W4G64:50"), args) == "--seed 1"
    assert bench.run_ours_args(bench.parse_run("ours:W4G64:50:lr"), args).endswith("--lr 0.01 --minmax_lr 0.01")
    with pytest.raises(SystemExit, match="LABEL="):
        bench.parse_label_args(["--batch_size 4"])


def test_label_args_for_no_run_or_upstream_options_are_refused_before_any_work(bench):
    runs = [bench.parse_run(s) for s in ("ours:W4G64:50:bs4", "upstream:W4G64:50:b", "upstream:W4G64:50:s43")]
    bench.check_labels(runs, {"bs4": "--batch_size 4", "s43": "--seed 43"})
    with pytest.raises(SystemExit, match="add ':bs2' to a run spec"):
        bench.check_labels(runs, {"bs2": "--batch_size 2"})
    with pytest.raises(SystemExit, match="upstream runs take only '--seed N'"):
        bench.check_labels(runs, {"b": "--batch_size 2"})
    with pytest.raises(SystemExit, match="upstream runs take only"):
        bench.check_labels(runs, {"b": "--lr"})
    for bad in ("--seed -5", "--lr 0", "--minmax_lr nan", "--lr 0.01 --iters 30"):
        with pytest.raises(SystemExit, match="upstream runs take only"):
            bench.check_labels(runs, {"b": bad})
    bench.check_labels(runs, {"b": "--lr 0.01 --minmax_lr 0.0025"})


def test_upstream_runs_take_the_seed_and_steps_of_their_label(bench):
    args = argparse.Namespace(ours_args="", label_args={"s43": "--seed 43", "f": "--lr 0.01 --minmax_lr 0.0025"})
    assert bench.upstream_options(bench.parse_run("upstream:W2G64:50:s43"), args) == {"seed": 43}
    assert bench.upstream_options(bench.parse_run("upstream:W2G64:50"), args) == {"seed": 42}
    assert bench.upstream_options(bench.parse_run("upstream:W4G64:30:f"), args) == {"seed": 42, "lr": 0.01,
                                                                                    "minmax_lr": 0.0025}
    assert bench.run_ours_args(bench.parse_run("ours:W2G64:50:s43"), args) == "--seed 43"
