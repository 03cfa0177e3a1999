"""Schemes, overrides and per-layer resolution."""

import pytest

from signround.errors import ConfigError
from signround.schemes import PRESETS, QuantSpec, resolve_layer_specs, resolve_scheme

NAMES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.mlp.down_proj",
    "lm_head",
]


def test_presets():
    assert resolve_scheme("W4A16") == QuantSpec(4, 128, True)
    assert resolve_scheme("w2a16g64") == QuantSpec(2, 64, True)
    assert resolve_scheme("W2A16G32").group_size == 32
    assert resolve_scheme("W3A16").bits == 3 and resolve_scheme("W8A16").bits == 8
    assert {"W2A16", "W2A16G64", "W2A16G32", "W3A16", "W4A16", "W8A16"} <= set(PRESETS)


def test_overrides():
    s = resolve_scheme("W4A16", bits=8, group_size=-1, sym=False)
    assert s == QuantSpec(8, -1, False)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"scheme": "Q4"}, "unknown scheme"),
        ({"scheme": "W5A16"}, "choose bits from"),
        ({"bits": 5}, "choose bits from"),
        ({"bits": 1}, "choose bits from"),
        ({"group_size": 0}, "group_size must be"),
        ({"group_size": -2}, "group_size must be"),
    ],
)
def test_bad_scheme(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve_scheme(**{"scheme": "W4A16", **kwargs})


def test_layer_config_exact_regex_substring_and_precedence():
    d = QuantSpec(4, 128, True)
    specs = resolve_layer_specs(
        NAMES,
        d,
        {
            r"layers\.1\..*q_proj$": "W8A16",  # regex
            "down_proj": {"bits": 2, "group_size": 32},  # substring
            "model.layers.1.mlp.down_proj": {"bits": 16},  # exact beats the substring above
            "mlp": {"bits": 3},  # listed after "down_proj": never wins for down_proj
        },
        opt_in_names=["lm_head"],
    )
    assert specs["model.layers.0.self_attn.q_proj"] == d
    assert specs["model.layers.1.self_attn.q_proj"] == QuantSpec(8, 128, True)
    assert specs["model.layers.0.mlp.down_proj"] == QuantSpec(2, 32, True)
    assert not specs["model.layers.1.mlp.down_proj"].quantized
    assert not specs["lm_head"].quantized  # opt-in layer untouched by patterns


def test_ignore_layers_and_opt_in_exact():
    d = QuantSpec(4, 128, True)
    specs = resolve_layer_specs(NAMES, d, {"lm_head": "W8A16"}, ["self_attn"], opt_in_names=["lm_head"])
    assert not specs["model.layers.0.self_attn.q_proj"].quantized
    assert specs["model.layers.0.mlp.down_proj"] == d
    assert specs["lm_head"].bits == 8


def test_unmatched_key_and_bad_values():
    d = QuantSpec()
    with pytest.raises(ConfigError, match="matches no quantizable layer"):
        resolve_layer_specs(NAMES, d, {"nonexistent_proj": {"bits": 8}})
    with pytest.raises(ConfigError, match="ignore_layers entry"):
        resolve_layer_specs(NAMES, d, None, ["nothing_like_this"])
    with pytest.raises(ConfigError, match="choose bits"):
        resolve_layer_specs(NAMES, d, {"down_proj": {"bits": 6}})
    with pytest.raises(ConfigError, match="unknown option"):
        resolve_layer_specs(NAMES, d, {"down_proj": {"bitz": 8}})
