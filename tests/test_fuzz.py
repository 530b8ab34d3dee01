"""Hostile input, generated: every case ends in the project's own error or succeeds.

Seeded (derandomized) hypothesis runs over config values, HF `config.json` files and
the tokenizer's files beside them, GGUF headers (bytes, and typed metadata values),
session manifests and CURRENT files, and the Python API's calls. A case may succeed or
raise an `OffloadError` / `StorageError` (which the CLI prints as one line); any other
exception, a hang past the deadline or a large allocation is a failure.

The suite runs 60 seeded cases a test. A search for new failures runs more, unseeded:

    OFFLOAD_FUZZ_EXAMPLES=2000 OFFLOAD_FUZZ_RANDOM=1 python -m pytest -q tests/test_fuzz.py
"""

import json
import os
import resource
import string
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offload.config import RuntimeConfig, _locate
from offload.errors import OffloadError
from storage.disk import StorageError
from tests.conftest import rewrite_manifest
from tests.gguf_files import write_gguf

FUZZ = settings(
    derandomize=os.environ.get("OFFLOAD_FUZZ_RANDOM") != "1",
    max_examples=int(os.environ.get("OFFLOAD_FUZZ_EXAMPLES", "60")), deadline=None,
    database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip
CASE_SECONDS = 10
CASE_BYTES = 2 << 30  # no case may grow the process by this much


class Bounded:
    """Time and peak-memory growth of one case."""

    def __enter__(self):
        self.t = time.monotonic()
        self.rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        assert time.monotonic() - self.t < CASE_SECONDS, "a case ran past its deadline"
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.rss
        assert grown < CASE_BYTES, f"a case grew the process by {grown} bytes"
        return False


REPORT = os.environ.get("FUZZ_REPORT")  # a file: one line per case (test, outcome) for notes


def ours_or_success(fn, *args, **kwargs):
    with Bounded():
        try:
            out = fn(*args, **kwargs)
        except (OffloadError, StorageError) as e:
            assert str(e) and "\n" not in str(e), "an error must be one line with a message"
            out = e
    if REPORT:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split(" ")[0]
        with open(REPORT, "a") as f:
            f.write(f"{test} {'error' if isinstance(out, Exception) else 'ok'}\n")
    return out


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)

CONFIG_KEYS = ["window", "sink", "retrieved", "threads", "temperature", "top_p", "top_k", "seed",
               "max_new_tokens", "prefill_chunk", "chunk_size", "summary_bits", "host_bytes",
               "disk_dir", "mode", "selector", "dtype", "weights", "hit_cache", "cluster_iters",
               "retrieve_fraction", "dense_layers", "spill_batch", "cuda_graphs", "device", "reuse"]  # fmt: skip


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(CONFIG_KEYS),
                          st.integers(0, 4096) | st.floats(0, 2) | st.sampled_from(["auto", "on", "off", "2GiB", "cpu"])
                          | json_scalars | st.text(string.printable, max_size=8)),
                min_size=1, max_size=3))  # fmt: skip
def test_config_values(pairs):
    assert all(_locate(k) for k, _ in pairs)
    ours_or_success(RuntimeConfig().replace, **dict(pairs))


@pytest.fixture(scope="module")
def tiny_hf(tiny_dirs):
    return tiny_dirs["llama-gqa-untied"][0]


def copy_model(src, dst):
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    (dst / "config.json").unlink()
    return dst


@FUZZ
@given(key=st.sampled_from(["num_hidden_layers", "hidden_size", "num_attention_heads",
                            "num_key_value_heads", "intermediate_size", "vocab_size",
                            "max_position_embeddings", "rms_norm_eps", "rope_theta",
                            "rope_scaling", "head_dim", "eos_token_id", "model_type",
                            "tie_word_embeddings", "sliding_window"]),
       value=json_values)  # fmt: skip
def test_hf_config_json_values(tiny_hf, tmp_path_factory, key, value):
    from offload.loading import load

    d = copy_model(tiny_hf, tmp_path_factory.mktemp("m"))
    cfg = json.loads((tiny_hf / "config.json").read_text())
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    ours_or_success(load, d, __import__("torch").float32, __import__("torch").device("cpu"))


