"""`ClusterIndex`: faiss spherical k-means over each KV head's keys (RetroInfer / ClusterKV).

    build   keys of each segment of `segment` tokens -> about one centroid per
            `cluster_size` tokens (spherical k-means, `iters` iterations); every
            token is assigned to its nearest centroid; a cluster is represented by
            the mean of its members' keys (what q . k averages to)
    select  score centroids (max of logits over the query heads of a group), take
            the best clusters until `candidate_factor x k` candidates, rerank the
            candidates by their low-bit summaries (sum of softmax), keep top-k; where
            the full keys are in place (the CPU's host tier), rerank by those instead
    update  tokens appended during decode join the index in batches: they are
            assigned to the nearest existing centroid of the last segment, and a
            full new segment gets its own k-means

Tokens between the end of the index and the window start (fewer than one
refresh batch) are always candidates.
"""

from __future__ import annotations

import itertools

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from retrieval.base import (
    ROW_BLOCK,
    LayerView,
    clusters_taken,
    exact_logits,
    row_max,
    row_softmax_sum,
    top_k_ids,
)
from storage.quant import keys_at, score_dequantized

_EPOCHS = itertools.count(1)  # see ClusterIndex.epoch
ASSIGN_GROWTH = 1.25  # the token map's buffer grows by this factor (`_append_assign`)


def as_faiss(x: torch.Tensor) -> np.ndarray:
    """Contract for faiss: a C-contiguous float32 [n, d] array."""
    assert x.dim() == 2, f"expected [n, d], got {tuple(x.shape)}"
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())


