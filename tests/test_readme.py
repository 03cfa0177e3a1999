"""The README's commands on stories260K run as written, so the README cannot drift from the code."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from signround.cli import main

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """``signround ...`` lines of the README's bash blocks that run on the offline test assets."""
    text = (REPO / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("signround") and ("stories260K" in line or line.startswith("signround list")):
                lines.append(line)
    return lines


def test_the_readme_has_the_commands_this_test_runs():
    cmds = readme_commands()
    assert any(c.startswith("signround --model ../shared/models/stories260K") for c in cmds)
    assert any(c.startswith("signround eval") for c in cmds) and any(c.startswith("signround report") for c in cmds)


@pytest.mark.slow
def test_readme_commands_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the README's paths are relative to the repository
    out = tmp_path / "out"
    for cmd in readme_commands():
        argv = shlex.split(cmd.replace("./out/", f"{out}/"))
        assert argv[0] == "signround"
        rc = main(argv[1:])
        captured = capsys.readouterr()
        assert rc == 0, (cmd, captured.err[-3000:])
        if argv[1] == "eval":
            assert "| ppl:wikitext2_test.txt | ppl |" in captured.out
        if argv[1] == "report":
            assert "self-check auto_round: passed" in captured.out
    report = json.loads((out / "stories260K-w4g32" / "report.json").read_text())
    assert report["settings"]["iters"] == 50 and report["mode"] == "signround"
