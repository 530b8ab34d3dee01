"""Bad input: one clear error of a project type that names the problem."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGUFValueType as T

from cli.main import main
from offload import (
    ConfigError,
    ContextLengthError,
    DeviceMemoryError,
    ModelLoadError,
    OffloadError,
    Runtime,
)
from tests.conftest import embedded_gguf_path
from tests.gguf_files import write_gguf


def test_missing_path():
    with pytest.raises(ModelLoadError, match="model not found: /no/such/model"):
        Runtime.from_pretrained("/no/such/model")


def test_directory_without_weights(tmp_path, tiny_dirs):
    src, _ = tiny_dirs["llama-gqa-untied"]
    shutil.copy(src / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="no safetensors weights.*pytorch_model.bin"):
        Runtime.from_pretrained(tmp_path)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        Runtime.from_pretrained(tmp_path)


def test_unsupported_architecture(tmp_path, tiny_dirs):
    src, _ = tiny_dirs["llama-gqa-untied"]
    shutil.copytree(src, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported model_type 'gpt2'"):
        Runtime.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("keep", [100, 4096, 20_000_000])
def test_truncated_gguf(tmp_path, keep):
    bad = tmp_path / "cut.gguf"
    with open(embedded_gguf_path(), "rb") as f:
        bad.write_bytes(f.read(keep))
    with pytest.raises(ModelLoadError, match="cut.gguf"):
        Runtime.from_pretrained(bad)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"dim_key": False}, "m.gguf: GGUF metadata key llama.embedding_length is missing"),
        ({"tokenizer": "bert"}, "m.gguf: tokenizer type 'bert' is not supported yet "
                                "\\(byte-level BPE 'gpt2' and SentencePiece BPE 'llama' are\\)"),
        # (values of the wrong kind: each crashed past the loader before)
        ({"metadata": {"llama.attention.key_length": (float("inf"), T.FLOAT32)}},
         "m.gguf: llama.attention.key_length must be a whole number, got inf"),
        ({"metadata": {"llama.block_count": (True, T.BOOL)}},
         "m.gguf: llama.block_count must be a whole number, got True"),
        ({"metadata": {"tokenizer.ggml.merges": ("a b", T.STRING)}},
         "m.gguf: tokenizer.ggml.merges must be a list of merges, two tokens each"),
        ({"metadata": {"tokenizer.chat_template": (0.5, T.FLOAT32)}},
         "m.gguf: chat_template must be a template's text, got float"),
    ],
)  # fmt: skip
def test_a_gguf_the_loader_cannot_take_is_named(tmp_path, kw, message):
    """A GGUF without a key the model needs, or with a tokenizer of a kind the runtime
    does not build (WordPiece): one error naming the file and what is missing or not
    supported."""
    path = write_gguf(tmp_path / "m.gguf", **kw)
    with pytest.raises(ModelLoadError, match=message):
        Runtime.from_pretrained(path)
    result = CliRunner().invoke(main, ["generate", "-m", str(path), "hi"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_a_prompt_of_no_tokens_is_named(tmp_path):
    """A chat template that writes only text the vocabulary has no token for: the prompt
    is empty (it reached the prefill's assertion before)."""
    rt = Runtime.from_pretrained(write_gguf(tmp_path / "m.gguf", template="\u00bf"))
    with pytest.raises(OffloadError, match="the prompt is empty: its text encodes to no tokens"):
        rt.generate("hi", max_new_tokens=2)
    with pytest.raises(OffloadError, match="the conversation is empty: its text encodes"):
        rt.chat().send("hi", max_new_tokens=2)


def test_not_a_model_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(ModelLoadError, match="notes.txt: not an HF model directory"):
        Runtime.from_pretrained(p)


def test_prompt_longer_than_context(tmp_path):
    from tests.conftest import make_tiny_hf_model

    make_tiny_hf_model(tmp_path / "short", "llama-gqa-untied", max_positions=64)
    rt = Runtime.from_pretrained(tmp_path / "short", dtype="float32")
    with pytest.raises(ContextLengthError, match=r"\d+ tokens; the model's context window is 64"):
        rt.generate("the river " * 100)
    conv = rt.chat()
    with pytest.raises(ContextLengthError, match="does not fit even with"):
        conv.send("the river " * 100)
    with pytest.raises(ContextLengthError, match="the document is \\d+ tokens"):
        rt.load_document("the river " * 100)
    # Generation that reaches the window stops with finish_reason "length".
    steps = list(rt.stream("seven", max_new_tokens=500))
    assert steps[-1].finish_reason == "length"
    assert steps[-1].context_tokens == 63


def test_bad_overrides():
    with pytest.raises(ConfigError, match="unknown config key 'dtyp'"):
        Runtime.from_pretrained("smollm2", dtyp="float32")
    with pytest.raises(ConfigError, match="model.dtype: 'float8' is not one of"):
        Runtime.from_pretrained("smollm2", dtype="float8")


def test_unknown_sampling_option(tiny_dirs):
    rt = Runtime.from_pretrained(tiny_dirs["llama-gqa-untied"][0], dtype="float32")
    with pytest.raises(ConfigError, match="unknown sampling option.*tempreature"):
        rt.generate("x", tempreature=0.5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "-m", "/no/such/dir", "hi"], "model not found: /no/such/dir"),
        (["generate", "--set", "dtype=int3", "hi"], "model.dtype: 'int3'"),
        (["generate", "--set", "nonsense", "hi"], "--set expects KEY=VALUE"),
        (["generate", "--config", "/no/such.toml", "hi"], "config file not found"),
        (["info", "-m", "/no/such/dir"], "model not found"),
    ],
)
def test_cli_errors_are_one_line_exit_2(args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_attention_heads": 0}, "num_heads must be a positive integer, got 0"),
        ({"hidden_size": -64}, "dim must be a positive integer, got -64"),
        ({"num_hidden_layers": 0}, "num_layers must be a positive integer"),
        ({"max_position_embeddings": 0}, "max_seq_len must be a positive integer"),
        ({"rms_norm_eps": float("nan")}, "norm_eps must be a finite number above 0"),
        ({"rope_scaling": "llama3"}, "invalid value"),
        ({"intermediate_size": [96]}, r"intermediate_size must be a whole number, got \[96\]"),
        # (JSON's true is no count: int(True) made a head of one dimension, and a crash)
        ({"head_dim": True}, "head_dim must be a whole number, got True"),
        ({"num_hidden_layers": False}, "num_hidden_layers must be a whole number, got False"),
        ({"vocab_size": 320.5}, "vocab_size must be a whole number, got 320.5"),
        ({"head_dim": 3}, "head_dim must be even"),
    ],
)
def test_bad_model_config_values_are_named(tmp_path, change, message):
    from offload.model_args import ModelArgs

    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 320}  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        ModelArgs.from_hf_config({**cfg, **change})
    with pytest.raises(ConfigError, match="expected a JSON object, got list"):
        ModelArgs.from_hf_config([cfg])


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("temperature", float("nan"), "generation.temperature: must be a finite number >= 0"),
        ("temperature", float("inf"), "generation.temperature: must be a finite number >= 0"),
        ("top_p", float("nan"), "generation.top_p: must be in"),
        ("seed", 10**23, r"generation.seed: must be in \[0, 2\*\*63\)"),
    ],
)
def test_bad_sampling_values_are_named(key, value, message):
    from offload.config import RuntimeConfig

    with pytest.raises(ConfigError, match=message):
        RuntimeConfig().replace(**{key: value})


