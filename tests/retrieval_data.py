"""Seeded synthetic keys and queries with the structure real ones have.

Keys come from a mixture of directions (topics) plus noise and one outlier
channel; each query leans toward one topic, so a few hundred tokens carry most
of its attention, as in a real decode step.
"""

import torch

from retrieval.base import LayerView
from storage.abstracts import chunk_abstracts
from storage.quant import quantize_keys


def synthetic_layer(H=3, T=4096, D=64, G=3, topics=64, bits=2, chunk=16, seed=0, strength=0.12):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(H, topics, D, generator=g) * 2.0
    # Runs of tokens share a topic, as sentences of a document do.
    runs = torch.randint(0, topics, (H, T // 8), generator=g).repeat_interleave(8, dim=1)
    keys = torch.gather(centers, 1, runs[:, :, None].expand(H, T, D)) + torch.randn(
        H, T, D, generator=g
    )
    keys[:, :, 3] *= 4  # an outlier channel
    target = torch.randint(0, topics, (H,), generator=g)
    q = centers[torch.arange(H), target][:, None, :] * strength + 0.3 * torch.randn(
        H, G, D, generator=g
    )
    view = view_of(keys, T, bits, chunk)
    return keys, q, view


def view_of(keys, upto, bits=2, chunk=16):
    """A LayerView over the first `upto` tokens of keys [H, T, D]."""
    k = keys[:, :upto]
    return LayerView(
        summaries=quantize_keys(k, bits, chunk),
        abstracts_of=lambda: chunk_abstracts(k, chunk),
        chunk_size=chunk,
        num_tokens=upto,
        read_keys=lambda a, b: keys[:, a:b],
    )


def recall(ids, ref):
    """Mean over heads of |ids ∩ ref| / |ref| (rows of token ids)."""
    out = [len(set(a.tolist()) & set(b.tolist())) / len(b) for a, b in zip(ids, ref, strict=True)]
    return sum(out) / len(out)


def mass_recall(keys, q, ids, lo, hi):
    """Share of the exact softmax mass over [lo, hi) (summed over the group) on `ids`, mean over heads."""
    logits = torch.einsum("hgd,htd->hgt", q, keys[:, lo:hi]) / keys.shape[-1] ** 0.5
    w = torch.softmax(logits, dim=-1).sum(1)  # [H, hi-lo]
    got = torch.gather(w, 1, ids - lo).sum(-1) / w.sum(-1)
    return float(got.mean())
