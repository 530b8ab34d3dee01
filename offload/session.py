"""Saving and loading a runtime's KV state as a session directory (storage/session.py).

What is checked on load, each refusal naming what differs:
  - the model fingerprint (config + checkpoint bytes) and the tokenizer hash
  - the KV layout (layers, heads, head dim, dtype, chunk size, summary bits)
The selection settings may differ: the saved cluster index is reused when its
settings match the loading config's, and rebuilt otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from offload import caches
from offload.config import DEFAULT_MODEL, RuntimeConfig
from offload.errors import ConfigError, OffloadError
from storage.errors import SessionExistsError
from storage.session import SessionContents, SessionError, open_session, save_session

if TYPE_CHECKING:
    from offload.conversation import KVState
    from offload.kvcache import KVCache
    from offload.runtime import Runtime
    from storage.layout import KVLayout

INDEX_KEYS = ("cluster_size", "cluster_iters", "cluster_segment", "selector")


@dataclasses.dataclass(frozen=True)
class SessionRef:
    """The session an object (a runtime, a conversation) was loaded from or last saved
    to: its directory, resolved, and the version it read or wrote there. A save there
    continues it (needs no `replace`) while that version is still the session's."""

    path: Path
    version: str


def save_state(
    rt: Runtime, state: KVState, path: str | Path, kind: str, extra: dict,
    replace: bool = False, own: SessionRef | None = None,
) -> tuple[dict, SessionRef]:  # fmt: skip
    """Write `state` (a cache and the ids it holds) with the runtime's identity; return
    figures and the session written. A session already at `path` is replaced only with
    `replace`, or where it is `own` (the saver's, as the saver left it)."""
    cache = state.cache
    cache.check_open()
    if not state.ids:  # (a session holds at least one token: its load would refuse it)
        raise OffloadError(
            f"nothing to save to {path}: this conversation holds no KV yet (no turn has run)"
            if kind == "chat"
            else f"nothing to save to {path}: this runtime holds no KV (no prompt has run on "
            "it, or its KV went to a conversation: save that)"
        )
    assert cache.num_tokens == len(state.ids), (cache.num_tokens, len(state.ids))
    t = time.perf_counter()
    path = Path(path)
    continues = own.version if own is not None and own.path == session_dir(path) else None
    if cache.store is None and caches.dense_in_host_memory(rt):
        cache.outgrow(cache)  # (a layer at a time, as it would past the budget)
    if cache.store is None:  # the device cache: sessions are written from the tiered store
        copy = _tiered_copy(rt, cache)
        try:
            return _save(rt, copy, state.ids, path, kind, extra, replace, continues, t)
        finally:
            copy.close()
    return _save(rt, cache, state.ids, path, kind, extra, replace, continues, t)


def _save(rt: Runtime, cache: KVCache, ids: list[int], path: Path, kind: str, extra: dict,
          replace: bool, continues: str | None, t) -> tuple[dict, SessionRef]:  # fmt: skip
    index, index_meta = _index_state(cache.policy)
    meta = {
        "kind": kind,
        "model": {
            "fingerprint": rt.loaded.fingerprint,
            "source": str(rt.loaded.source),
            "arch": rt.args.arch,
        },
        "tokenizer_sha256": rt.tokenizer.fingerprint,
        "config": rt.config.to_dict(),
        **extra,
    }
    contents = SessionContents(ids, meta, index, index_meta)
    try:
        saved = save_session(path, cache.store, contents, replace, continues)
    except SessionExistsError as e:
        raise e.hinted(": pass replace=True to replace it") from None
    info = {"tokens": len(ids), "bytes": saved.bytes, "seconds": time.perf_counter() - t}
    return info, SessionRef(session_dir(path), saved.version)


def _index_state(policy) -> tuple[dict[str, torch.Tensor], dict]:
    from retrieval import ClusterIndex

    tensors, meta = {}, {"layers": []}
    for layer, sel in enumerate(policy.selectors):
        if isinstance(sel, ClusterIndex) and sel.indexed_tokens:
            for name, t in sel.state_tensors().items():
                tensors[f"L{layer}.{name}"] = t.contiguous()
            meta["layers"].append({"layer": layer, **sel.state_meta()})
    meta["settings"] = {k: getattr(policy.selection, k) for k in INDEX_KEYS}
    return tensors, meta