def _oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 ...")


def test_running_out_of_gpu_memory_mid_request_is_one_error_and_leaves_a_clean_runtime(
    tiny_dirs,
):
    """(Raised here by a layer; on a GPU by torch's allocator.) The tokens the request
    had not finished are dropped, the first layer's too, which held more than the cache
    had counted (a prompt that reuses nothing: `truncate(0)` alone kept them, and every
    later answer was garbage), so the next request runs as on a fresh runtime."""
    rt = Runtime.from_pretrained(tiny_dirs["llama-gqa-untied"][0], dtype="float32")
    want = rt.generate("ab cd", max_new_tokens=4, temperature=0)
    layer = rt.model.layers[1]
    layer.forward = _oom
    with pytest.raises(DeviceMemoryError, match="ran out of memory during this request") as e:
        rt.generate("ab cd ef", max_new_tokens=4)
    assert "offload plan" in str(e.value) and "Tried to allocate 2.00 GiB" in str(e.value)
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError)
    with pytest.raises(DeviceMemoryError, match="reading the document"):
        rt.load_document("a document " * 20)
    assert rt.document is None
    del layer.forward
    assert rt.generate("ab cd", max_new_tokens=4, temperature=0) == want


def test_running_out_of_gpu_memory_while_loading_is_one_line_exit_2(tiny_dirs, monkeypatch):
    monkeypatch.setattr("offload.runtime.load", _oom)
    model = str(tiny_dirs["llama-gqa-untied"][0])
    result = CliRunner().invoke(main, ["generate", "-m", model, "hi"])
    assert result.exit_code == 2, result.output
    assert "the GPU ran out of memory loading the model (CUDA out of memory." in result.output
    assert "Traceback" not in result.output and result.output.strip().count("\n") == 0


