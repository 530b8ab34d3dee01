"""Low-bit key summaries: packing, error bounds, and ranking agreement with exact scores."""

import pytest
import torch

from storage.abstracts import chunk_abstracts, upper_bound_scores
from storage.quant import dequantize_keys, pack, quantize_keys, score_keys, unpack


def keys(H=3, T=512, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(H, T, D, generator=g)
    k[:, :, 5] *= 8  # an outlier channel, as real keys have
    return k


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (3, 10, 64), generator=torch.Generator().manual_seed(1)).to(
        torch.uint8
    )
    packed = pack(codes, bits)
    assert packed.shape == (3, 10, 64 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 4])
def test_error_bound_is_half_a_step(bits):
    k = keys()
    qk = quantize_keys(k, bits, group=16)
    err = (dequantize_keys(qk) - k).abs()
    step = qk.scale.repeat_interleave(16, dim=1)  # [H, T, D]
    assert torch.all(err <= step / 2 + 1e-5)
    assert qk.nbytes() == k.shape[0] * k.shape[1] * (64 * bits // 8) + 2 * 3 * (512 // 16) * 64 * 4


@pytest.mark.parametrize("bits, min_recall", [(4, 0.9), (2, 0.7)])
def test_scores_on_packed_codes_rank_like_exact(bits, min_recall):
    k = keys(T=1024)
    q = torch.randn(3, 3, 64, generator=torch.Generator().manual_seed(9))  # [H, G, D]
    qk = quantize_keys(k, bits, group=16)
    approx = score_keys(qk, q)
    # scoring the packed codes equals scoring the dequantized keys
    torch.testing.assert_close(
        approx, torch.einsum("hgd,htd->hgt", q, dequantize_keys(qk)), atol=1e-3, rtol=1e-4
    )
    exact = torch.einsum("hgd,htd->hgt", q, k)
    top = 64
    recalls = []
    for h in range(3):
        for g in range(3):
            a = set(approx[h, g].topk(top).indices.tolist())
            e = set(exact[h, g].topk(top).indices.tolist())
            recalls.append(len(a & e) / top)
    assert sum(recalls) / len(recalls) >= min_recall


def test_chunk_upper_bound_bounds_every_token():
    k = keys(T=128)
    q = torch.randn(3, 2, 64, generator=torch.Generator().manual_seed(4))
    bound = upper_bound_scores(chunk_abstracts(k, 16), q)  # [H, G, n]
    exact = torch.einsum("hgd,htd->hgt", q, k).reshape(3, 2, 8, 16)
    assert torch.all(exact.amax(-1) <= bound + 1e-4)
