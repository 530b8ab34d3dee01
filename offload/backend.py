"""The compute backend, chosen once per runtime and handed to the caches and the step.

    cuda   Triton kernels (decode attention over device-side lengths), decode steps
           captured as CUDA graphs, pinned host memory
    cpu    the kernels' plain-torch references, eager steps, ordinary memory

Code that differs by device asks this object, instead of testing
`device.type == "cuda"` where it stands.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from offload.errors import CUDA_FORKED, ConfigError
from offload.kernels import candidates as candidate_kernels
from offload.kernels import decode_attention as attention_kernels
from offload.kernels import gather as gather_kernels
from offload.kernels import hit_cache as hit_kernels
from offload.kernels import kmeans as kmeans_kernels
from offload.kernels import layer as layer_kernels
from offload.kernels import ops, ranking, supports_head_dim, triton_available
from offload.kernels.candidates import (
    cluster_candidates_ref,
    rerank_weights_ref,
    score_clusters_ref,
)
from offload.kernels.decode_attention import decode_attention_ref
from offload.kernels.gather import device_view, fetch_into_ref, gather_kv_ref
from offload.kernels.hit_cache import lookup_ref
from offload.kernels.ranking import take_clusters_ref, top_ids_ref
from retrieval.base import ROW_BLOCK, with_successors
from retrieval.cluster import nearest_centroids
from storage.quant import QuantKeys


def pick_device(name: str) -> torch.device:
    """`model.device`'s device ("auto": CUDA where there is one)."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device: {name!r} requested but CUDA is not available")
    else:
        device = torch.device(name)
    if device.type == "cuda" and torch.cuda._is_in_bad_fork():
        raise ConfigError(f"model.device {name!r}: {CUDA_FORKED}")
    return device