def _edit_weights(tmp_path, tiny_dirs, edit):
    """A copy of a tiny model whose safetensors tensors `edit` changed (dict in place)."""
    from safetensors.torch import load_file, save_file

    src, _ = tiny_dirs["llama-gqa-untied"]
    shutil.copytree(src, tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    return tmp_path / "m"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}),
         r"model.safetensors: unexpected tensor 'model.layers.0.mlp.extra.weight'"),
        (lambda t: t.pop("model.norm.weight"),
         r"weights do not match the config: missing tensors \['norm.weight'\]"),
        (lambda t: t.update({"model.norm.weight": torch.zeros(3)}),
         r"tensor norm.weight has shape \(3,\), config implies \(64,\)"),
    ],
)  # fmt: skip
def test_weights_that_do_not_fit_the_model_are_named(tmp_path, tiny_dirs, edit, message):
    with pytest.raises(ModelLoadError, match=message):
        Runtime.from_pretrained(_edit_weights(tmp_path, tiny_dirs, edit))


def test_a_damaged_safetensors_file_is_named(tmp_path, tiny_dirs):
    model = _edit_weights(tmp_path, tiny_dirs, lambda t: None)
    path = model / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="model.safetensors: cannot read safetensors file"):
        Runtime.from_pretrained(model)


def test_documents_that_cannot_be_ingested_are_named(tmp_path, tiny_dirs):
    """`offload ingest` and `/file`: a folder, an empty file, a file that is not UTF-8
    text; and `offload ask` on a saved chat (not a document). One line each, exit 2."""
    model = ["-m", str(tiny_dirs["llama-gqa-untied"][0]), "--set", "dtype=float32"]
    (tmp_path / "empty.md").write_text(" \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    runner = CliRunner()
    for name, message in [
        (".", f"not a file: {tmp_path}"),
        ("empty.md", "empty.md: the document is empty"),
        ("latin1.txt", "latin1.txt: not UTF-8 text (offload reads text and markdown files)"),
    ]:
        r = runner.invoke(
            main, ["ingest", str(tmp_path / name), "--session", str(tmp_path / "s"), *model]
        )
        assert r.exit_code == 2 and message in r.output.replace("\n", ""), r.output
        assert not (tmp_path / "s").exists()
    r = runner.invoke(
        main, ["chat", *model, "-n", "1"], input=f"hi\n/save {tmp_path / 'c'}\n/exit\n"
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["ask", "--session", str(tmp_path / "c"), *model, "what?"])
    assert r.exit_code == 2 and "is a chat session, not a document" in r.output.replace("\n", "")
    assert "Traceback" not in r.output


def test_python_api_misuse_is_one_error_naming_it(tiny_dirs):
    from offload import OffloadError

    path = tiny_dirs["llama-gqa-untied"][0]
    rt = Runtime.from_pretrained(path, dtype="float32")
    V, N = rt.args.vocab_size, rt.args.max_seq_len
    with pytest.raises(ConfigError, match=r"stop: expected strings, got \[3\]"):
        rt.generate("x", stop=[3])
    with pytest.raises(OffloadError, match=r"logits\(\) needs at least one token id"):
        rt.logits([])
    with pytest.raises(OffloadError, match=rf"token id {V} is outside the vocabulary \[0, {V}\)"):
        rt.logits([1, V])
    with pytest.raises(ContextLengthError, match=f"{N + 1} tokens exceed .* window of {N}"):
        rt.logits([1] * (N + 1))
    with pytest.raises(OffloadError, match="no document loaded: call load_document()"):
        rt.ask("what?")
    with pytest.raises(OffloadError, match="the document is empty"):
        rt.load_document(" \n ")
    # (each of these raised from deep inside before: torch, str.strip, a comparison)
    for wrong in (None, "12", [1.5], [True], torch.tensor([1.0])):
        with pytest.raises(OffloadError, match=r"logits\(\) takes token ids: a list of ints"):
            rt.logits(wrong)
    assert rt.logits(torch.tensor([1, 2])).shape == rt.logits(np.array([1, 2])).shape == (2, V)
    with pytest.raises(OffloadError, match=r"logits\(\) takes token ids: a list of ints"):
        rt.logits(np.array([1.0, 2.0]))
    with pytest.raises(OffloadError, match="the document must be a string, not NoneType"):
        rt.load_document(None)
    with pytest.raises(OffloadError, match="the system prompt must be a string, not int"):
        rt.load_document("text", system=3)
    with pytest.raises(ConfigError, match="generation.max_new_tokens"):
        rt.chat().send("hi", max_new_tokens=[2])
    assert rt.document is None
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="model.device: 'cuda' requested but CUDA is not"):
            Runtime.from_pretrained(path, device="cuda")


