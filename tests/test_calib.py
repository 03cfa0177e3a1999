"""Calibration data: spec grammar, sources, filtering, concat, determinism, errors."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from signround.calib import build_calibration, parse_dataset_spec
from signround.calib.spec import DatasetSpec
from signround.errors import CalibrationError


@pytest.fixture(scope="module")
def tok(stories_dir):
    return AutoTokenizer.from_pretrained(str(stories_dir))


def test_spec_grammar():
    specs = parse_dataset_spec(
        './a.json,./b.txt,NeelNanda/pile-10k:num=256,mbpp:split=train+validation,'
        'c.jsonl:concat=True:apply_chat_template:system_prompt="You are: helpful, brief"'
    )
    assert [s.name for s in specs] == ["./a.json", "./b.txt", "NeelNanda/pile-10k", "mbpp", "c.jsonl"]
    assert specs[2].num == 256 and specs[3].split == "train+validation"
    assert specs[4] == DatasetSpec("c.jsonl", concat=True, apply_chat_template=True, system_prompt="You are: helpful, brief")


@pytest.mark.parametrize("bad,needle", [
    ("a.json:numb=3", "unknown option"),
    ("a.json:num=-1", "positive integer"),
    ("a.json:concat=maybe", "not a boolean"),
    ("", "empty dataset spec"),
    ('a.json:system_prompt="oops', "unbalanced quote"),
])
def test_spec_errors(bad, needle):
    with pytest.raises(CalibrationError, match=needle):
        parse_dataset_spec(bad)


def test_local_sources_and_filtering(tmp_path, tok, caplog):
    long = "Once upon a time there was a little dog who liked to run in the park. " * 8
    (tmp_path / "a.json").write_text(json.dumps([long, "short", {"text": long + " more"}]))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"content": long}) for _ in range(3)))
    (tmp_path / "c.txt").write_text(long + "\nshort line\n")
    ids = build_calibration(f"{tmp_path}/a.json,{tmp_path}/b.jsonl,{tmp_path}/c.txt", tok, 64, 100)
    assert ids.shape == (6, 64)  # 2 + 3 + 1 long samples kept, short ones dropped
    assert "kept 2 of 3" in caplog.text


def test_concat_joins_short_samples(tmp_path, tok):
    (tmp_path / "s.txt").write_text("\n".join(f"the cat sat number {i}." for i in range(200)))
    with pytest.raises(CalibrationError, match="concat=True"):
        build_calibration(str(tmp_path / "s.txt"), tok, 64, 4)
    ids = build_calibration(f"{tmp_path / 's.txt'}:concat=True", tok, 64, 4)
    assert ids.shape == (4, 64)


def test_python_inputs_and_determinism(tok):
    long = "The sun was warm and the birds sang in the tall green trees. " * 6
    from_text = build_calibration([long] * 3, tok, 32, 2, seed=1)
    assert from_text.shape == (2, 32)
    ids = [list(range(5, 45)), list(range(7, 47))]
    assert build_calibration(ids, tok, 40, 8).shape == (2, 40)
    enc = tok([long, long])
    assert build_calibration([enc], tok, 16, 8).shape == (2, 16)
    loader = torch.utils.data.DataLoader(torch.arange(400).view(10, 40), batch_size=4)
    assert build_calibration(loader, tok, 40, 8).shape == (8, 40)
    a = build_calibration("signround-default", tok, 128, 8, seed=3)
    b = build_calibration("signround-default", tok, 128, 8, seed=3)
    c = build_calibration("signround-default", tok, 128, 8, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_default_corpus_covers_default_settings(tok):
    ids = build_calibration("signround-default", tok, 2048, 128)
    assert ids.shape == (128, 2048)
    assert len({tuple(r[:64].tolist()) for r in ids}) == 128  # no repeated samples


def test_source_errors(tmp_path, tok):
    with pytest.raises(CalibrationError, match="does not exist"):
        build_calibration("./missing.json", tok, 16, 2)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CalibrationError, match="not valid JSON"):
        build_calibration(str(tmp_path / "bad.json"), tok, 16, 2)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(CalibrationError, match="empty"):
        build_calibration(str(tmp_path / "empty.json"), tok, 16, 2)
    with pytest.raises(CalibrationError, match="local .json/.jsonl/.txt"):
        build_calibration("someorg/some-dataset-that-is-not-here", tok, 16, 2)