@FUZZ
@given(file=st.sampled_from(["tokenizer_config.json", "generation_config.json"]),
       key=st.sampled_from(["chat_template", "bos_token", "eos_token", "eos_token_id", None]),
       value=json_values | st.sampled_from([[{"name": "default"}], [5], "{{ bos_token }}",
                                            [{"name": "default", "template": "{{ eos_token }}"}],
                                            {"content": "<|im_end|>"}, 2, [2, 1.5]]))  # fmt: skip
def test_tokenizer_json_values(tiny_hf, tmp_path_factory, file, key, value):
    """A value in the files beside tokenizer.json (None: the file's whole content), then a
    chat prompt rendered: `"eos_token_id": "x"` or a list of unnamed templates crashed."""
    from offload.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("t")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).symlink_to(tiny_hf / f)
    base = json.loads((tiny_hf / file).read_text()) if (tiny_hf / file).exists() else {}
    (d / file).unlink(missing_ok=True)
    (d / file).write_text(json.dumps(value if key is None else {**base, key: value}))

    def prompt():
        tok = Tokenizer.from_hf_dir(d)
        return tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)

    ours_or_success(prompt)


@pytest.mark.parametrize(
    "raw",
    [b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000, b"[1, 2]", b"{\"model_type\": \"llama\"",
     b"", json.dumps({"model_type": "llama", "num_hidden_layers": 10**9}).encode()],
)  # fmt: skip
def test_hf_config_json_files(tiny_hf, tmp_path, raw):
    from offload.loading import load

    d = copy_model(tiny_hf, tmp_path / "m")
    if raw.startswith(b'{"model_type": "llama", "num_hidden_layers"'):
        cfg = json.loads((tiny_hf / "config.json").read_text())
        raw = json.dumps({**cfg, "num_hidden_layers": 10**9}).encode()
    (d / "config.json").write_bytes(raw)
    err = ours_or_success(load, d, __import__("torch").float32, __import__("torch").device("cpu"))
    assert isinstance(err, OffloadError)


def load_gguf(path):
    import torch

    from offload.loading import load

    return load(path, torch.float32, torch.device("cpu"))


def test_minimal_gguf_loads_and_lying_headers_are_refused(tmp_path):
    loaded = load_gguf(write_gguf(tmp_path / "ok.gguf"))
    assert loaded.args.num_layers == 1 and loaded.tokenizer.encode("ab")
    with pytest.raises(OffloadError, match="num_layers must be at most 4,096, got 1,000,000,000"):
        load_gguf(write_gguf(tmp_path / "huge.gguf", block_count=10**9))
    with pytest.raises(OffloadError, match="the config says 3 layers, the weights hold 1"):
        load_gguf(write_gguf(tmp_path / "lie.gguf", block_count=3))
    with pytest.raises(OffloadError, match="max_seq_len must be a positive integer"):
        load_gguf(write_gguf(tmp_path / "zero.gguf", context=0))


@FUZZ
@given(st.data())
def test_gguf_header_bytes(tmp_path_factory, data):
    src = write_gguf(tmp_path_factory.mktemp("g") / "m.gguf")
    raw = bytearray(src.read_bytes())
    header = raw.index(b"token_embd.weight") + 200  # metadata and tensor infos
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, header))
        raw[at] = data.draw(st.integers(0, 255))
    src.write_bytes(bytes(raw))
    ours_or_success(load_gguf, src)


GGUF_KEYS = [
    "llama.block_count",
    "llama.context_length",
    "llama.embedding_length",
    "llama.feed_forward_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.attention.layer_norm_rms_epsilon",
    "llama.rope.freq_base",
    "llama.rope.dimension_count",
    "llama.attention.key_length",
    "llama.rope.scaling.type",
    "llama.rope.scaling.factor",
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.chat_template",
    "general.architecture",
    "llama.attention.sliding_window",
]