def test_a_closed_runtime_says_so(tiny_dirs, tmp_path):
    """Closed (`close`, a `with` block), a runtime's requests and saves are one error
    naming that, not what its released buffers would raise (a `zip` deep inside), and a
    save writes nothing; a chat made after, or handed the document before, has its own
    cache and goes on."""
    from offload import OffloadError

    rt = Runtime.from_pretrained(tiny_dirs["llama-gqa-untied"][0], dtype="float32")
    rt.load_document("ab cd ef gh")
    about = rt.chat_about_document()
    rt.generate("ab", max_new_tokens=2)
    with rt:
        pass
    rt.close()  # (again: nothing)
    closed = "this KV cache was closed .* make a new Runtime or chat"
    for use in (
        lambda: rt.generate("ab", max_new_tokens=2),
        lambda: rt.save_session(tmp_path / "s"),
        lambda: rt.load_document("ij"),
    ):
        with pytest.raises(OffloadError, match=closed):
            use()
    assert not (tmp_path / "s").exists()
    later = rt.chat()
    for chat in (about, later):
        chat.send("kl", max_new_tokens=2)
        assert chat.context_tokens > 0 and chat.messages[-1]["role"] == "assistant"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "tokenizer.json").unlink(), r"m: no tokenizer.json"),
        (lambda d: (d / "tokenizer.json").write_text("{not json"),
         r"tokenizer.json: cannot load tokenizer"),
        (lambda d: (d / "tokenizer_config.json").write_text("{not json"),
         r"tokenizer_config.json: cannot read"),
    ],
)  # fmt: skip
def test_a_missing_or_damaged_tokenizer_is_named(tmp_path, tiny_dirs, damage, message):
    shutil.copytree(tiny_dirs["llama-gqa-untied"][0], tmp_path / "m")
    damage(tmp_path / "m")
    with pytest.raises(ModelLoadError, match=message):
        Runtime.from_pretrained(tmp_path / "m")


def test_chat_templates_come_from_a_named_list_or_a_jinja_file(tmp_path, tiny_dirs):
    """tokenizer_config.json may list named templates (the "default" one is used), or a
    model may keep its template in chat_template.jinja."""
    src = tiny_dirs["llama-gqa-untied"][0]
    default = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    for name in ("named", "jinja"):
        d = tmp_path / name
        shutil.copytree(src, d)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        if name == "named":
            cfg["chat_template"] = [{"name": "tool_use", "template": "TOOLS"},
                                    {"name": "default", "template": default}]  # fmt: skip
        else:
            del cfg["chat_template"]
            (d / "chat_template.jinja").write_text(default)
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        rt = Runtime.from_pretrained(d, dtype="float32")
        assert rt.tokenizer.chat_template == default, name