@dataclass(frozen=True)
class Backend:
    device: torch.device
    kernels: bool = False  # Triton kernels instead of their torch references
    fixed_shape: bool = False  # decode through the fixed-shape step (offload/graphs.py)
    graphs: bool = False  # ... captured and replayed as a CUDA graph
    # Host memory is not the compute device's: the dense layers of a tiered cache keep a
    # device copy of their KV, and decode steps over it run fixed-shape.
    remote_host: bool = False
    # The fixed-shape step goes through torch.compile (its elementwise work fused into
    # fewer kernels) before it is captured; the kernels are then called as torch
    # operators (offload/kernels/ops.py), which torch.compile keeps whole. Only then:
    # an operator call costs about 90 us more from Python on this CPU.
    compile: bool = False

    def _kernel(self, module):
        """Where a kernel is called from: its module, or its operator when compiled."""
        return ops if self.compile else module

    @classmethod
    def for_device(
        cls,
        device: torch.device | str,
        graphs: bool = True,
        compile: bool = False,
        head_dim: int | None = None,
    ) -> Backend:
        """The backend of `device`. A model whose `head_dim` the kernels do not take runs
        their torch references on CUDA, with a warning (slower, the same results)."""
        device = torch.device(device)
        cuda = device.type == "cuda"
        kernels = cuda and triton_available()
        if kernels and head_dim is not None and not supports_head_dim(head_dim):
            warnings.warn(
                f"head_dim {head_dim}: the GPU kernels take a power of two >= 16; "
                "running torch's operations instead (slower)",
                stacklevel=2,
            )
            kernels = False
        steps = cuda and graphs  # eager CUDA decode (graphs off) is the plain path
        return cls(device, kernels=kernels, fixed_shape=steps, graphs=steps, remote_host=cuda,
                   compile=steps and compile)  # fmt: skip

    @property
    def layer_ops(self) -> SimpleNamespace:
        """The model layers' norms, RoPE and SwiGLU (`Transformer.use_ops`): one Triton
        kernel each on CUDA (offload/kernels/layer.py), torch's operations elsewhere, and
        where the step is compiled, since Inductor fuses those itself and more (across
        the residual sums: 39 kernels for the 4-layer step of `scripts/step_kernels.py`,
        45 around the kernels as opaque calls)."""
        if self.kernels and not self.compile:
            return layer_kernels.KERNELS
        return layer_kernels.REFERENCE

    def decode_attention(
        self, q, k, v, length, k2=None, v2=None, length2=None, idx2=None, skip=False
    ) -> torch.Tensor:
        """q [H, G, D] over k, v [H, N, D] rows below the device tensor `length` -> [H, G, D];
        and over k2, v2's rows below `length2` too where given (row j of head h at
        idx2[h, j] where that is given: offload/kernels/decode_attention.py)."""
        more = (k2, v2, length2, idx2)
        if self.kernels:  # (the reference always leaves negative rows out)
            return self._kernel(attention_kernels).decode_attention(q, k, v, length, *more, skip)
        return decode_attention_ref(q, k, v, length, *more)

    def rope_store(self, qkv, cos, sin, K, V, pos) -> torch.Tensor:
        """RoPE of the q and k heads of the fused projection's qkv [Hq + 2 Hkv, S, D], and
        the new k (rotated) and v written at the device positions pos of K, V -> the
        rotated q: a fixed-shape step's layer. One kernel on CUDA; elsewhere, and compiled,
        the layer's RoPE and an `index_copy_` each (compiled, an operator that wrote into
        views of one buffer, the tiered step's ring, gave wrong tokens through Inductor:
        torch 2.13, on the CPU; the plain writes do not)."""
        if self.kernels and not self.compile:
            return layer_kernels.rope_store(qkv, cos, sin, K, V, pos)
        return layer_kernels.rope_store_ref(qkv, cos, sin, K, V, pos, self.layer_ops.rope)

    def gather_kv(self, slab, slot_table, ids) -> torch.Tensor:
        """K, V [2, H, k, D] of per-head token ids [H, k] from a host slab (`host_view`)."""
        if self.kernels:
            return self._kernel(gather_kernels).gather_kv(slab, slot_table, ids)
        return gather_kv_ref(slab, slot_table, ids)

    def fetch_into(self, slab, slot_table, ids, rows, dst, cache) -> None:
        """cache[:, h, dst[h, j]] = K/V of ids[h, j] from the host slab, where rows[h, j]
        (a device hit cache's misses: only those rows are read)."""
        if self.kernels:
            self._kernel(gather_kernels).fetch_into(slab, slot_table, ids, rows, dst, cache)
        else:
            fetch_into_ref(slab, slot_table, ids, rows, dst, cache)

    def score_clusters(self, q, centroids, bias) -> torch.Tensor:
        """Each cluster's largest logit over rows q [H, R, D] against centroids [H, NC, D],
        plus bias [H, NC] -> [H, NC] float32 (offload/kernels/candidates.py). The kernel
        takes a decode step's few rows; a prefill chunk's many (more than `ROW_BLOCK`) go
        through torch's matmul, which the kernel's loop over rows would not match."""
        if self.kernels and q.shape[1] <= ROW_BLOCK:
            return self._kernel(candidate_kernels).score_clusters(q, centroids, bias)
        return score_clusters_ref(q, centroids, bias)

    def rerank_weights(self, q, summaries: QuantKeys, ids, count, sm_scale: float) -> torch.Tensor:
        """The rerank's weights [H, N]: each row of q [H, R, D] its softmax over the
        logits against the low-bit keys of candidates ids [H, N] (-inf past count[h]),
        summed over the rows (offload/kernels/candidates.py)."""
        if self.kernels:
            op = self._kernel(candidate_kernels)
            return op.rerank_weights(q, summaries, ids, count, sm_scale)
        return rerank_weights_ref(q, summaries, ids, count, sm_scale)

    def take_clusters(self, scores, counts, factor: int, k: int, k_valid=None):
        """The clusters a selection takes, from their scores [H, NC] and sizes counts
        [H, NC] -> take [H, NC + 1] bool (offload/kernels/ranking.py)."""
        if self.kernels:
            return self._kernel(ranking).take_clusters(scores, counts, factor, k, k_valid)
        return take_clusters_ref(scores, counts, factor, k, k_valid)

    def cluster_candidates(self, take, assign, lo: int, hi, N: int):
        """Each head's tokens in [lo, hi) of the clusters taken, in token order, the first N
        of them -> ids [H, N] (padded with lo), count [H]
        (offload/kernels/candidates.py)."""
        if self.kernels:
            return self._kernel(candidate_kernels).cluster_candidates(take, assign, lo, hi, N)
        return cluster_candidates_ref(take, assign, lo, hi, N)

    def top_ids(self, weights, ids, k: int, k_valid=None) -> torch.Tensor:
        """The ids [H, k] of the k_valid (or k) largest weights [H, N] per head, in their
        order in ids [H, N]; the rows after them ids[:, 0] (offload/kernels/ranking.py)."""
        if self.kernels:
            return self._kernel(ranking).top_ids(weights, ids, k, k_valid)
        return top_ids_ref(weights, ids, k, k_valid)

    def successors(self, ids, valid) -> tuple[torch.Tensor, torch.Tensor]:
        """A reused selection's rows: `retrieval.base.with_successors` (one kernel)."""
        if self.kernels:
            return self._kernel(hit_kernels).successors(ids, valid)
        return with_successors(ids, valid)

    def hit_lookup(self, ids, k_valid, slot_of, token_of, used, clock, counts, use=None):
        """A step hit cache's lookup of ids [H, k] (the rows `use` marks, where given): its
        hits stamped, its misses given the least recently used slots, its tables updated
        -> (to, miss, rows) [H, k] (offload/kernels/hit_cache.py)."""
        args = (ids, k_valid, slot_of, token_of, used, clock, counts, use)
        if self.kernels:
            return self._kernel(hit_kernels).lookup(*args)
        return lookup_ref(*args)

    def nearest_centroids(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The cluster index's k-means assignment: [B, n] index of each point's nearest
        centroid (x [B, n, D], c [B, nc, D] float32) (offload/kernels/kmeans.py)."""
        if self.kernels and x.is_cuda:
            return kmeans_kernels.nearest(x, c)
        return nearest_centroids(x, c)

    def host_view(self, t: torch.Tensor) -> torch.Tensor:
        """The host tensor `t` as the compute device reads it: on CUDA a view of the pinned
        memory through unified virtual addressing (no copy); elsewhere `t` itself."""
        if self.device.type == "cuda":
            return device_view(t, self.device)
        return t