def load_state(
    path: str | Path,
    config: str | Path | RuntimeConfig | None = None,
    model=None,
    **overrides,
) -> Runtime:
    """A Runtime whose cache holds the saved session (see `Runtime.load_session`)."""
    from offload.runtime import Runtime

    # The small files are hashed on threads while the model and the files load; nothing
    # read from them is used before `verified()` (storage/session.py).
    session = open_session(Path(path), verify_later=True)
    try:
        m = session.manifest
        if config is None:
            try:
                config = RuntimeConfig.from_dict(
                    _without_machine_keys(m["config"]),
                    source=f"{session.version_dir / 'manifest.json'}",
                )
            except ConfigError as e:
                raise SessionError(f"the session's saved config is not usable: {e}") from None
        cfg = config if isinstance(config, RuntimeConfig) else RuntimeConfig.from_toml(config)
        cfg = cfg.replace(**overrides) if overrides else cfg
        # What the config alone sets of the layout is checked before a model is loaded
        # (another dtype would convert and cache the model for nothing).
        kv = cfg.kv
        configured = dataclasses.replace(
            session.layout,
            dtype=cfg.model.dtype,
            chunk_size=kv.chunk_size,
            summary_bits=kv.summary_bits,
        )
        _check_layout(session, configured)
        if isinstance(model, Runtime):
            rt = Runtime(model.loaded, cfg, model.device)
            rt.cores = model.cores
        else:
            # The user names the model (the default one otherwise): a session never chooses
            # which file is opened; its fingerprint must match what is loaded. It does say
            # how the file's linears run where the config leaves that to `auto`.
            rt = _in_the_sessions_form(model or DEFAULT_MODEL, cfg, session)
        _check_compatible(rt, session)
        # (the first request's own part alone is then encoded: `Prompts.ahead`)
        rt.prompts.ahead(m.get("document"), m.get("messages"))
        _read(rt, session, rt._state)
    except BaseException:
        session.verified()  # a damaged file is named as such, whatever failed on it first
        raise
    rt.session = {k: m[k] for k in ("kind", "document", "messages", "pinned_messages") if k in m}
    rt.session["path"] = str(session.path)
    rt.session_ref = rt.document_ref = SessionRef(
        session_dir(session.path), session.version_dir.name
    )
    return rt


def _read(rt: Runtime, session, state: KVState) -> None:
    """Put the saved KV and its ids into `state`, whose cache is a new one of `rt`'s.

    A device cache is loaded through a tiered one: held in host memory only where the
    session fits the device cache (read into it below, layer by layer: the device then
    holds that KV alone), kept where it does not, and kept where the device cache is in
    host memory (a CPU's "auto"): the tiered cache attends in place to what its threads
    read in meanwhile (a load into the dense cache would wait for all of it)."""
    device_cache = state.cache
    dense = device_cache.store is None
    num_tokens = session.manifest["num_tokens"]
    caches.check_device_room(rt, device_cache, num_tokens, f"session {session.path}")
    fits = dense and device_cache.fits(num_tokens) and not caches.dense_in_host_memory(rt)
    if dense:
        cache = caches.host_cache(rt) if fits else rt.new_cache(tiered=True)
    else:
        cache = device_cache
    files = [
        # absolute: the disk tier joins a relative name onto its own directory
        (f["layer"], (session.version_dir / f["name"]).absolute(), f["chunks"], f["crc32"])
        for f in session.chunk_files()
    ]
    session.hold_abstracts()  # (read when first needed: `SavedAbstracts`)
    cache.store.adopt(num_tokens, files, session.device_tensors(), session.abstract_tensors)
    cache.num_tokens = num_tokens
    try:
        _restore_index(cache.policy, *session.index(), num_tokens)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SessionError(
            f"{session.version_dir / 'index.safetensors'}: the index is invalid ({e})"
        ) from None
    session.verified()
    if fits:
        kept = _dense_copy(rt, cache)
        cache.close()
    else:  # the KV stays in the tiers: read it in while the user asks
        kept = cache
        cache.store.warm()
        cache.preload_index()
        # (a process forked from this one reads the session again: `KVState.adopt`)
        where = session_dir(session.path), session.version_dir.name
        cache.reread = functools.partial(_reread, rt, *where)
    state.cache, state.ids = kept, list(session.token_ids)
    if dense:
        device_cache.close()
    # How the saved KV was computed is not recorded: any prefix of it may be reused.
    state.computed(0, len(state.ids), 1)


