"""CKNNA and linear CKA against brute-force references on small random matrices."""

import math

import numpy as np
import pytest
import torch

from methods import alignment


def _brute_cka(x, y):
    """HSIC form: tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)) with linear kernels."""
    n = x.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ H @ b @ H)

    return hsic(K, L) / math.sqrt(hsic(K, K) * hsic(L, L))


def _brute_cknna(x, y, k):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    n = x.shape[0]
    K, L = x @ x.T, y @ y.T
    H = np.eye(n) - np.ones((n, n)) / n
    Kc, Lc = H @ K @ H, H @ L @ H

    def knn(M, i):
        others = [j for j in range(n) if j != i]
        return set(sorted(others, key=lambda j: -M[i, j])[:k])

    def align(A, B, MA, MB):
        total = 0.0
        for i in range(n):
            common = knn(MA, i) & knn(MB, i)
            for j in range(n):
                if j != i and j in common:
                    total += A[i, j] * B[i, j]
        return total

    return align(Kc, Lc, K, L) / math.sqrt(align(Kc, Kc, K, K) * align(Lc, Lc, L, L))


@pytest.mark.parametrize("seed", [0, 1])
def test_cka_and_cknna_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(20, 6))
    y = x[:, :4] @ rng.normal(size=(4, 5)) + 0.8 * rng.normal(size=(20, 5))  # related, not identical
    assert alignment.linear_cka(torch.tensor(x), torch.tensor(y)) == pytest.approx(_brute_cka(x, y), rel=1e-9)
    for k in (3, 7):
        got = alignment.cknna(torch.tensor(x), torch.tensor(y), topk=k)
        assert got == pytest.approx(_brute_cknna(x, y, k), rel=1e-9)


def test_identical_features_give_one_and_rotation_leaves_cka_unchanged():
    rng = np.random.default_rng(2)
    x = torch.tensor(rng.normal(size=(30, 8)))
    y = torch.tensor(rng.normal(size=(30, 5)))
    assert alignment.linear_cka(x, x) == pytest.approx(1.0)
    assert alignment.cknna(x, x, topk=5) == pytest.approx(1.0)
    q, _ = torch.linalg.qr(torch.tensor(rng.normal(size=(8, 8))))
    assert alignment.linear_cka(x @ q, y) == pytest.approx(alignment.linear_cka(x, y), rel=1e-9)
    assert alignment.linear_cka(3.0 * x @ q, y) == pytest.approx(alignment.linear_cka(x, y), rel=1e-9)
    # rotations keep inner products, so the neighbour structure and CKNNA too
    assert alignment.cknna(x @ q, y, topk=5) == pytest.approx(alignment.cknna(x, y, topk=5), rel=1e-9)
    # unrelated features align less than related ones
    assert alignment.cknna(x, y, topk=5) < 0.5


def test_cknna_bad_topk():
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="topk"):
        alignment.cknna(x, x, topk=4)


def test_layerwise_alignment_rows():
    torch.manual_seed(0)
    ref = [torch.randn(16, 3) for _ in range(3)]
    states = [[r @ torch.randn(3, 6), torch.randn(16, 6)] for r in ref]  # layer 0: a linear map of ref
    table = alignment.layerwise_alignment(states, ref, topk=5, max_rows=40)
    assert [row["layer"] for row in table] == [0, 1]
    assert table[0]["cka"] > table[1]["cka"] and table[0]["cknna"] > table[1]["cknna"]