def gguf_values():
    from gguf import GGUFValueType as T

    special = [(float("inf"), T.FLOAT32, None), (float("nan"), T.FLOAT32, None),
               (0.5, T.FLOAT32, None), (True, T.BOOL, None), ("\u00bf", T.STRING, None),
               ("ab", T.STRING, None), (["a"], T.ARRAY, T.STRING), ([3], T.ARRAY, T.INT32)]  # fmt: skip
    return st.one_of(
        st.sampled_from(special),
        st.integers(0, 2**32 - 1).map(lambda v: (v, T.UINT32, None)),
        st.integers(-(2**40), -1).map(lambda v: (v, T.INT64, None)),
        st.sampled_from([0, 1, 2, 3, 7, 16, 10**6]).map(lambda v: (v, T.UINT32, None)),
        st.floats(width=32).map(lambda v: (v, T.FLOAT32, None)),
        (st.text(max_size=8) | st.sampled_from(["llama", "gpt2", "yarn", "{{ bos_token }}"])).map(
            lambda v: (v, T.STRING, None)
        ),
        st.lists(st.text(max_size=4), min_size=1, max_size=4).map(lambda v: (v, T.ARRAY, T.STRING)),
        st.lists(st.integers(-5, 300), min_size=1, max_size=4).map(lambda v: (v, T.ARRAY, T.INT32)),
        st.just(None),  # the key left out
    )


@FUZZ
@given(st.data())
def test_gguf_metadata_values(tmp_path_factory, data):
    """Typed values in a GGUF's metadata, then a chat prompt answered: a merges string, a
    template of no string or of text outside the vocabulary crashed past the loader."""
    import torch

    from offload import Runtime

    keys = data.draw(st.lists(st.sampled_from(GGUF_KEYS), min_size=1, max_size=3, unique=True))
    metadata = {key: data.draw(gguf_values()) for key in keys}
    path = write_gguf(tmp_path_factory.mktemp("g") / "m.gguf", metadata=metadata,
                      template="{% for m in messages %}{{ m.content }}{% endfor %}")  # fmt: skip

    def answer():
        rt = Runtime(load_gguf(path), RuntimeConfig(), torch.device("cpu"))
        try:
            return rt.generate([{"role": "user", "content": "hi ab"}], max_new_tokens=2)
        finally:
            rt.close()

    ours_or_success(answer)


@pytest.mark.parametrize("merge", [b"\xff\xfe b", b"\xc3"])
def test_gguf_with_invalid_utf8_merges(tmp_path, merge):
    src = write_gguf(tmp_path / "m.gguf", merges=("a b",))
    raw = src.read_bytes().replace(b"a b", merge[:3].ljust(3, b" "), 1)
    src.write_bytes(raw)
    err = ours_or_success(load_gguf, src)
    assert isinstance(err, OffloadError)


# -- sessions ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_session(tiny_hf, tmp_path_factory):
    from offload import Runtime
    from tests.conftest import filler_text

    rt = Runtime.from_pretrained(tiny_hf, dtype="float32", mode="sparse", sink=4, window=16,
                                 retrieved=8, dense_layers=1)  # fmt: skip
    rt.load_document(filler_text(40, seed=1))
    path = tmp_path_factory.mktemp("s") / "s"
    rt.save_session(path)
    return rt, path


def mutated_copy(src, dst, change):
    import shutil

    from storage.session import open_session

    shutil.copytree(src, dst, symlinks=True)
    rewrite_manifest(open_session(dst), change)
    return dst


def paths_in(m):
    out = [()]
    stack = [((), m)]
    while stack:
        where, v = stack.pop()
        items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        for k, child in items:
            if where[:1] == ("token_ids",) or len(where) > 4:
                continue
            out.append((*where, k))
            stack.append(((*where, k), child))
    return out


@FUZZ
@given(st.data())
def test_session_manifest_fields(saved_session, tmp_path_factory, data):
    from storage.session import open_session

    rt, path = saved_session
    m0 = json.loads((open_session(path).version_dir / "manifest.json").read_text())
    m0.pop("manifest_sha256")
    where = data.draw(st.sampled_from(sorted(paths_in(m0)[1:], key=repr)))
    action = data.draw(st.sampled_from(["set", "drop"]))
    value = data.draw(json_values)

    def change(m):
        parent = m
        for k in where[:-1]:
            parent = parent[k]
        if action == "drop" and isinstance(parent, dict):
            parent.pop(where[-1])
        else:
            parent[where[-1]] = value

    dst = mutated_copy(path, tmp_path_factory.mktemp("f") / "s", change)
    from offload import Runtime

    result = ours_or_success(Runtime.load_session, dst, model=rt)
    if not isinstance(result, Exception):
        ours_or_success(result.ask, "seven", max_new_tokens=2)