def _reread(rt: Runtime, path: Path, version: str, state: KVState) -> None:
    """`_read` again, in a process forked from the one that read the session (its tiered
    cache's threads and files are that process's): where the session is still the
    version read then; else SessionError."""
    session = open_session(path, verify_later=True)
    try:
        if session.version_dir.name != version:
            raise SessionError(f"{path} was saved again since it was loaded")
        _read(rt, session, state)
    except BaseException:
        session.verified()
        raise


def read_back(rt: Runtime, state: KVState, ref: SessionRef) -> None:
    """`state`'s cache replaced by the session `ref` names, read again from its files
    (`Runtime._read_back`); where that is no longer the session's version, SessionError,
    and the state is left empty."""
    state.cache.close()
    state.cache, state.ids, state.passes = rt.new_cache(), [], []
    _reread(rt, ref.path, ref.version, state)


def session_dir(path: str | Path) -> Path:
    """The directory `path` names, as saves compare them (`SessionRef`)."""
    return Path(path).expanduser().resolve()


def _tiered_copy(rt: Runtime, dense: KVCache) -> KVCache:
    """A `caches.host_cache` holding the KV of device cache `dense`, its index built from
    the keys where they are (the device's k-means there), layer by layer."""
    tiered = caches.host_cache(rt)
    T = dense.num_tokens
    for i, layer in enumerate(dense.layers):
        k, v = layer.k.view(), layer.v.view()
        with tiered.store.lock:  # (one layer's KV read back at a time)
            tiered.store.append(i, k.to("cpu"), v.to("cpu"))
        tiered.policy.update_from_keys(tiered.store, i, k)
    tiered.advance(T)
    tiered.finish_prefill()  # (what the layers left: a last partial segment)
    return tiered


def _dense_copy(rt: Runtime, tiered: KVCache) -> KVCache:
    """A device cache holding the KV of `tiered` (a `caches.host_cache`), read layer by
    layer and copied straight into the device buffers (no device temporary)."""
    dense = rt.new_cache()
    T = tiered.num_tokens
    for i, layer in enumerate(dense.layers):
        layer.reserve(T, rt.args.max_seq_len)
        with tiered.store.lock:
            k, v = tiered.store.gather_all(i)
        layer.append(k, v)
        del k, v  # (one layer's host memory at a time)
    dense.advance(T)
    return dense


# Keys that describe the machine a session was made on, not its KV: a loading process
# takes its own (a session must not choose a directory to write, nor this machine's
# memory, threads or device).
MACHINE_KEYS = {"model": ("device", "threads"),
                "kv": ("device_bytes", "host_bytes", "disk_dir", "disk_bytes")}  # fmt: skip


def _without_machine_keys(saved: dict) -> dict:
    out = {name: dict(values) if isinstance(values, dict) else values
           for name, values in saved.items()}  # fmt: skip
    for section, keys in MACHINE_KEYS.items():
        if isinstance(out.get(section), dict):
            for key in keys:
                out[section].pop(key, None)
    return out


def _check_compatible(rt: Runtime, session) -> None:
    m = session.manifest
    where = session.version_dir / "manifest.json"
    saved = m.get("config")
    saved = saved.get("model") if isinstance(saved, dict) else None
    saved_rope = saved.get("rope_scaling", "") if isinstance(saved, dict) else ""
    if m["model"]["fingerprint"] != rt.loaded.fingerprint and saved_rope != rt.loaded.rope:
        raise SessionError(
            f"{where}: the session was made with model.rope_scaling {saved_rope or 'unset'!r} "
            f"(its keys were rotated so); this runtime has {rt.loaded.rope or 'unset'!r}: "
            "leave rope_scaling as the session has it"
        )
    base, _, form = m["model"]["fingerprint"].partition("+")
    ours, _, our_form = rt.loaded.fingerprint.partition("+")
    if base == ours and form != our_form:  # (packed weights give slightly different KV)
        _check_form_runs_here(session, form, rt.device)
        raise SessionError(
            f"{where}: the session was made with the model's linears {form or 'dense'}; "
            f"this runtime runs them {our_form or 'dense'}: set model.weights = "
            f"{form or 'dense'} (--set weights={form or 'dense'})"
        )
    if m["model"]["fingerprint"] != rt.loaded.fingerprint:
        raise SessionError(
            f"{where}: the session was made with another model ({m['model']['source']!r}); "
            f"this runtime has {rt.loaded.source}: name the session's model (-m, model=)"
        )
    if m["tokenizer_sha256"] != rt.tokenizer.fingerprint:
        raise SessionError(f"{where}: the session was made with another tokenizer")
    if m["num_tokens"] > rt.args.max_seq_len:
        raise SessionError(
            f"{where}: {m['num_tokens']} tokens, more than the model's "
            f"{rt.args.max_seq_len}-token context window"
        )
    vocab = rt.args.vocab_size
    if any(t >= vocab for t in m["token_ids"]):
        raise SessionError(f"{where}: token ids outside the model's vocabulary of {vocab}")
    _check_layout(session, rt.layout)


