"""Perception Magnifier, the map and the search: which image tokens the model looks at.

At the first decoding step the last query's attention over the image tokens, in the deep layers
(l >= L, 1-based; L = 12 of 32), gives a token map: max over heads, sum over layers. ``refine``
is PM's iterative search: 2-means the current map, hide its high cluster from the model,
re-forward, and repeat until the remaining attention is at most ``beta``; H* averages the maps over
the passes in which each token was visible. Pure numpy/torch on hand-made inputs; the model passes
are a callback (methods/pm.py runs them). The ``official_*`` functions are the reference's
arithmetic (github ShunqiM/PM @ 58c2c0f), checked against its fixtures (tests/test_parity_pm.py).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch

PAPER_DEPTH, PAPER_DEEP_LAYER = 32, 12


def deep_layers(n_layers: int, deep_layer: int | None = None) -> range:
    """0-based indices of the deep layers l >= L (L 1-based; default 12 of 32 scaled to the depth)."""
    if deep_layer is None:
        deep_layer = max(1, int(PAPER_DEEP_LAYER * n_layers / PAPER_DEPTH + 0.5))
    if not 1 <= deep_layer <= n_layers:
        raise ValueError(f"deep_layer={deep_layer} is outside the model's layers 1..{n_layers} (1-based)")
    return range(deep_layer - 1, n_layers)


def token_map(probs: torch.Tensor) -> np.ndarray:
    """(layers, heads, tokens) attention of the last query -> (tokens,): max over heads, sum over layers."""
    return probs.float().amax(dim=1).sum(dim=0).double().cpu().numpy()


def two_means_high(values: np.ndarray) -> np.ndarray:
    """The high cluster of a 1-D 2-means (Lloyd from the min and max), as a boolean mask.

    Each value goes to the nearer centre (a tie goes to the low one); iterate until the
    assignment no longer changes. A constant input has no high cluster.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = v.min(), v.max()
    if not hi > lo:
        return np.zeros(v.shape, dtype=bool)
    high = None
    for _ in range(100):  # 1-D Lloyd converges in a few steps; the cap only guards against cycling
        new = np.abs(v - hi) < np.abs(v - lo)
        if high is not None and np.array_equal(new, high):
            break
        high = new
        lo, hi = v[~high].mean(), v[high].mean()
    return high.reshape(np.shape(values))


def official_two_means(values: np.ndarray) -> np.ndarray:
    """The reference's highlight mask (attention_resampler.py:263-299), in its dtype.

    Centres start at [min, max] (in the map's dtype); at most 10 Lloyd steps, each assigning
    by ``argmin`` of the distances (a tie goes to the low centre), then updating a centre only
    if its cluster is not empty, and stopping early once both centres moved < 1e-4. The high
    cluster is the one with the larger centre by ``argmax`` (a tie picks cluster 0), read from
    the assignment made before the last update. So a constant map whose mean equals its value
    exactly (e.g. zeros) blocks every token, while float32 rounding of the mean can leave the
    same map with nothing blocked.
    """
    flat = np.asarray(values).ravel()
    centers = np.array([flat.min(), flat.max()])
    for _ in range(10):
        assign = np.argmin(np.abs(flat[:, None] - centers), axis=1)
        previous = centers.copy()
        for i in range(2):
            if np.sum(assign == i) > 0:
                centers[i] = flat[assign == i].mean()
        if np.all(np.abs(centers - previous) < 1e-4):
            break
    return (assign == np.argmax(centers)).reshape(np.shape(values))


def official_layer_sum(per_layer: list[np.ndarray], dtype=np.float32) -> np.ndarray:
    """The reference's deep map (attention_resampler.py:186-246, map_constructor='original'):
    each layer's max over heads in the attention dtype, stacked and summed over layers by numpy in
    that dtype. float32 is what the fixtures ran; float16 is what the authors' runs did (fp16 model:
    the attention probabilities are fp16 and ``np.stack`` of fp16 tensors sums in numpy float16,
    each layer's add rounded to fp16; ``precision=official``, docs/pm.md "Precision")."""
    return np.sum(np.stack([np.asarray(m, dtype=np.float32).astype(dtype) for m in per_layer], axis=0), axis=0)


@dataclasses.dataclass
class Search:
    """What the iterative refinement found. ``maps[i]``: the layer-averaged map of pass i (0: unmasked)."""

    h_star: np.ndarray  # (tokens,)
    iterations: int  # refinement passes (re-forwards) run
    blocked: list  # cumulative blocked-token masks, one per refinement pass
    maps: list
    raw: list = dataclasses.field(default_factory=list)  # the layer sums as returned (before the division)
    exit_sums: list = dataclasses.field(default_factory=list)  # the exit statistic after each re-forward

    @property
    def sums(self) -> list[float]:
        """The exit statistic of each pass: map sum / number of deep layers."""
        return [float(m.sum()) for m in self.maps]


def refine(
    first_map: np.ndarray,
    forward_blocked: Callable[[np.ndarray], np.ndarray],
    n_layers: int,
    beta: float,
    max_iter: int,
    official: bool = False,
) -> Search:
    """PM's iterative search for the perceived tokens (model_generate.py:343-418, pm_sample.py:158-225).

    first_map: the layer-summed map of the unmasked pass; forward_blocked(blocked) returns the
    same map with the ``blocked`` tokens hidden from the model. Each pass: average in the
    current map over the tokens still visible, 2-means it, block its high cluster, re-forward,
    and stop when the new map's sum / n_layers <= beta or after ``max_iter`` re-forwards.
    H* = sum of maps / number of passes in which each token was visible (the last re-forward
    only decides the stop, as in the reference).

    official=True: the maps keep the dtype they come in (float32 there), the split is
    ``official_two_means`` and the exit statistic is float(map sum) / n_layers
    (model_generate.py:385); a split with no high cluster does not stop the search (the
    reference re-forwards the same mask until ``max_iter``).
    """
    dtype = None if official else np.float64
    split = official_two_means if official else two_means_high
    raw = np.asarray(first_map, dtype=dtype)
    current = raw / n_layers
    total = np.zeros(current.shape, dtype=np.float64)
    seen = np.zeros(current.shape, dtype=np.float64)
    visible = np.ones(current.shape, dtype=bool)
    search = Search(h_star=current, iterations=0, blocked=[], maps=[current], raw=[raw])
    while search.iterations < max_iter:
        seen += visible
        total += current
        search.h_star = total / np.maximum(seen, 1)
        high = split(current)
        if not high.any() and not official:  # a flat map: nothing stands out, nothing to block
            break
        visible &= ~high
        search.blocked.append(~visible)
        raw = np.asarray(forward_blocked(~visible), dtype=dtype)
        current = raw / n_layers
        search.iterations += 1
        search.maps.append(current)
        search.raw.append(raw)
        stat = float(raw.sum()) / n_layers if official else current.sum()
        search.exit_sums.append(float(stat))
        if stat <= beta:
            break
    return search
