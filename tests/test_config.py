"""Config files, presets, overrides and size parsing."""

import pytest
import torch

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


@pytest.mark.parametrize("text", ["6 GiBs", "-1GB", "lots", True])
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


class ScriptedMachine:
    """`budgets.cpu_sample` of a machine whose cores' and our process's work per sample
    window follow a script: each window, the busy share of each core and our cores."""

    def __init__(self, windows):
        self.windows = list(windows)
        self.cores, self.own, self.clock, self.last = None, 0.0, 0.0, 0.0

    def sample(self, me):
        if self.cores is None:  # the mark before the first window
            self.cores = [(0.0, 0.0)] * len(self.windows[0][0])
        else:
            busy, own = self.windows.pop(0)
            self.cores = [
                (b + share, t + 1.0) for (b, t), share in zip(self.cores, busy, strict=True)
            ]
            self.own += own * (self.clock - self.last)
        self.last = self.clock
        return list(self.cores), self.own

    def monotonic(self):
        return self.clock


def test_threads_follow_the_cores_other_processes_leave(monkeypatch):
    """`model.threads = 0`: one thread per core that others leave free, at the start and
    then over each second of a request; our own work is not another's."""
    from offload import budgets

    machine = ScriptedMachine([
        ([1.0, 0.0, 0.0, 0.0], 0.0),  # the start: another process on one core
        ([1.0, 1.0, 1.0, 1.0], 3.0),  # our 3 threads and that process
        ([1.0, 1.0, 1.0, 0.2], 3.0),  # it ended
        ([1.0, 1.0, 1.0, 1.0], 4.0),
        ([1.0, 1.0, 1.0, 1.0], 2.0),  # two more processes started (2 cores of theirs)
    ])  # fmt: skip
    monkeypatch.setattr(budgets, "cpu_sample", machine.sample)
    monkeypatch.setattr(budgets.time, "monotonic", machine.monotonic)
    monkeypatch.setattr(budgets.time, "sleep", lambda s: None)
    before = torch.get_num_threads()
    try:
        watch = budgets.CoreWatch().start()
        assert watch.threads == torch.get_num_threads() == 3
        machine.clock = 0.5
        watch.check()  # within the second: no sample
        assert len(machine.windows) == 4
        threads = []
        for _ in range(4):
            machine.clock += budgets.THREADS_CHECK_SECONDS
            watch.check()
            threads.append(torch.get_num_threads())
        assert threads == [3, 4, 4, 2]
    finally:
        torch.set_num_threads(before)


def test_free_cores_counts_other_processes_work_not_ours():
    from offload.budgets import free_cores

    assert free_cores([0.0, 0.0], 0.0) == 2
    assert free_cores([100.0, 0.0], 0.0) == 1
    assert free_cores([100.0, 0.0], 1.0) == 2  # that core was ours
    assert free_cores([55.0, 50.0], 1.0) == 2  # ours moved between the cores
    assert free_cores([60.0, 60.0, 10.0, 0.0], 0.0) == 3  # 1.3 cores: one taken
    assert free_cores([60.0, 60.0, 40.0, 0.0], 0.0) == 2  # 1.6 cores: two taken
    assert free_cores([60.0, 60.0, 40.0, 0.0], 0.2) == 3  # 1.4 of them others'
    assert free_cores([100.0, 100.0], 0.0) == 1