def _in_the_sessions_form(model, cfg: RuntimeConfig, session) -> Runtime:
    """`model` loaded for `session`: where `model.weights` is "auto", its linears run in
    the form that made the session's KV (its fingerprint's; packed weights give slightly
    different KV). `auto` alone decides by the device: a session made on a CPU from a Q4
    GGUF (int4) would be refused on CUDA, where `auto` keeps weights dense that fit, and
    one made there (dense) on a CPU. Such a model is loaded again in the session's form,
    with a note; on the device a session was made on, `auto` gives its form at once."""
    from offload.backend import pick_device
    from offload.runtime import Runtime

    base, _, form = session.manifest["model"]["fingerprint"].partition("+")
    form = form or "dense"
    if cfg.model.weights == "auto":
        _check_form_runs_here(session, form, pick_device(cfg.model.device))
    rt = Runtime.from_pretrained(model, config=cfg)
    alone = rt.loaded.model.weights
    other_model = rt.loaded.fingerprint.partition("+")[0] != base  # (refused after)
    if cfg.model.weights != "auto" or alone == form or other_model:
        return rt
    rt.close()
    del rt  # (its weights go before the others load)
    rt = Runtime.from_pretrained(model, config=cfg.replace(weights=form))
    warnings.warn(
        f"model.weights = 'auto': the session's KV was made with the model's linears "
        f"{form}, so they run {form} here ('auto' runs them {alone} on "
        f"{rt.device.type} otherwise)",
        stacklevel=1,
    )
    return rt


def _check_form_runs_here(session, form: str, device: torch.device) -> None:
    if form == "int8" and device.type != "cpu":
        raise SessionError(
            f"{session.version_dir / 'manifest.json'}: the session was made with the "
            f"model's linears int8, which run on a CPU only (torch's kernels), not on "
            f"{device.type}: load it on a CPU (--set device=cpu)"
        )


def _check_layout(session, ours: KVLayout) -> None:
    saved = session.layout
    diff = [
        f"{f.name} {getattr(saved, f.name)!r} (now {getattr(ours, f.name)!r})"
        for f in dataclasses.fields(saved)
        if getattr(saved, f.name) != getattr(ours, f.name)
    ]
    if diff:
        raise SessionError(
            f"{session.version_dir / 'manifest.json'}: the session's KV layout differs from "
            f"this config: {', '.join(diff)}"
        )


def _restore_index(policy, tensors: dict, meta: dict, num_tokens: int) -> None:
    if not tensors:
        return
    settings = {k: getattr(policy.selection, k) for k in INDEX_KEYS}
    if meta.get("settings") != settings:
        return  # another selector or cluster setting: the index is rebuilt on first use
    for entry in meta["layers"]:
        layer = entry["layer"]
        if not isinstance(layer, int) or not 0 <= layer < len(policy.selectors):
            raise ValueError(f"layer {layer!r}")
        sel = policy.selectors[layer]
        if sel is None:
            raise ValueError(f"layer {layer} is not a sparse layer")
        prefix = f"L{layer}."
        sel.load_state(
            {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)},
            entry,
            num_tokens,
        )


def check_session_kind(rt: Runtime, kind: str) -> dict:
    info = getattr(rt, "session", None)
    if not info or info.get("kind") != kind:
        found = info.get("kind") if info else "none"
        raise OffloadError(f"this needs a {kind} session; the loaded session is of kind {found!r}")
    return info
