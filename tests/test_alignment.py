"""Alignment metrics: the Platonic reference's outputs (fixtures), and an independent numpy
calculation of the same definitions on small random matrices."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from methods import alignment

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official" / "cknna"


def _np_hsic(K, L, unbiased):
    m = K.shape[0]
    if not unbiased:
        H = np.eye(m) - np.ones((m, m)) / m
        return np.trace(K @ H @ L @ H)
    K0, L0 = K.copy(), L.copy()
    np.fill_diagonal(K0, 0)
    np.fill_diagonal(L0, 0)
    return ((K0 * L0.T).sum() + K0.sum() * L0.sum() / ((m - 1) * (m - 2)) - 2 * (K0 @ L0).sum() / (m - 2)) / (
        m * (m - 3)
    )


def _np_knn(M, k, include_self):
    """0/1 matrix: row i's k largest entries, by explicit sorting."""
    n = M.shape[0]
    out = np.zeros((n, n))
    for i in range(n):
        candidates = [j for j in range(n) if include_self or j != i]
        for j in sorted(candidates, key=lambda j: -M[i, j])[:k]:
            out[i, j] = 1
    return out


def _np_cknna(x, y, k, unbiased):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    K, L = x @ x.T, y @ y.T
    mk, ml = _np_knn(K, k, not unbiased), _np_knn(L, k, not unbiased)

    def sim(A, B, ma, mb):
        return _np_hsic(ma * mb * A, ma * mb * B, unbiased)

    return sim(K, L, mk, ml) / (math.sqrt(sim(K, K, mk, mk) * sim(L, L, ml, ml)) + 1e-6)


def _np_cka(x, y, unbiased):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    K, L = x @ x.T, y @ y.T
    return _np_hsic(K, L, unbiased) / (math.sqrt(_np_hsic(K, K, unbiased) * _np_hsic(L, L, unbiased)) + 1e-6)


def test_metrics_equal_the_platonic_reference_outputs():
    """Fixtures from minyoungg/platonic-rep @ dcd76ba metrics.py (bench/parity/cknna_reference.py)."""
    provenance = json.loads((FIXTURES / "provenance.json").read_text())
    assert provenance["commit"].startswith("dcd76ba")
    inputs = load_file(str(FIXTURES / "inputs.safetensors"))
    cases = json.loads((FIXTURES / "cases.json").read_text())
    assert len(cases) == 4
    for case in cases:
        x, y = inputs[f"{case['pair']}.x"], inputs[f"{case['pair']}.y"]
        for key, want in case["values"].items():
            if key == "cka":
                got = alignment.cka(x, y)
            elif key == "unbiased_cka":
                got = alignment.cka(x, y, unbiased=True)
            else:
                metric, k = key.rsplit("_k", 1)
                if metric == "mutual_knn":
                    # the reference builds its masks in float32
                    assert alignment.mutual_knn(x, y, int(k)) == pytest.approx(want, abs=1e-6), (case["pair"], key)
                    continue
                got = alignment.cknna(x, y, int(k), unbiased=metric.endswith("_unbiased"))
            # same float64 arithmetic up to summation order
            assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (case["pair"], key)


@pytest.mark.parametrize("seed", [0, 1])
def test_cka_and_cknna_match_an_independent_calculation(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(20, 6))
    y = x[:, :4] @ rng.normal(size=(4, 5)) + 0.8 * rng.normal(size=(20, 5))  # related, not identical
    for unbiased in (False, True):
        assert alignment.cka(torch.tensor(x), torch.tensor(y), unbiased=unbiased) == pytest.approx(
            _np_cka(x, y, unbiased), rel=1e-9
        )
        for k in (3, 7):
            got = alignment.cknna(torch.tensor(x), torch.tensor(y), topk=k, unbiased=unbiased)
            assert got == pytest.approx(_np_cknna(x, y, k, unbiased), rel=1e-9)


def test_identical_features_give_one_and_rotation_leaves_the_metrics_unchanged():
    rng = np.random.default_rng(2)
    x = torch.tensor(rng.normal(size=(30, 8)))
    y = torch.tensor(rng.normal(size=(30, 5)))
    assert alignment.cka(x, x) == pytest.approx(1.0, abs=1e-4)  # the reference's +1e-6 in the denominator
    assert alignment.cknna(x, x, topk=5) == pytest.approx(1.0, abs=1e-3)
    assert alignment.mutual_knn(x, x, topk=5) == 1.0
    q, _ = torch.linalg.qr(torch.tensor(rng.normal(size=(8, 8))))
    for unbiased in (False, True):
        assert alignment.cka(3.0 * x @ q, y, unbiased) == pytest.approx(alignment.cka(x, y, unbiased), rel=1e-9)
        # rotations keep inner products, so the neighbour structure and CKNNA too
        assert alignment.cknna(x @ q, y, 5, unbiased) == pytest.approx(alignment.cknna(x, y, 5, unbiased), rel=1e-9)
    # unrelated features align less than related ones
    related = x[:, :5] + 0.1 * torch.tensor(rng.normal(size=(30, 5)))
    assert alignment.cknna(x, y, topk=5) < alignment.cknna(x, related, topk=5)


def test_cknna_bad_topk():
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="topk"):
        alignment.cknna(x, x, topk=4)
    with pytest.raises(ValueError, match="topk"):
        alignment.cknna(x, x, topk=1)  # the reference refuses topk < 2 too


def test_layerwise_alignment_rows():
    torch.manual_seed(0)
    ref = [torch.randn(16, 3) for _ in range(3)]
    states = [[r @ torch.randn(3, 6), torch.randn(16, 6)] for r in ref]  # layer 0: a linear map of ref
    table = alignment.layerwise_alignment(states, ref, topk=5, max_rows=40)
    assert [row["layer"] for row in table] == [0, 1]
    assert table[0]["cka"] > table[1]["cka"] and table[0]["cknna"] > table[1]["cknna"]
