"""What goes in which tier for a model and a context length, from `KVLayout` arithmetic.

Needs only the model's metadata (a `config.json` or a GGUF header), never its
weights, so a user can plan Llama-3.1-8B at 128k before downloading it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from offload.config import DTYPES, ModelArgs
from offload.errors import ConfigError
from offload.loading import count_parameters, read_args
from storage.layout import DTYPE_BYTES, KVLayout

GiB = 1 << 30
ACTIVATION_RESERVE = GiB  # prefill activations and allocator slack kept free on the device


@dataclass
class PlanRow:
    tier: str
    what: str
    nbytes: int
    per_token: float  # bytes per token of context (0 for fixed costs)


@dataclass
class Plan:
    model: str
    args: ModelArgs
    layout: KVLayout
    context: int
    device_budget: int
    host_budget: int
    rows: list[PlanRow] = field(default_factory=list)

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
        decode, plus the hidden states in and out of a layer ([context, dim] each) and
        one layer's full K and V, held while that layer runs over its chunks."""
        hidden = 2 * self.context * self.args.dim * self.layout.dtype_bytes
        one_layer = self.context * self.layout.token_bytes_per_layer
        return self.tier_total("device") + hidden + one_layer

    @property
    def device_kv_bytes(self) -> int:
        """What the device has for KV beside the weights and the activations reserve: the
        `kv.device_bytes` of a runtime on this device."""
        fixed = sum(r.nbytes for r in self.rows if r.what in ("weights", "activations reserve"))
        return max(0, self.device_budget - fixed)

    @property
    def device_kv_tokens(self) -> int:
        """Mode "auto" on CUDA keeps all KV on the device up to this many tokens of
        context, then moves it to the tiers (`Runtime.device_kv_tokens`, same arithmetic)."""
        L = self.layout
        per_token = L.token_bytes + L.token_bytes_per_layer  # one layer's growth held back
        return min(self.device_kv_bytes // per_token, self.args.max_seq_len)


def make_plan(
    model: str | Path,
    context: int,
    device_bytes: int,
    host_bytes: int,
    dtype: str = "bfloat16",
    chunk_size: int = 16,
    summary_bits: int = 2,
    sink: int = 16,
    window: int = 256,
    dense_layers: int = 2,
    selector: str = "cluster",
) -> Plan:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if context < 1:
        raise ConfigError(f"context must be at least 1 token, got {context}")
    _, a = read_args(model)
    L = KVLayout(a.num_layers, a.num_kv_heads, a.head_dim, dtype, chunk_size, summary_bits)
    plan = Plan(str(model), a, L, context, device_bytes, host_bytes)
    full_chunks = context // chunk_size
    resident = min(context, sink + window)
    weights = count_parameters(a) * DTYPE_BYTES[dtype]
    n_dense = min(dense_layers, a.num_layers)  # their KV is mirrored on the GPU
    host_kv_all = L.kv_bytes(context)
    host_room = max(0, host_bytes)
    host_kv = min(host_kv_all, host_room // L.chunk_bytes * L.chunk_bytes)
    spilled_chunks = L.num_chunks(context) * L.num_layers - host_kv // L.chunk_bytes
    disk_kv = max(0, spilled_chunks) * L.disk_bytes_per_chunk()
    rows = [
        PlanRow("device", "weights", weights, 0.0),
        PlanRow("device", "activations reserve", ACTIVATION_RESERVE, 0.0),
        PlanRow("device", f"sink + window KV ({sink} + {window} tokens)", resident * L.token_bytes, 0.0),
        PlanRow(
            "device", f"KV of the {n_dense} dense layers (attended whole every step)",
            context * n_dense * L.token_bytes_per_layer, n_dense * L.token_bytes_per_layer,
        ),
        PlanRow(
            "device", f"{summary_bits}-bit key summaries",
            full_chunks * chunk_size * L.summary_bytes_per_token, L.summary_bytes_per_token,
        ),
        PlanRow(  # read only by the chunk selector; kept in host memory otherwise
            "device" if selector == "chunk" else "host", "chunk abstracts (min/max/mean)",
            L.abstracts_bytes(context), L.abstract_bytes_per_token,
        ),
        PlanRow("host", "full-precision K and V", host_kv, L.token_bytes if host_kv else 0.0),
        PlanRow(
            "disk", "spilled chunks (KV + abstract)", disk_kv,
            L.disk_bytes_per_chunk() / chunk_size * L.num_layers if disk_kv else 0.0,
        ),
    ]  # fmt: skip
    plan.rows = rows
    return plan
