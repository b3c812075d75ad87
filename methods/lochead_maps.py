"""Localization heads: the attention maps, from capture to box.

One prefill gives the last prompt token's attention over the image tokens for every (layer, head)
(``capture_image_maps``); on the image grid such a map is smoothed (``gaussian_smooth``), thresholded at
its mean, split into connected components (``connected_components``) and read as a spatial entropy
(head selection, ``select_sample_heads``) or as a box (``box_from_grid``). methods/lochead.py has the paper's
summary; the official code's variants of these steps are in methods/lochead_official.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
from scipy import ndimage

from . import hooks
from .families import IMAGE_KEYS, TOKEN_INPUTS
from .technique import RequestError

BOX_MODES = ("component", "minmax")

# ---------------------------------------------------------------------------------------
# Selection arithmetic: S_img and its knee, smoothing, components, spatial entropy
# ---------------------------------------------------------------------------------------


def image_attention_sum(maps: torch.Tensor) -> torch.Tensor:
    """S_img: (layers, heads, image tokens) -> (layers, heads), the attention mass on the image."""
    return maps.sum(-1)


def knee_index(values: Sequence[float]) -> int:
    """Index of the knee of a curve: the point with the largest distance to its chord.

    ``values`` is the curve in the order given (for head selection: S_img sorted in
    descending order). The chord joins the first and the last point; ties keep the first.
    """
    y = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = y.numel()
    if n < 3:
        return 0
    x = torch.arange(n, dtype=torch.float64)
    dx, dy = x[-1] - x[0], y[-1] - y[0]
    # distance of (x_i, y_i) to the line through the first and last point
    dist = (dy * (x - x[0]) - dx * (y - y[0])).abs() / torch.sqrt(dx * dx + dy * dy)
    return int(torch.argmax(dist))


def heads_above_knee(s_img: torch.Tensor) -> list[tuple[int, int]]:
    """(layer, head) pairs whose S_img is at or above the knee of the descending curve, best first."""
    flat = s_img.flatten()
    order = torch.argsort(flat, descending=True, stable=True)
    k = knee_index(flat[order].tolist())
    n_heads = s_img.shape[1]
    return [(int(i) // n_heads, int(i) % n_heads) for i in order[: k + 1]]


def gaussian_smooth(grid: torch.Tensor, sigma: float = 1.0, truncate: float = 4.0) -> torch.Tensor:
    """Gaussian filter of a 2-D map (or of each map of a stack (..., h, w)), borders reflected.

    scipy.ndimage.gaussian_filter over the last two axes (truncate 4 sigma, 'reflect'), on the map's
    device and dtype (integers: float32). sigma <= 0 returns the map unchanged.
    """
    if sigma <= 0:
        return grid.clone()
    out_dtype = grid.dtype if grid.is_floating_point() else torch.float32
    values = grid.detach().cpu()
    if values.dtype not in (torch.float32, torch.float64):  # numpy has no bfloat16, scipy no float16
        values = values.float()
    smoothed = ndimage.gaussian_filter(values.numpy(), sigma, truncate=truncate, axes=(-2, -1))
    return torch.from_numpy(smoothed).to(grid.device, out_dtype)


# scipy.ndimage.label's structuring elements: edge neighbours (4) or edge and corner neighbours (8)
_NEIGHBOURS = {4: ndimage.generate_binary_structure(2, 1), 8: ndimage.generate_binary_structure(2, 2)}


def connected_components(mask: torch.Tensor, connectivity: int = 4) -> tuple[torch.Tensor, int]:
    """Label the connected True regions of a 2-D boolean mask (scipy.ndimage.label).

    Returns (labels, n): labels (long, on the CPU) is 0 on background and 1..n on components,
    numbered in raster order of their first cell (box ties rely on it). connectivity: 4 or 8.
    """
    if connectivity not in _NEIGHBOURS:
        raise ValueError(f"connectivity must be 4 or 8, not {connectivity}")
    labels, n = ndimage.label(mask.detach().bool().cpu().numpy(), _NEIGHBOURS[connectivity])
    return torch.from_numpy(labels).long(), int(n)


def above_mean(grid: torch.Tensor) -> torch.Tensor:
    """Cells strictly above the map's mean (a uniform map keeps nothing)."""
    return grid > grid.mean()


def spatial_entropy(grid: torch.Tensor, connectivity: int = 8) -> float:
    """Entropy of the connected components of the map thresholded at its mean.

    Each component's share is its attention mass over the total mass of all components;
    one compact blob gives 0, scattered attention a high value, and a map with no cell
    above its mean (uniform) gives +inf: it does not localise anything.
    """
    labels, n = connected_components(above_mean(grid), connectivity)
    if n == 0:
        return math.inf
    mass = torch.zeros(n + 1, dtype=torch.float64).index_add_(
        0, labels.flatten(), grid.detach().double().cpu().flatten()
    )[1:]
    p = mass / mass.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def select_sample_heads(maps: torch.Tensor, grid_hw: tuple[int, int], per_sample: int = 10, connectivity: int = 8):
    """One sample's selection: heads above the S_img knee, then the ``per_sample`` lowest-entropy ones.

    maps: (layers, heads, image tokens). Returns (selected [(layer, head)], s_img (layers, heads),
    candidates [(layer, head)] above the knee, entropies {(layer, head): float}).
    """
    s_img = image_attention_sum(maps)
    candidates = heads_above_knee(s_img)
    h, w = grid_hw
    entropy = {(l, hd): spatial_entropy(maps[l, hd].reshape(h, w), connectivity) for l, hd in candidates}
    ranked = sorted(candidates, key=lambda lh: (entropy[lh], lh))  # stable tie-break by (layer, head)
    selected = [lh for lh in ranked if math.isfinite(entropy[lh])][:per_sample]
    return selected, s_img, candidates, entropy


