"""docs/compatibility.md against the parser and the AutoRound signature: the table cannot drift."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from signround import AutoRound
from signround.cli import UNSUPPORTED, _Unsupported, build_eval_parser, build_parser, main

DOC = Path(__file__).resolve().parents[1] / "docs" / "compatibility.md"


def table(heading: str) -> list[tuple[str, str]]:
    text = DOC.read_text().split(heading, 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)`[^|]*\| (same|differs|not offered) \|", text, flags=re.M)
    assert rows, heading
    return rows


CLI = table("## Command line")
API = table("## Python API")


def test_every_upstream_cli_flag_is_in_the_table():
    # the upstream flags this table was written from (auto-round's __main__.py)
    assert len(CLI) >= 85 and len({f for f, _ in CLI}) == len(CLI)


@pytest.mark.parametrize("flag,status", [r for r in CLI if r[0].startswith("--")], ids=lambda v: str(v))
def test_cli_flag_status_matches_the_parser(flag, status):
    actions = {**build_parser()._option_string_actions, **build_eval_parser()._option_string_actions}
    if flag == "--eval":  # a mode switch handled before parsing
        return
    assert flag in actions, f"{flag} ({status}) is not known to the parser"
    unsupported = isinstance(actions[flag], _Unsupported)
    assert unsupported == (status == "not offered"), flag


@pytest.mark.parametrize("flag", [f for f, s in CLI if s == "not offered"])
def test_not_offered_flags_say_what_to_use(flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", "m", flag, "1", "--output_dir", "/tmp/x"])
    assert e.value.code == 2
    assert UNSUPPORTED[flag] in capsys.readouterr().err


@pytest.mark.parametrize("arg,status", API, ids=lambda v: str(v))
def test_api_argument_status_matches_the_signature(arg, status):
    params = inspect.signature(AutoRound.__init__).parameters
    if status == "not offered":
        from signround.api import UPSTREAM_ONLY

        assert arg not in params and arg in UPSTREAM_ONLY
    else:
        assert arg in params, arg


def test_not_offered_api_arguments_are_refused_with_the_reason(stories_dir):
    from signround.errors import ConfigError

    with pytest.raises(ConfigError, match="super_bits: double quantization is set by the GGUF schemes"):
        AutoRound(str(stories_dir), super_bits=6)
