"""Config files, presets, overrides and size parsing."""

import re

import pytest

from offload.config import RuntimeConfig, parse_bytes
from offload.errors import ConfigError


def test_presets_load_and_default_matches_code():
    assert RuntimeConfig.from_toml("cpu-smollm2") == RuntimeConfig()
    gpu = RuntimeConfig.from_toml("rtx4090-llama3.1-8b")
    assert gpu.model.device == "cuda"


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[generation]\ntop_k = 5\ntemprature = 0.1\n")
    with pytest.raises(ConfigError, match=r"c.toml: unknown key generation.temprature"):
        RuntimeConfig.from_toml(p)
    p.write_text("[gen]\ntop_k = 5\n")
    with pytest.raises(ConfigError, match=r"unknown section \[gen\]"):
        RuntimeConfig.from_toml(p)
    # a key that is not a plain name is quoted: the error stays one line (a session's
    # manifest holds its config)
    for data in ({"generation": {"a\nb": 1}}, {"x\ny": {}}):
        with pytest.raises(
            ConfigError, match=r"^m.json: unknown (key generation\.|section \[)'"
        ) as e:
            RuntimeConfig.from_dict(data, source="m.json")
        assert "\n" not in str(e.value)


def test_bad_values(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[generation]\ntop_p = 2.0\n")
    with pytest.raises(ConfigError, match="generation.top_p"):
        RuntimeConfig.from_toml(p)
    p.write_text("[generation]\nmin_p = 1.5\n")
    with pytest.raises(ConfigError, match=r"generation.min_p: must be in \[0, 1\], got 1.5"):
        RuntimeConfig.from_toml(p)
    p.write_text("[generation]\nmax_new_tokens = 'many'\n")
    with pytest.raises(ConfigError, match="generation.max_new_tokens: expected int, got 'many'"):
        RuntimeConfig.from_toml(p)
    # each names the file too (before: the key alone)
    for text, message in [
        ("[selection]\nmode = 'x'\n", "selection.mode: 'x' is not one of"),
        ("[selection]\nwindow = 8\n", r"selection.window \(8\) must be at least"),
        ("[kv]\nhost_bytes = -5\n", "kv.host_bytes: a size must not be negative, got -5"),
        ("mode = 'dense'\n", r"mode is a key of \[selection\]: write it there"),
    ]:
        p.write_text(text)
        with pytest.raises(ConfigError, match=f"^{re.escape(str(p))}: {message}"):
            RuntimeConfig.from_toml(p)
    p.write_text("[generation\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        RuntimeConfig.from_toml(p)


def test_overrides_by_leaf_and_dotted_name_with_string_values():
    cfg = RuntimeConfig().replace(dtype="float32", **{"generation.top_k": "40"}, seed="7")
    assert cfg.model.dtype == "float32" and cfg.generation.top_k == 40 and cfg.generation.seed == 7
    assert RuntimeConfig().generation.top_k == 0  # frozen original untouched


@pytest.mark.parametrize(
    "text, expected",
    [
        ("6GiB", 6 * 2**30),
        ("512 MB", 512 * 10**6),
        ("1.5G", 1_500_000_000),
        (4096, 4096),
        (None, None),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text, "kv.host_bytes") == expected


@pytest.mark.parametrize("text", ["6 GiBs", "-1GB", "lots", True, -1, "nan", "inf", "1e400 GB"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ConfigError, match="kv.host_bytes"):
        parse_bytes(text, "kv.host_bytes")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("weights", "int3", "model.weights: 'int3' is not one of auto, dense, int8, int4"),
        ("prefetch", "sometimes", "selection.prefetch: 'sometimes' is not one of off, cache"),
        ("hit_cache", 1.5, "selection.hit_cache: must be >= 2"),
        ("reuse", "every", "selection.reuse: 'every' is not one of off, on, auto"),
    ],
)
def test_decode_speed_settings_are_checked(key, value, message):
    with pytest.raises(ConfigError, match=message):
        RuntimeConfig().replace(**{key: value})


def test_threads_are_bounded_by_the_machine():
    import os

    from offload.config import ModelSection

    with pytest.raises(
        ConfigError, match=f"model.threads: must be between 0 .* {os.cpu_count()} CPUs, got 1000000"
    ):
        ModelSection(threads=1_000_000)