@pytest.mark.parametrize(
    "file, content, message",
    [
        ("generation_config.json", {"eos_token_id": "</s>"},
         "eos_token_id must be a whole number, got '</s>'"),
        ("generation_config.json", {"eos_token_id": [2, True]},
         "eos_token_id must be a whole number, got True"),
        ("tokenizer_config.json", {"chat_template": [{"name": "default"}]},
         "chat_template: a list of templates must hold objects with a name and a template"),
        ("tokenizer_config.json", {"chat_template": 5}, "chat_template must be a template's text"),
        ("tokenizer_config.json", {"eos_token": ["</s>"]}, "eos_token must be a token's text"),
        ("tokenizer_config.json", [], "expected a JSON object, got list"),
    ],
)  # fmt: skip
def test_bad_tokenizer_config_values_are_named(tmp_path, tiny_dirs, file, content, message):
    from offload.tokenizer import Tokenizer

    src = tiny_dirs["llama-gqa-untied"][0]
    (tmp_path / "tokenizer.json").symlink_to(src / "tokenizer.json")
    (tmp_path / file).write_text(json.dumps(content))
    with pytest.raises(ModelLoadError, match=re.escape(f"{tmp_path / file}: {message}")):
        Tokenizer.from_hf_dir(tmp_path)


def test_messages_that_are_not_a_conversation_are_named(tiny_dirs):
    from offload import OffloadError

    rt = Runtime.from_pretrained(tiny_dirs["llama-gqa-untied"][0], dtype="float32")
    with pytest.raises(OffloadError, match=r"messages must be a non-empty list of \{'role'"):
        rt.generate([])
    with pytest.raises(OffloadError, match=r"messages\[1\] must be a dict with string 'role'"):
        rt.generate([{"role": "user", "content": "hi"}, {"role": "user", "content": 3}])
    with pytest.raises(OffloadError, match=r"a prompt is a string or a list of .* not bytes"):
        rt.generate(b"hi")


def test_a_spill_folder_that_cannot_be_made_is_named(tmp_path, tiny_dirs):
    """kv.disk_dir under a file: the tiered cache is refused with the folder named (a
    config error: nothing was written)."""
    (tmp_path / "a-file").write_text("x")
    bad = tmp_path / "a-file" / "kv"
    with pytest.raises(ConfigError, match=f"disk tier: cannot create directory {bad}/cache-"):
        rt = Runtime.from_pretrained(tiny_dirs["llama-gqa-untied"][0], dtype="float32",
                                     mode="dense", disk_dir=str(bad))  # fmt: skip
        rt.generate("seven stones", max_new_tokens=2)


def test_a_path_the_file_system_refuses_is_named(tmp_path):
    """A name past the file system's length limit, or holding a NUL character: the
    session, the document or the chat's /file and /save name it, where an OSError (a
    ValueError for the NUL) came out of pathlib before."""
    from offload.documents import read_documents
    from storage.session import SessionError

    model = write_gguf(tmp_path / "m.gguf")
    long = tmp_path / ("y" * 300)
    rt = Runtime.from_pretrained(model)
    rt.load_document("seven stones")
    with pytest.raises(SessionError, match="File name too long"):
        rt.save_session(long)
    with pytest.raises(SessionError, match=f"session path {long}: File name too long"):
        Runtime.load_session(long, model=model)
    with pytest.raises(OffloadError, match=f"cannot read {long}: File name too long"):
        read_documents([long])
    with pytest.raises(SessionError, match="a path cannot hold a NUL character"):
        rt.save_session(tmp_path / "a\x00b")
    r = CliRunner().invoke(main, ["chat", "-m", str(model), "-n", "1"],
                           input=f"/file {long}\n/save {long}\n/exit\n")  # fmt: skip
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert "cannot read" in r.output and "File name too long" in r.output.replace("\n", "")