@FUZZ
@given(st.binary(max_size=80))
def test_session_current_bytes(saved_session, tmp_path_factory, raw):
    import shutil

    from storage.session import open_session

    _, path = saved_session
    dst = tmp_path_factory.mktemp("c") / "s"
    shutil.copytree(path, dst, symlinks=True)
    (dst / "CURRENT").write_bytes(raw)
    ours_or_success(open_session, dst)


# -- chat templates and prompts ---------------------------------------------------------

HOSTILE_TEMPLATES = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "10 GB string": "{{ 'x' * 10000000000 }}",
    "doubling": "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "wide filter": "{{ 'x'|center(1000000000) }}",
    "wide method": "{{ 'x'.ljust(1000000000) }}",
    "much output": "{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}",
    "recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "power": "{{ 7 ** 100000000 }}",
}  # fmt: skip


@pytest.mark.parametrize("name", HOSTILE_TEMPLATES)
def test_hostile_chat_templates_are_bounded(tiny_hf, monkeypatch, name):
    import dataclasses

    import offload.templates
    from offload.tokenizer import Tokenizer

    monkeypatch.setattr(offload.templates, "RENDER_SECONDS", 0.5)
    tok = Tokenizer.from_hf_dir(tiny_hf)
    tok = dataclasses.replace(tok, chat_template=HOSTILE_TEMPLATES[name])
    err = ours_or_success(tok.apply_chat_template, [{"role": "user", "content": "hi"}])
    assert isinstance(err, OffloadError) and "chat template" in str(err)


def test_a_prompt_that_is_not_utf8_is_named(tiny_hf):
    from click.testing import CliRunner

    from cli.main import main
    from offload import Runtime

    rt = Runtime.from_pretrained(tiny_hf, dtype="float32")
    with pytest.raises(OffloadError, match="not valid UTF-8"):
        rt.generate("caf\udce9", max_new_tokens=2)
    r = CliRunner().invoke(main, ["generate", "-m", str(tiny_hf), "-n", "2", "caf\udce9"])
    assert r.exit_code == 2 and "not valid UTF-8" in r.output


@pytest.fixture(scope="module")
def api_runtime(tiny_hf):
    from offload import Runtime

    # (a case without max_new_tokens takes the config's: a few tokens, not 256, so that
    # such a case stays within its deadline in Triton's interpreter under emulated CUDA,
    # where 256 tokens took 40 s)
    rt = Runtime.from_pretrained(tiny_hf, dtype="float32", **{"generation.max_new_tokens": 4})
    yield rt
    rt.close()


SAMPLING = ["temperature", "top_k", "top_p", "min_p", "seed", "stop", "repeat_penalty",
            "repeat_last_n", "prefill_chunk", "unknown"]  # fmt: skip


@FUZZ
@given(call=st.sampled_from(["generate", "stream", "send", "logits", "load_document", "ask"]),
       arg=json_values | st.text(max_size=12), max_new=st.none() | st.integers(-2, 3) | json_values,
       sampling=st.dictionaries(st.sampled_from(SAMPLING), json_values, max_size=2))  # fmt: skip
def test_python_api_arguments(api_runtime, call, arg, max_new, sampling):
    """The Runtime's calls with arguments of any kind: logits(None), load_document(None)
    and a chat turn's max_new_tokens of a list raised from deep inside."""
    rt = api_runtime
    calls = {
        "generate": lambda: rt.generate(arg, max_new, **sampling),
        "stream": lambda: list(rt.stream(arg, max_new, **sampling)),
        "send": lambda: rt.chat().send(arg, max_new, **sampling),
        "logits": lambda: rt.logits(arg),
        "load_document": lambda: rt.load_document(arg),
        "ask": lambda: rt.ask(arg, max_new, **sampling),
    }
    ours_or_success(calls[call])
