"""Exact chunked nearest-neighbour search (zsdense.dense.knn) against a brute-force reference."""

from __future__ import annotations

import pytest
import torch

from zsdense.dense.knn import faiss_available, knn_search, l2_normalize, memory_size
from zsdense.errors import ConfigError


def _brute(q: torch.Tensor, m: torch.Tensor, k: int):
    d = ((q.double()[:, None, :] - m.double()[None, :, :]) ** 2).sum(-1)
    dv, di = torch.sort(d, dim=1, stable=True)
    return dv[:, :k].float(), di[:, :k]


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(37, 24, generator=g)
    m = torch.randn(1000, 24, generator=g)
    return q, m


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("budget", [64 * 2**20, 4 * 37 * 50])  # whole / 50-row blocks
def test_matches_brute_force(data, k, budget):
    q, m = data
    d, i = knn_search(q, m, k, budget_bytes=budget)
    rd, ri = _brute(q, m, k)
    assert torch.equal(i, ri)
    assert torch.allclose(d, rd, atol=1e-5, rtol=1e-6)
    if k > 1:
        assert (d[:, 1:] >= d[:, :-1]).all()


def test_blocks_index_as_concatenated(data):
    q, m = data
    blocks = [m[:100], m[100:101], m[101:700], m[700:]]
    assert memory_size(blocks) == m.shape[0]
    d1, i1 = knn_search(q, blocks, 3, budget_bytes=4 * 37 * 64)
    d2, i2 = knn_search(q, m, 3)
    assert torch.equal(i1, i2)
    assert torch.allclose(d1, d2, atol=1e-6)


def test_unit_vectors_give_two_minus_two_cos(data):
    q, m = (l2_normalize(x) for x in data)
    d, i = knn_search(q, m, 1)
    cos = (q * m[i[:, 0]]).sum(1)
    assert torch.allclose(d[:, 0], 2 - 2 * cos, atol=1e-6)
    assert torch.allclose(l2_normalize(torch.zeros(2, 3)), torch.zeros(2, 3))


def test_errors(data):
    q, m = data
    with pytest.raises(ConfigError, match="memory holds"):
        knn_search(q, m[:2], 3)
    with pytest.raises(ConfigError, match="empty"):
        knn_search(q, [m[:0]], 1)
    with pytest.raises(ConfigError, match="do not match"):
        knn_search(q[:, :5], m, 1)
    with pytest.raises(ConfigError, match="backend"):
        knn_search(q, m, 1, backend="annoy")


@pytest.mark.skipif(not faiss_available(), reason="faiss-cpu not installed (optional 'fast' extra)")
@pytest.mark.parametrize("k", [1, 4])
def test_faiss_backend_identical_neighbours(data, k):
    q, m = data
    blocks = [m[:300], m[300:]]
    d_t, i_t = knn_search(q, blocks, k, backend="torch", budget_bytes=4 * 37 * 128)
    d_f, i_f = knn_search(q, blocks, k, backend="faiss")
    assert torch.equal(i_t, i_f)
    assert torch.equal(d_t, d_f)  # distances are recomputed from the neighbours by one code
    d_raw, _ = knn_search(q, blocks, k, backend="faiss", refine=False)
    assert torch.allclose(d_raw, d_f, atol=1e-4)


@pytest.mark.parametrize("width", [64 * 4, 64 * 9 + 17, 1000, 255, 64 * 4 - 1])
def test_row_min_is_torchs_min_with_first_indices(width):
    """The pieced minimum gives torch's ``min(dim=1)``: the same values and the first index of
    each row's minimum, with ties inside a piece, across pieces and in the narrower last piece,
    infinities, and a NaN row (torch's own answer)."""
    from zsdense.dense.knn import ROW_MIN_CHUNK, _row_min

    g = torch.Generator().manual_seed(width)
    d = torch.randn(12, width, generator=g)
    low = d.min(dim=1).values - 1.0
    d[0, [5, 3]] = low[0]  # a tie inside the first piece: index 3 is the first
    d[1, [width - 1, ROW_MIN_CHUNK + 2]] = low[1]  # across pieces
    d[2, [width - 2, width - 1]] = low[2]  # at the end (the last piece may be narrower)
    d[3, :] = 7.0  # all equal: index 0
    d[4, ROW_MIN_CHUNK * 2] = float("-inf")
    d[5, :] = float("inf")
    d[6, width // 2] = float("nan")
    d[7, [1, width - 1]] = float("-inf")
    want_v, want_i = d.min(dim=1, keepdim=True)
    got_v, got_i = _row_min(d)
    assert torch.equal(got_i, want_i)
    assert torch.equal(torch.nan_to_num(got_v), torch.nan_to_num(want_v))
    assert torch.isnan(got_v[6]).all() and got_v.shape == want_v.shape == (12, 1)
    assert got_i.dtype == torch.long


def test_row_min_serves_the_search(data, monkeypatch):
    """k = 1 steps take their minimum through ``_row_min`` (wide steps), and the neighbours stay
    the brute-force ones."""
    from zsdense.dense import knn

    q, m = data
    seen = []
    real = knn._row_min
    monkeypatch.setattr(knn, "_row_min", lambda d: seen.append(d.shape) or real(d))
    d, i = knn_search(q, m, 1)
    assert seen and all(s[0] <= q.shape[0] for s in seen)
    bd, bi = _brute(q, m, 1)
    assert torch.equal(i, bi) and torch.allclose(d, bd, rtol=1e-5, atol=1e-5)
