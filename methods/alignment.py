"""Representation alignment metrics and the layer-wise alignment of a LLaVA model's image tokens.

The metrics are those of the Platonic Representation Hypothesis reference code
(minyoungg/platonic-rep @ dcd76ba, ``metrics.py``), the CKNNA that VIRAL's figures plot;
tests/fixtures/official/cknna/ holds that code's outputs and the tests compare against them.
On linear kernels K = X X^T, L = Y Y^T (rows L2-normalised first, as ``measure_alignment.py:55-57``):

- ``hsic_unbiased`` (metrics.py:227-245, Song et al. 2012 eq. 5) and ``hsic_biased``
  (metrics.py:252-255, tr(K H L H));
- ``cka(X, Y, unbiased)`` (metrics.py:113-136): HSIC(K, L) / (sqrt(HSIC(K, K) HSIC(L, L)) + 1e-6);
- ``cknna(X, Y, k, unbiased)`` (metrics.py:181-224): HSIC of the kernels masked to mutual
  k-nearest neighbours, ``sim(K, L) = HSIC(M * K, M * L)`` with M = knn_K * knn_L, normalised as
  CKA. The unbiased estimator (the reference's default) excludes each row itself from its
  neighbours; the biased one ranks the row itself too (metrics.py:190-201);
- ``mutual_knn(X, Y, k)`` (metrics.py:59-87): mean share of common k-nearest neighbours.

Note the reference masks the raw kernels and lets HSIC centre them; an earlier version of this
module centred first and masked after, which gives other values (0.27 vs the reference's 0.25).

``layerwise_alignment`` runs a model over images and returns, for every entry of
``hidden_states`` (0 = the embeddings, i.e. the projected image features; l = after
decoder layer l; the last entry is after the final norm), CKNNA and CKA between the
image-token hidden states and reference features (a teacher's, resampled to the grid).
Every image token of every image is one sample (rows subsampled to ``max_rows``).
"""

from __future__ import annotations

import torch

EPS = 1e-6  # the reference's denominators (metrics.py:135, 224)


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    m = k.shape[0]
    k0, l0 = k.clone().fill_diagonal_(0), l.clone().fill_diagonal_(0)
    value = (k0 * l0.T).sum() + k0.sum() * l0.sum() / ((m - 1) * (m - 2)) - 2 * (k0 @ l0).sum() / (m - 2)
    return value / (m * (m - 3))


def hsic_biased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    h = torch.eye(k.shape[0], dtype=k.dtype, device=k.device) - 1 / k.shape[0]
    return torch.trace(k @ h @ l @ h)


def _kernels(x: torch.Tensor, y: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"alignment metrics need paired rows; got {x.shape[0]} and {y.shape[0]}")
    x, y = x.double(), y.double()
    if normalize:
        x, y = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)
    return x @ x.T, y @ y.T


def cka(x: torch.Tensor, y: torch.Tensor, unbiased: bool = False, normalize: bool = True) -> float:
    k, l = _kernels(x, y, normalize)
    hsic = hsic_unbiased if unbiased else hsic_biased
    return float(hsic(k, l) / (torch.sqrt(hsic(k, k) * hsic(l, l)) + EPS))


def knn_mask(k: torch.Tensor, topk: int, include_self: bool = False) -> torch.Tensor:
    """(n, n) 0/1: row i marks its ``topk`` largest entries of kernel k (itself excluded unless include_self)."""
    ranked = k if include_self else k.clone().fill_diagonal_(float("-inf"))
    idx = ranked.topk(topk, dim=1).indices
    return torch.zeros_like(k).scatter_(1, idx, 1.0)


def cknna(x: torch.Tensor, y: torch.Tensor, topk: int = 10, unbiased: bool = True, normalize: bool = True) -> float:
    n = x.shape[0]
    if not 2 <= topk < n:
        raise ValueError(f"CKNNA topk={topk} must be in 2..{n - 1} for {n} samples")
    k, l = _kernels(x, y, normalize)
    hsic = hsic_unbiased if unbiased else hsic_biased
    masks = {"k": knn_mask(k, topk, include_self=not unbiased), "l": knn_mask(l, topk, include_self=not unbiased)}

    def sim(a, b, ma, mb):
        m = masks[ma] * masks[mb]
        return hsic(m * a, m * b)

    return float(sim(k, l, "k", "l")) / float(torch.sqrt(sim(k, k, "k", "k") * sim(l, l, "l", "l")) + EPS)


def mutual_knn(x: torch.Tensor, y: torch.Tensor, topk: int = 10, normalize: bool = True) -> float:
    k, l = _kernels(x, y, normalize)
    common = knn_mask(k, topk) * knn_mask(l, topk)
    return float((common.sum(1) / topk).mean())


@torch.no_grad()
def image_token_states(
    model, inputs: dict, image_token_id: int | None = None, positions: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Per hidden_states entry: (n, d) at ``positions`` of the one prompt of ``inputs`` (default: every
    ``image_token_id`` token)."""
    out = model(**inputs, output_hidden_states=True)
    pos = (inputs["input_ids"][0] == image_token_id).nonzero().flatten() if positions is None else positions
    return [h[0, pos].float() for h in out.hidden_states]


def layerwise_alignment(
    states: list[list[torch.Tensor]],
    reference: list[torch.Tensor],
    *,
    topk: int = 10,
    max_rows: int = 2048,
    seed: int = 0,
    unbiased: bool = True,
) -> list[dict]:
    """states[i][l]: image i's (T, d) image-token states at hidden_states entry l;
    reference[i]: (T, d_ref) features on the same grid. Returns one row per layer."""
    n_layers = len(states[0])
    ref = torch.cat([r.float() for r in reference])
    rows = ref.shape[0]
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(rows, generator=g)[:max_rows] if rows > max_rows else torch.arange(rows)
    ref = ref[pick]
    table = []
    for layer in range(n_layers):
        h = torch.cat([s[layer] for s in states])[pick]
        table.append({"layer": layer, "cknna": cknna(h, ref, topk, unbiased=unbiased), "cka": cka(h, ref)})
    return table