class ClusterIndex:
    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        cluster_size: int = 16,
        iters: int = 10,
        segment: int = 8192,
        candidate_factor: int = 4,
        refresh: int = 256,
        seed: int = 1234,
        kmeans: str = "auto",
        nearest=None,
    ):
        self.H, self.D = num_heads, head_dim
        self.cluster_size, self.iters, self.segment = cluster_size, iters, segment
        self.candidate_factor, self.refresh, self.seed = candidate_factor, refresh, seed
        assert kmeans in ("auto", "faiss", "torch"), kmeans
        self.kmeans = kmeans  # auto: faiss for keys in host memory, torch for keys on a GPU
        self.nearest = nearest  # the torch k-means' assignment (None: `nearest_centroids`)
        self.reset()

    def reset(self) -> None:
        # Changes other than growth (tokens appended to the end, clusters from
        # `_unit_offset` on) make a new epoch: a mirror of the index copies it whole again.
        # Within one, `cuts` lists the truncations (tokens kept) that cut only members of
        # the clusters `_unit_offset` on: a mirror copies the tokens from the lowest new one on.
        self.epoch, self.cuts = next(_EPOCHS), []
        self.centroids = torch.empty(self.H, 0, self.D)  # [H, NC, D] member means
        self._unit = torch.empty(self.H, 0, self.D)  # [H, NC', D] k-means centroids (last segment)
        self._unit_offset = 0  # global id of the last segment's first cluster
        # where that segment starts: the tokens from here on are all members of clusters
        # `_unit_offset` on (a truncation keeps both: later tokens still join `_unit`)
        self._unit_start = 0
        self.segments: list[int] = []  # start token of each segment
        self._set_assign(torch.empty(self.H, 0, dtype=torch.long))
        self._sums = torch.zeros(self.H, 0, self.D)  # running member sums and counts per cluster
        self._counts = torch.zeros(self.H, 0)
        self._counts_cache = None

    @property
    def assign(self) -> torch.Tensor:
        """[H, T_idx] the cluster of each indexed token (a view of a buffer with room)."""
        return self._assign[:, : self._indexed]

    @property
    def indexed_tokens(self) -> int:
        return self._indexed

    def _set_assign(self, assign: torch.Tensor) -> None:
        self._assign, self._indexed = assign, assign.shape[1]

    def _append_assign(self, new: torch.Tensor) -> None:
        """New tokens' clusters [H, n] after the indexed ones. The buffer grows by a
        quarter at a time: a batch of a decode's tokens joins every `refresh` tokens,
        and copying the whole map each time (8 MiB a layer at 128k tokens of the 8B
        shape, into freshly mapped pages) cost more host time than the batch's own
        assignment."""
        n, end = self._indexed, self._indexed + new.shape[1]
        if end > self._assign.shape[1]:
            grown = torch.empty(self.H, max(end, int(ASSIGN_GROWTH * n)), dtype=torch.long)
            grown[:, :n] = self.assign
            self._assign = grown
        self._assign[:, n:end] = new
        self._indexed = end

    @property
    def last_segment(self) -> tuple[int, int]:
        """(first cluster, first token) of the last segment: within an epoch, only its
        clusters and those after change, and their members are tokens from there on."""
        return (self._unit_offset, self.segments[-1]) if self.segments else (0, 0)

    # -- building --------------------------------------------------------------

    def _kmeans_segments(self, read_keys, start: int, end: int, progress=None) -> None:
        """New segments over tokens start..end-1 (`read_keys(a, b)` -> [H, b - a, D]):
        whole segments of `segment` tokens, then the rest as one. Where keys are on a
        GPU, a group of whole segments runs as one batched k-means (one call for every
        segment of the group and head, not a call each: a 128k-token layer has 16
        segments) and the members' sums are taken there too; only the small results
        (centroids, sums, assignments) come to the host, once per group. The index's
        tensors grow once per update, not once per segment."""
        S, base = self.segment, self._sums.shape[1]
        first = base
        bounds = [(s, min(end, s + S)) for s in range(start, end, S)]
        assigns, all_sums, all_counts = [], [], []
        i = 0
        while i < len(bounds):
            a, b = bounds[i]
            keys = read_keys(a, b)
            torch_km = self.kmeans == "torch" or self.kmeans == "auto" and keys.device.type != "cpu"
            H, n, D = keys.shape
            g = 1
            if torch_km and n == S:  # whole segments: as many more as the group holds
                g = max(1, min(KMEANS_GROUP_BYTES // (H * S * D * 4), len(bounds) - i))
                while g > 1 and bounds[i + g - 1][1] - bounds[i + g - 1][0] != S:
                    g -= 1
                if g > 1:  # (the rest of the group; a read may cost I/O: none twice)
                    keys = torch.cat([keys, read_keys(b, a + g * S)], dim=1)
            nc = max(1, min(n, round(n / self.cluster_size)))
            if torch_km:  # ids j * nc .. (j + 1) * nc - 1 in segment j of the group
                unit, assign = spherical_kmeans(
                    keys, nc, self.iters, self.seed, segments=g, nearest=self.nearest
                )
            else:
                unit, assign = self._faiss_kmeans(keys, nc)
                assign = assign.to(keys.device)
            sums, counts = member_sums(keys, assign, g * nc)  # where the keys are
            assigns.append(assign.cpu() + base)
            all_sums.append(sums.cpu())
            all_counts.append(counts.cpu())
            self.segments += [a + j * n for j in range(g)]
            self._unit = unit.cpu()[:, -nc:]  # the last segment's (new tokens join it)
            self._unit_offset = base + (g - 1) * nc
            self._unit_start = self.segments[-1]
            base += g * nc
            i += g
            if progress is not None:
                progress(a + g * n, end)
        self._append_assign(torch.cat(assigns, dim=1))
        self._sums = torch.cat([self._sums, *all_sums], dim=1)
        self._counts = torch.cat([self._counts, *all_counts], dim=1)
        self._set_centroids(first)

    def _faiss_kmeans(self, keys: torch.Tensor, nc: int) -> tuple[torch.Tensor, torch.Tensor]:
        units, assigns = [], []
        for h in range(keys.shape[0]):
            x = as_faiss(keys[h])
            km = faiss.Kmeans(
                x.shape[1], nc, niter=self.iters, spherical=True, seed=self.seed, verbose=False
            )
            km.cp.min_points_per_centroid = 1  # silence faiss' warning on small segments
            km.train(x)
            _, a = km.index.search(x, 1)
            units.append(torch.from_numpy(km.centroids.copy()))
            assigns.append(torch.from_numpy(a[:, 0].astype(np.int64)))
        return torch.stack(units), torch.stack(assigns)

    def _assign_to_last(self, keys: torch.Tensor) -> None:
        """New tokens [H, n, D] join the nearest centroid of the last segment."""
        keys = keys.to("cpu", torch.float32)  # the index lives in host memory
        sims = torch.einsum("hnd,hcd->hnc", keys, self._unit)
        new_assign = sims.argmax(dim=-1) + self._unit_offset
        self._append_assign(new_assign)
        for h in range(self.H):  # add them to their clusters' running sums
            self._sums[h].index_add_(0, new_assign[h], keys[h])
            self._counts[h].index_add_(0, new_assign[h], torch.ones(new_assign.shape[1]))
        self._set_centroids(self._unit_offset)

    def _set_centroids(self, first: int) -> None:
        """A cluster is represented by its members' mean: set those of clusters `first`
        on (the others have not changed; at 128k tokens of the 8B shape, all of a layer's
        are 32 MiB, and new tokens join a batch at a time)."""
        NC = self._sums.shape[1]
        means = self._sums[:, first:] / self._counts[:, first:].clamp_min(1)[:, :, None]
        if self.centroids.shape[1] == NC:
            self.centroids[:, first:] = means
        else:
            self.centroids = torch.cat([self.centroids[:, :first], means], dim=1)
        self._counts_cache = None

    def update(self, view: LayerView, progress=None) -> None:
        upto = view.summarized_tokens  # only completed chunks are indexed
        start = self.indexed_tokens
        if upto - start < (self.refresh if self.segments else 1):
            return
        if self.segments:  # fill the last segment by assignment
            room = self.segment - (start - self.segments[-1])
            if room > 0:
                read = view.host_keys or view.read_keys
                self._assign_to_last(read(start, min(upto, start + room)))
                if progress is not None:
                    progress(self.indexed_tokens, upto)
        if upto > self.indexed_tokens:
            self._kmeans_segments(view.read_keys, self.indexed_tokens, upto, progress)

    def truncate(self, num_tokens: int) -> None:
        if num_tokens >= self.indexed_tokens:
            return
        if num_tokens == 0:
            self.reset()
            return
        # Centroids keep their (slightly stale) means; membership is cut exactly.
        self._indexed = num_tokens
        self._counts_cache = None
        while self.segments and self.segments[-1] >= num_tokens:
            self.segments.pop()
        if num_tokens >= self._unit_start:  # only members of clusters `_unit_offset` on are
            self.cuts.append(num_tokens)  # cut: they change as when tokens join them
        else:
            self.epoch, self.cuts = next(_EPOCHS), []

    # -- persistence (sessions) ----------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"centroids": self.centroids, "unit": self._unit, "assign": self.assign,
                "sums": self._sums, "counts": self._counts}  # fmt: skip

    def state_meta(self) -> dict:
        return {"segments": list(self.segments), "unit_offset": self._unit_offset}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict, max_tokens: int) -> None:
        """Adopt saved state after checking it fits together (ValueError naming what not):
        a saved index is read from a file, so nothing in it is trusted to index with."""
        H, D = self.H, self.D
        c, unit, assign = tensors["centroids"], tensors["unit"], tensors["assign"]
        sums, counts = tensors["sums"], tensors["counts"]
        NC, T = c.shape[1] if c.dim() == 3 else -1, assign.shape[-1]
        want = {"centroids": (c, (H, NC, D), torch.float32), "sums": (sums, (H, NC, D), torch.float32),
                "counts": (counts, (H, NC), torch.float32),
                "unit": (unit, (H, unit.shape[1] if unit.dim() == 3 else -1, D), torch.float32),
                "assign": (assign, (H, T), torch.int64)}  # fmt: skip
        for name, (t, shape, dtype) in want.items():
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"{name} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
        segments, offset = meta["segments"], meta["unit_offset"]
        if not isinstance(segments, list) or not all(isinstance(x, int) for x in segments):
            raise ValueError(f"segments {segments!r}")
        if not isinstance(offset, int) or not 0 <= offset <= NC - unit.shape[1]:
            raise ValueError(f"unit_offset {offset!r}")
        if (
            T > max_tokens
            or segments != sorted(set(segments))
            or any(not 0 <= x < max(T, 1) for x in segments)
        ):
            raise ValueError(f"{T} indexed tokens with segments {segments[:4]} for {max_tokens}")
        if T and not (0 <= int(assign.min()) and int(assign.max()) < NC):
            raise ValueError(f"cluster ids outside 0..{NC - 1}")
        self.centroids, self._unit = c, unit
        self._set_assign(assign)
        self._sums, self._counts = sums, counts
        self.segments, self._unit_offset = list(segments), offset
        self._unit_start = T  # (where the saved `unit`'s segment starts is not saved)
        self._counts_cache = None
        self.epoch, self.cuts = next(_EPOCHS), []

    # -- selecting ---------------------------------------------------------------

    def candidate_mask(self, q, lo, hi, k) -> torch.Tensor:
        """[H, hi] bool: per head, the tokens of the best clusters (max of logits over the
        group) until `candidate_factor x k` of them, plus the not yet indexed tokens,
        restricted to [lo, hi). One batched pass, no loop over heads or clusters."""
        counts = self._counts_exact()
        # A decode step's few query rows are scored where the index lives (the host); a
        # prefill chunk's many rows where they are, against a copy of the centroids made
        # for the call: kept, the copies would take 1 GiB of GPU memory at 128k tokens
        # for an 8B model (33 MB per layer), which `offload plan` does not budget.
        rows = q.float()
        if rows.shape[1] <= ROW_BLOCK:
            rows = rows.to(self.centroids.device)
        centroids = self.centroids.to(rows.device)
        cscore = row_max(rows, lambda r: exact_logits(r, centroids)).cpu()  # [H, NC]
        take = clusters_taken(cscore, counts, self.candidate_factor * k)  # [H, NC]
        T_idx = self.indexed_tokens
        mask = torch.zeros(self.H, hi, dtype=torch.bool)
        upto = min(T_idx, hi)
        mask[:, :upto] = torch.gather(take, 1, self.assign[:, :upto])
        mask[:, upto:] = True  # not indexed yet: always candidates
        mask[:, :lo] = False
        return mask

    def candidates(self, q, lo, hi, k) -> list[torch.Tensor]:
        """The candidate token ids of each head (see `candidate_mask`)."""
        return [row.nonzero()[:, 0] for row in self.candidate_mask(q, lo, hi, k)]

    def counts_from(self, first: int, start: int) -> torch.Tensor:
        """[H, NC - first] members of the clusters `first` on, exactly, counted over the
        tokens `start` on, which must hold all their members (the last segment's first
        token, where `first` is its first cluster)."""
        if not first:
            return self._counts_exact()
        NC = self.centroids.shape[1]
        out = []
        for a in self.assign[:, start:]:
            out.append(torch.bincount(a[a >= first] - first, minlength=NC - first))
        return torch.stack(out)

    def _counts_exact(self) -> torch.Tensor:
        if self._counts_cache is None:
            NC = self.centroids.shape[1]
            self._counts_cache = torch.stack([torch.bincount(a, minlength=NC) for a in self.assign])
        return self._counts_cache

    def select(self, q, view: LayerView, lo, hi, k):
        # The index lives in host memory; the coarse scores and the rerank run where the
        # queries and the summaries are. (On CUDA the decode step uses
        # `DeviceClusterIndex`, which never leaves the device.)
        dev = q.device
        mask = self.candidate_mask(q, lo, hi, k)
        n_valid = mask.sum(1)
        n = max(int(n_valid.max()), k)
        # Compact each row's candidates to the front, in token order (O(T), no sort):
        # candidate j of a row goes to column j; everything else to a dump column n.
        H, T = mask.shape
        column = torch.where(mask, mask.cumsum(1) - 1, torch.full_like(mask, n, dtype=torch.long))
        ids = torch.full((H, n + 1), lo, dtype=torch.long)
        ids.scatter_(1, column, torch.arange(T).expand(H, T))
        ids = ids[:, :n]
        valid = torch.arange(n)[None, :] < n_valid[:, None]
        ids = torch.where(valid, ids, torch.full_like(ids, lo)).to(dev)
        valid = valid.to(dev)
        if view.keys is not None:  # keys in place (CPU): rerank exactly, and cheaper
            keys = view.keys.gather(ids)

            def raw(rows):
                return exact_logits(rows, keys)
        else:
            k_hat = keys_at(view.summaries, ids)  # dequantized once for every block of rows

            def raw(rows):
                return score_dequantized(rows, k_hat)

        scale, invalid = q.shape[-1] ** -0.5, ~valid[:, None, :]
        weights = row_softmax_sum(  # [H, n]
            q, lambda rows: (raw(rows) * scale).masked_fill(invalid, float("-inf"))
        )
        if bool((n_valid < k).any()):  # too few candidates (tiny contexts): fill from the range
            return _fill_short(ids, valid, weights, lo, hi, k)
        return top_k_ids(weights, ids, k)