# ---------------------------------------------------------------------------------------
# Box extraction
# ---------------------------------------------------------------------------------------


def box_from_grid(grid: torch.Tensor, mode: str = "component", connectivity: int = 8) -> list[float]:
    """Box (x1, y1, x2, y2) as fractions of the grid, from the cells above the map's mean.

    mode "component": the box of the largest connected component (cells; ties: larger mass);
    mode "minmax": the min/max box of all cells above the mean. A map with nothing above
    its mean (uniform) yields the whole grid.
    """
    if mode not in BOX_MODES:
        raise ValueError(f"box_mode must be one of {BOX_MODES}, not {mode!r}")
    h, w = grid.shape
    keep = above_mean(grid)
    if not keep.any():
        return [0.0, 0.0, 1.0, 1.0]
    if mode == "component":
        labels, n = connected_components(keep, connectivity)
        flat = labels.flatten()
        size = torch.bincount(flat, minlength=n + 1)[1:].double()
        mass = torch.zeros(n + 1, dtype=torch.float64).index_add_(0, flat, grid.detach().double().cpu().flatten())[1:]
        best = max(range(n), key=lambda i: (size[i].item(), mass[i].item())) + 1
        keep = labels == best
    rows = keep.any(1).nonzero().flatten()
    cols = keep.any(0).nonzero().flatten()
    return [cols[0].item() / w, rows[0].item() / h, (cols[-1].item() + 1) / w, (rows[-1].item() + 1) / h]


def combine_head_maps(maps: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """(k, h, w) head maps -> (h, w): each smoothed, then summed."""
    return gaussian_smooth(maps.float(), sigma).sum(0)


# ---------------------------------------------------------------------------------------
# Capturing maps (one prefill)
# ---------------------------------------------------------------------------------------


class _PrefillDone(Exception):
    """Raised by ``StopAfter`` once the deepest needed layer has been captured."""


@dataclasses.dataclass
class StopAfter(hooks.AttnEdit):
    """Ends the forward after ``layers[0]``: layers beyond the deepest captured head are never run."""

    def observe(self, probs, layer):
        raise _PrefillDone()


# What a prefill takes of the processor's inputs: tokens, every family's image and per-token inputs
# (families.IMAGE_KEYS, TOKEN_INPUTS: Qwen's M-RoPE, Gemma 3's bidirectional image mask), and positions.
FORWARD_KEYS = ("input_ids", "attention_mask", "position_ids", *IMAGE_KEYS, *TOKEN_INPUTS)


def image_grid(model, n_tokens: int) -> tuple[int, int]:
    """(rows, cols) of the image-token grid, from the vision config; checked against the prompt."""
    vc = model.config.vision_config
    side = vc.image_size // vc.patch_size
    if side * side != n_tokens:
        raise RequestError(
            f"the prompt has {n_tokens} image tokens but the vision tower gives a {side}x{side} grid; "
            "llava_lochead supports LLaVA-1.5-style single-image prompts (one square grid per image)"
        )
    return side, side


@torch.no_grad()
def capture_image_maps(
    model, inputs: dict, image_pos: torch.Tensor, layers: Sequence[int] | None = None
) -> torch.Tensor:
    """One prefill; the last prompt token's attention over the image tokens.

    Returns (len(layers), heads, image tokens) float32, layers in ascending order (all LM
    layers when ``layers`` is None). The forward stops after the deepest requested layer.
    """
    return capture_batch_maps(model, inputs, [image_pos], layers)[0]


@torch.no_grad()
def capture_batch_maps(
    model, inputs: dict, image_pos: Sequence[torch.Tensor], layers: Sequence[int] | None = None, offsets=None
) -> list[torch.Tensor]:
    """``capture_image_maps`` for each row of a left-padded batch in one prefill: ``image_pos[i]`` are row i's
    image positions as for its prompt alone, ``offsets[i]`` its left padding (None: a batch of one, unpadded).
    One (len(layers), heads, image tokens) map per row."""
    n_layers = hooks.num_layers(model, "lm")
    layers = sorted(set(range(n_layers) if layers is None else layers))
    captures = []
    for i, pos in enumerate(image_pos):
        capture = hooks.Capture(layers=layers, rows=hooks.Rows.last(), keys=pos)
        if offsets is not None:
            capture.place([i], offsets[i])
        captures.append(capture)
    edits = list(captures)
    if layers[-1] < n_layers - 1:
        edits.append(StopAfter(layers=[layers[-1]], rows=hooks.Rows.last(), keys=[0]))
    fwd = {k: v for k, v in inputs.items() if k in FORWARD_KEYS and v is not None}
    with hooks.edited(model, *edits):
        try:
            model(**fwd, use_cache=False, logits_to_keep=1)
        except _PrefillDone:
            pass
    return [c.stacked(0)[:, 0, :, 0, :] for c in captures]  # (layers, heads, keys) each
