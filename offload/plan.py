"""What goes in which tier for a model and a context length, from `KVLayout` arithmetic.

Needs only the model's metadata (a `config.json` or a GGUF header), never its
weights, so a user can plan Llama-3.1-8B at 128k before downloading it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from offload.config import DTYPES, KVSection, ModelSection, RuntimeConfig, SelectionSection
from offload.errors import ConfigError
from offload.loading import read_args
from offload.model_args import ModelArgs
from offload.tiered_step import K_BUCKET, TOKEN_GROWTH
from offload.weight_forms import dense_fits, linear_parameters, resolve_weights, weight_bytes
from storage.device import CONTEXT_GROWTH
from storage.layout import DTYPE_BYTES, KVLayout

GiB = 1 << 30
ACTIVATION_RESERVE = GiB  # prefill activations and allocator slack kept free on the device
NOT_KV = ("weights", "activations reserve")  # the device rows `kv.device_bytes` does not cover


@dataclass
class PlanRow:
    tier: str
    what: str
    nbytes: int
    per_token: float  # bytes per token of context (0 for fixed costs)
    growth: float = 0.0  # the share of it its buffers may hold beyond it (`_growth_row`)


@dataclass
class Plan:
    model: str
    args: ModelArgs
    layout: KVLayout
    context: int
    device_budget: int
    host_budget: int
    rows: list[PlanRow] = field(default_factory=list)
    kv_device_bytes: int | None = None  # the config's kv.device_bytes, if set
    weights: str = "dense"  # the form `model.weights` resolves to on this device

    def tier_total(self, tier: str) -> int:
        return sum(r.nbytes for r in self.rows if r.tier == tier)

    @property
    def fits_device(self) -> bool:
        return self.tier_total("device") <= self.device_budget

    @property
    def fits_host(self) -> bool:
        return self.tier_total("host") <= self.host_budget

    @property
    def dense_kv_bytes(self) -> int:
        return self.layout.kv_bytes(self.context)

    @property
    def prefill_peak_bytes(self) -> int:
        """Device memory at the peak of a layer-by-layer prefill of the whole context
        (offload/generate.py, `prefill_by_layer`): everything the device holds for
        decode but the hit caches and the cluster index's device copy (made at the first
        decode step), plus the hidden states ([context, dim], updated in place) and two
        layers' full K and V: the layer that runs over its chunks, and the one before it,
        handed over to the store meanwhile; with int4 weights, also the running layer's
        linears dequantized (`dequantized_once`)."""
        a, dtype_bytes = self.args, self.layout.dtype_bytes
        hidden = self.context * a.dim * dtype_bytes
        two_layers = 2 * self.context * self.layout.token_bytes_per_layer
        later = sum(r.nbytes for r in self.rows if r.tier == "device" and r.what.startswith(
            ("hit caches", "cluster index")))  # fmt: skip
        held = 0
        if self.weights == "int4":
            held = linear_parameters(a) // a.num_layers * dtype_bytes
        return self.tier_total("device") - later + hidden + two_layers + held

    @property
    def device_kv_bytes(self) -> int:
        """`kv.device_bytes`: the config's, else what the device has beside the weights
        and the activations reserve (what a runtime on this device takes when unset)."""
        if self.kv_device_bytes is not None:
            return self.kv_device_bytes
        fixed = sum(r.nbytes for r in self.rows if r.what in NOT_KV)
        return max(0, self.device_budget - fixed)

    @property
    def kv_rows_on_device(self) -> list[PlanRow]:
        """What the tiered KV keeps on the device (what `kv.device_bytes` bounds)."""
        return [r for r in self.rows if r.tier == "device" and r.what not in NOT_KV]

    @property
    def resident_device_bytes(self) -> int:
        """Device memory while the whole context's KV stays on the device (mode "full",
        and "auto" up to `device_kv_tokens`; the rows above are the tiered layout): the
        weights, the activations reserve, and every layer's KV buffers, which double as
        they fill (`DenseLayer`), never past "auto"'s bound below it, nor the model's
        window: up to twice the context's KV. An upper bound, as the tiered rows' room."""
        n = self.context
        bound = self.device_kv_tokens if n <= self.device_kv_tokens else self.args.max_seq_len
        held = max(n, min(2 * n, bound))
        fixed = sum(r.nbytes for r in self.rows if r.what in NOT_KV)
        return fixed + held * self.layout.token_bytes

    @property
    def device_kv_tokens(self) -> int:
        """Mode "auto" on CUDA keeps all KV on the device up to this many tokens of
        context, then moves it to the tiers (`Runtime.device_kv_tokens`, same arithmetic)."""
        L = self.layout
        per_token = L.token_bytes + L.token_bytes_per_layer  # one layer's growth held back
        return min(self.device_kv_bytes // per_token, self.args.max_seq_len)


def make_plan(
    model: str | Path | ModelArgs,
    context: int,
    device_bytes: int,
    host_bytes: int,
    dtype: str = ModelSection.dtype,
    chunk_size: int = KVSection.chunk_size,
    summary_bits: int = KVSection.summary_bits,
    sink: int = SelectionSection.sink,
    window: int = SelectionSection.window,
    dense_layers: int = SelectionSection.dense_layers,
    selector: str = SelectionSection.selector,
    retrieved: int = SelectionSection.retrieved,
    retrieve_fraction: float = SelectionSection.retrieve_fraction,
    cluster_size: int = SelectionSection.cluster_size,
    hit_cache: float | None = SelectionSection.hit_cache,
    kv_device_bytes: int | None = None,
    rope_scaling: str = "",
    weights: str = "auto",
) -> Plan:
    """The defaults are the config's. `retrieved` (0: `retrieve_fraction` of the
    context), `cluster_size` and `hit_cache` (None: no hit caches) as in the [selection]
    config; `rope_scaling` as `model.rope_scaling` (it sets the model's context)."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if context < 1:
        raise ConfigError(f"context must be at least 1 token, got {context}")
    a = model if isinstance(model, ModelArgs) else read_args(model)[1]
    a = a.with_rope_override(rope_scaling) if rope_scaling else a
    L = KVLayout(a.num_layers, a.num_kv_heads, a.head_dim, dtype, chunk_size, summary_bits)
    name = "model" if isinstance(model, ModelArgs) else str(model)
    plan = Plan(name, a, L, context, device_bytes, host_bytes, kv_device_bytes=kv_device_bytes)
    full_chunks = context // chunk_size
    resident = min(context, sink + window)
    plan.weights = plan_weights(a, DTYPE_BYTES[dtype], weights, device_bytes)
    weights = weight_bytes(a, DTYPE_BYTES[dtype], plan.weights)
    n_dense = min(dense_layers, a.num_layers)  # their KV is mirrored on the GPU
    chunks = L.num_chunks(context) * L.num_layers  # (a partial last chunk is one too)
    held = min(chunks, max(0, host_bytes) // L.chunk_bytes)
    host_kv = min(L.kv_bytes(context), held * L.chunk_bytes)
    disk_kv = (chunks - held) * L.disk_bytes_per_chunk()
    rows = [
        PlanRow("device", "weights", weights, 0.0),
        PlanRow("device", "activations reserve", ACTIVATION_RESERVE, 0.0),
        PlanRow("device", f"sink + window KV ({sink} + {window} tokens)", resident * L.token_bytes, 0.0),
        PlanRow(
            "device", f"KV of the {n_dense} dense layers (attended whole every step)",
            context * n_dense * L.token_bytes_per_layer, n_dense * L.token_bytes_per_layer,
            CONTEXT_GROWTH - 1,
        ),
        PlanRow(
            "device", f"{summary_bits}-bit key summaries",
            full_chunks * chunk_size * L.summary_bytes_per_token, L.summary_bytes_per_token,
            CONTEXT_GROWTH - 1,
        ),
        PlanRow(  # read only by the chunk selector; kept in host memory otherwise
            "device" if selector == "chunk" else "host", "chunk abstracts (min/max/mean)",
            L.abstracts_bytes(context), L.abstract_bytes_per_token,
        ),
        *_selection_rows(L, a, context, n_dense, selector, retrieved, retrieve_fraction,
                         cluster_size, hit_cache, sink + window),
        PlanRow("host", "full-precision K and V", host_kv, L.token_bytes if host_kv else 0.0),
        PlanRow(
            "disk", "spilled chunks (KV + abstract)", disk_kv,
            L.disk_bytes_per_chunk() / chunk_size * L.num_layers if disk_kv else 0.0,
        ),
    ]  # fmt: skip
    rows.insert(-2, _growth_row(rows, L, context, a.max_seq_len))
    plan.rows = rows
    return plan


def plan_weights(a: ModelArgs, dtype_bytes: int, mode: str, device_bytes: int) -> str:
    """The weights' form on a CUDA device of `device_bytes` (free) for `model.weights`
    `mode`, as the runtime resolves it there (offload/weight_forms.py, `resolve_weights`)."""
    if mode == "int8":
        resolve_weights(mode, None, torch.device("cuda"))  # (its error: CPU only)
    dense = weight_bytes(a, dtype_bytes, "dense")
    return (
        "dense" if mode == "dense" or mode == "auto" and dense_fits(dense, device_bytes) else "int4"
    )


def _growth_row(rows: list[PlanRow], L: KVLayout, context: int, window: int) -> PlanRow:
    """The room the device buffers that grow with the context hold beyond it (a row's
    `growth`): the dense layers' KV and the key summaries grow by an eighth
    (storage/device.py, `CONTEXT_GROWTH`), the cluster index and the hit caches' slot map
    by a quarter and a chunk (offload/tiered_step.py, `TOKEN_GROWTH`); none past the
    model's window. An upper bound (right after a growth they hold that much), which
    `kv.device_bytes` must take."""
    room = 0.0
    for r in rows:
        if r.growth:
            extra = min(math.ceil(context * r.growth) + L.chunk_size, window - context)
            room += max(0, extra) * r.per_token
    return PlanRow("device", "room to grow (of the buffers that grow with the context)",
                   int(room), 0.0)  # fmt: skip


def plan_for_config(
    model: str | Path | ModelArgs, context: int, device_bytes: int, host_bytes: int,
    config: RuntimeConfig,
) -> Plan:  # fmt: skip
    """`make_plan` with a runtime config's settings (as that config runs on CUDA)."""
    kv, sel = config.kv, config.selection
    return make_plan(
        model, context, device_bytes, host_bytes, dtype=config.model.dtype,
        chunk_size=kv.chunk_size, summary_bits=kv.summary_bits, sink=sel.sink,
        window=sel.window, dense_layers=sel.dense_layers, selector=sel.selector,
        retrieved=sel.retrieved, retrieve_fraction=sel.retrieve_fraction,
        cluster_size=sel.cluster_size, hit_cache=None if sel.prefetch == "off" else sel.hit_cache,
        kv_device_bytes=kv.device_bytes, rope_scaling=config.model.rope_scaling,
        weights=config.model.weights,
    )  # fmt: skip


def _selection_rows(L: KVLayout, a: ModelArgs, context: int, n_dense: int, selector: str,
                    retrieved: int, fraction: float, cluster_size: int,
                    hit_cache: float | None, near: int) -> list[PlanRow]:  # fmt: skip
    """What the sparse layers' selection keeps: the cluster index (its state in host
    memory; centroids and a token map on the device, retrieval/device_index.py) and the
    decode step's hit caches (offload/step_cache.py)."""
    n_sparse, H, D = a.num_layers - n_dense, L.num_kv_heads, L.head_dim
    rows = []
    if selector == "cluster" and n_sparse > 0:
        clusters = -(-context // cluster_size)
        # centroids float32 + bias and counts; the token map int32
        device = n_sparse * H * (clusters * (D + 2) * 4 + context * 4)
        # centroids and member sums float32, the token map int64
        host = n_sparse * H * (clusters * 2 * D * 4 + context * 8)
        rows += [
            PlanRow("device", "cluster index (centroids, token map)", device, device / context,
                    TOKEN_GROWTH - 1),
            PlanRow("host", "cluster index (k-means state)", host, host / context),
        ]  # fmt: skip
    if hit_cache and n_sparse > 0:
        # the step's k (offload/tiered_step.py, `prepare`): never more than the far tokens
        bucket = min(-(-context // K_BUCKET) * K_BUCKET, a.max_seq_len)
        k = max(1, min(retrieved or math.ceil(fraction * bucket), bucket - near))
        slots = max(2 * k, math.ceil(hit_cache * k)) + 1  # (one scratch slot)
        nbytes = n_sparse * H * (slots * (2 * D * L.dtype_bytes + 16) + (context + 1) * 4)
        rows.append(PlanRow("device", f"hit caches ({slots - 1:,} tokens per KV head and layer)",
                            nbytes, n_sparse * H * 4, TOKEN_GROWTH - 1))  # fmt: skip
    return rows