KMEANS_BLOCK_BYTES = 128 << 20  # scores of points against centroids at a time, at most
KMEANS_GROUP_BYTES = 128 << 20  # float32 keys of the segments k-means'd together, at most


def spherical_kmeans(
    keys: torch.Tensor, nc: int, iters: int, seed: int, segments: int = 1, nearest=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means of each head's points, all heads at once, where `keys` lie.

    keys: [H, n, D] -> unit centroids [H, segments * nc, D] float32, assignment [H, n]
    int64. With `segments` > 1, the n points of a head are that many equal segments,
    each clustered on its own into nc centroids (segment j's ids: j * nc ..), in one
    batched run. Lloyd iterations on the unit sphere, as faiss' spherical k-means:
    start from nc distinct points (seeded: the same for every segment of a head, so
    each segment clusters as it would alone), assign by the largest dot product, move
    each centroid to its members' normalized mean; a cluster left empty keeps its
    centroid. `nearest(x, c)`: the assignment (default `nearest_centroids`)."""
    nearest = nearest or nearest_centroids
    H, n, D = keys.shape
    assert n % segments == 0, f"{n} points do not split into {segments} equal segments"
    g, m = segments, n // segments
    x = F.normalize(keys.float(), dim=-1).reshape(H * g, m, D)  # row h * g + j: head h, segment j
    B = x.shape[0]
    gen = torch.Generator(device=x.device).manual_seed(seed)
    start = torch.stack([torch.randperm(m, generator=gen, device=x.device)[:nc] for _ in range(H)])
    c = torch.gather(x, 1, start.repeat_interleave(g, dim=0)[:, :, None].expand(B, nc, D))
    for _ in range(iters):
        assign = nearest(x, c)
        sums = torch.zeros_like(c).scatter_add_(1, assign[:, :, None].expand(B, m, D), x)
        counts = torch.zeros(B, nc, device=x.device).scatter_add_(1, assign, x.new_ones(B, m))
        c = torch.where(counts[..., None] > 0, F.normalize(sums, dim=-1), c)
    offsets = nc * torch.arange(g, device=x.device).repeat(H)[:, None]
    return c.view(H, g * nc, D), (nearest(x, c) + offsets).view(H, n)


def nearest_centroids(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """x [B, n, D], c [B, nc, D] -> [B, n] index of the largest x . c (the first of equal
    ones), in blocks of points (scores of at most KMEANS_BLOCK_BYTES at a time). On CUDA
    the runtime gives the k-means `offload.kernels.kmeans.nearest` instead (no scores in
    memory; TF32)."""
    B, n, _ = x.shape
    block = max(1, KMEANS_BLOCK_BYTES // (4 * B * c.shape[1]))
    blocks = [
        torch.bmm(x[:, s : s + block], c.transpose(1, 2)).argmax(-1) for s in range(0, n, block)
    ]
    return torch.cat(blocks, dim=1)


def member_sums(keys: torch.Tensor, assign: torch.Tensor, nc: int):
    """keys [H, n, D] and their clusters [H, n] -> the float32 sum of each cluster's
    members [H, nc, D] and their count [H, nc], computed where the keys are."""
    H, n, D = keys.shape
    sums = torch.zeros(H, nc, D, device=keys.device)
    counts = torch.zeros(H, nc, device=keys.device)
    ones = torch.ones(n, device=keys.device)
    for h in range(H):  # (index_add_ per head: on a CPU far cheaper than one scatter_add_)
        sums[h].index_add_(0, assign[h], keys[h].float())
        counts[h].index_add_(0, assign[h], ones)
    return sums, counts


def _fill_short(ids, valid, weights, lo, hi, k):
    """Rows with fewer than k candidates: candidates first, then other tokens of [lo, hi)."""
    H = ids.shape[0]
    out = []
    for h in range(H):
        chosen = ids[h][valid[h]]
        if len(chosen) >= k:
            out.append(torch.sort(ids[h][torch.topk(weights[h], k).indices]).values)
            continue
        rest = torch.arange(lo, hi, device=ids.device)
        rest = rest[~torch.isin(rest, chosen)][: k - len(chosen)]
        out.append(torch.sort(torch.cat([chosen, rest])).values)
    return torch.stack(out)


def make_cluster_index(num_heads: int, head_dim: int, sel, nearest=None) -> ClusterIndex:
    return ClusterIndex(
        num_heads, head_dim, cluster_size=sel.cluster_size, iters=sel.cluster_iters,
        segment=sel.cluster_segment, candidate_factor=sel.candidate_factor, refresh=sel.index_refresh,
        nearest=nearest,
    )  # fmt: skip
