"""Representation alignment metrics and the layer-wise alignment of a LLaVA model's image tokens.

- ``linear_cka(X, Y)`` (Kornblith et al. 2019): ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F),
  columns centred; invariant to rotations and isotropic scaling of either side.
- ``cknna(X, Y, k)`` (Huh et al. 2024, "The Platonic Representation Hypothesis", the metric
  VIRAL plots): centred kernel alignment restricted to mutual k-nearest neighbours.
  With K = X X^T, L = Y Y^T (rows L2-normalised first), centred Kc = H K H, Lc = H L H,
      align(K, L) = sum_{i != j} a_ij Kc_ij Lc_ij,  a_ij = [j in knn_K(i)] [j in knn_L(i)],
      CKNNA = align(K, L) / sqrt(align(K, K) align(L, L)),
  where knn_K(i) are the k rows most similar to row i under K (i itself excluded).
  This is the biased (H K H) centring; the Platonic reference code defaults to an unbiased
  HSIC estimator, which gives slightly different absolute values on small samples.

``layerwise_alignment`` runs a model over images and returns, for every entry of
``hidden_states`` (0 = the embeddings, i.e. the projected image features; l = after
decoder layer l; the last entry is after the final norm), CKNNA and CKA between the
image-token hidden states and reference features (a teacher's, resampled to the grid).
Every image token of every image is one sample (rows subsampled to ``max_rows``).
"""

from __future__ import annotations

import math

import torch


def _centre_kernel(k: torch.Tensor) -> torch.Tensor:
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    num = (y.T @ x).pow(2).sum()
    den = (x.T @ x).norm() * (y.T @ y).norm()
    return float(num / den)


def knn_mask(k: torch.Tensor, topk: int) -> torch.Tensor:
    """Boolean (n, n): row i marks the ``topk`` most similar j != i under kernel k."""
    n = k.shape[0]
    k = k.clone()
    k.fill_diagonal_(-math.inf)
    idx = k.topk(topk, dim=1).indices
    mask = torch.zeros(n, n, dtype=torch.bool, device=k.device)
    mask.scatter_(1, idx, True)
    return mask


def cknna(x: torch.Tensor, y: torch.Tensor, topk: int = 10, normalize: bool = True) -> float:
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"CKNNA needs paired rows; got {n} and {y.shape[0]}")
    if not 0 < topk < n:
        raise ValueError(f"CKNNA topk={topk} must be in 1..{n - 1} for {n} samples")
    x, y = x.double(), y.double()
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
        y = torch.nn.functional.normalize(y, dim=1)
    kx, ky = x @ x.T, y @ y.T
    cx, cy = _centre_kernel(kx), _centre_kernel(ky)
    mx, my = knn_mask(kx, topk), knn_mask(ky, topk)
    cross = (cx * cy)[mx & my].sum()
    self_x = cx.pow(2)[mx].sum()
    self_y = cy.pow(2)[my].sum()
    return float(cross / torch.sqrt(self_x * self_y))


@torch.no_grad()
def image_token_states(model, inputs: dict, image_token_id: int) -> list[torch.Tensor]:
    """Per hidden_states entry: (n_image_tokens, d) for the one image of ``inputs``."""
    out = model(**inputs, output_hidden_states=True)
    pos = (inputs["input_ids"][0] == image_token_id).nonzero().flatten()
    return [h[0, pos].float() for h in out.hidden_states]


def layerwise_alignment(states: list[list[torch.Tensor]], reference: list[torch.Tensor], *, topk: int = 10,
                        max_rows: int = 2048, seed: int = 0) -> list[dict]:
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
        table.append({"layer": layer, "cknna": cknna(h, ref, topk), "cka": linear_cka(h, ref)})
    return table
