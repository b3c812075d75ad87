"""Localization heads: training-free visual grounding from a few attention heads.

Kang et al., "Your Large Vision-Language Model Only Needs A Few Attention Heads For
Visual Grounding" (CVPR 2025). The last prompt token's attention over the image grid,
read from a handful of language-model heads, already points at the referred object.

Head discovery (per sample, over a grounding train split):
1. one prefill; for every (layer, head) the last prompt token's attention over the
   image tokens (a map over the patch grid) and its sum S_img;
2. keep the heads whose S_img lies above the knee of the descending S_img curve (the
   point with the largest distance to the chord joining the curve's ends);
3. of those, the ``per_sample`` (10) heads with the lowest spatial entropy: the map is
   thresholded at its mean, split into connected components, and the entropy of the
   components' shares is taken. The share of a component is its attention mass (not its
   cell count): a large faint blob and a small sharp one are told apart by what the head
   actually attends to;
then heads are ranked by how often they are selected over all samples.

Grounding (per request, one prefill, no decoding): the top-k heads' maps are smoothed
(Gaussian, sigma 1), summed, the cells above the mean kept, and the box of the largest
connected component (or the min/max box of all kept cells) is mapped back through the
processor's geometry (pad-to-square or resize+center-crop) to the original image and
written as ``[x1, y1, x2, y2]`` in 0..1, the format lmms-eval's ``refcoco*_bbox_rec``
tasks parse.

The official code's rules (seilk/LocalizationHeads @ 8ce33b0 and the authors' 9ffe219 rewrite)
differ in the prompt, the entropy, the elbow, the filters and the box; they are here one function
per official step (``official_*``, ``rank_heads_official*``), selected by ``selection``, ``prompt``,
``box_scaling`` and ``heads="self"``, and proven against golden fixtures (docs/lochead.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
from collections import deque
from pathlib import Path
from typing import Iterable, Sequence

import torch

from . import hooks
from .technique import Request, RequestError, Technique

DEFAULTS = {
    "top_k": 3,
    "sigma": 1.0,
    "box_mode": "component",
    "connectivity": 8,
    "decimals": 2,
    "selection": "ours",
    "box_scaling": "geometry",
    "prompt": "task",
    "block": "base",
}
BLOCKS = ("base", "highres")  # anyres (LLaVA-NeXT/OneVision): which block's grid the maps and box come from
BOX_MODES = ("component", "minmax")
BOX_SCALINGS = (
    "geometry",
    "stretch",
)  # undo the processor's pad/resize/crop | 9ffe219's stretch of the grid onto W x H
PROMPTS = ("task", "official")  # the lmms-eval task's prompt | the official referseg prompt (official_prompt_ids)
# The heads shipped in heads/llava-1.5-7b-hf.json (0-based layer, head): a third-party fork's hand-set
# list (liu-hanyu-97/LocalizationHeads conf/logic/selection_best.yaml), not the paper's or the official code's.
FORK_HEADS_7B = ((14, 24), (14, 13), (14, 26))

# ---------------------------------------------------------------------------------------
# Head selection arithmetic
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


def _reflect_index(n: int, radius: int) -> torch.Tensor:
    """Indices of a length-n axis padded by ``radius`` with scipy.ndimage's 'reflect' rule (d c b a | a b c d | d c b a)."""
    i = torch.arange(-radius, n + radius) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def gaussian_smooth(grid: torch.Tensor, sigma: float = 1.0, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian filter of a 2-D map (or a stack (..., h, w)), borders reflected.

    Same kernel and borders as scipy.ndimage.gaussian_filter (truncate 4 sigma, 'reflect').
    sigma <= 0 returns the map unchanged.
    """
    if sigma <= 0:
        return grid.clone()
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(grid.dtype if grid.is_floating_point() else torch.float32)
    out = grid.float() if not grid.is_floating_point() else grid
    for dim in (-2, -1):
        n = out.shape[dim]
        padded = out.index_select(dim, _reflect_index(n, radius).to(out.device))
        windows = padded.unfold(dim, 2 * radius + 1, 1)  # (..., n, ..., 2r+1)
        out = (windows * kernel.to(out.device)).sum(-1)
    return out


def connected_components(mask: torch.Tensor, connectivity: int = 4) -> tuple[torch.Tensor, int]:
    """Label the connected True regions of a 2-D boolean mask.

    Returns (labels, n): labels is 0 on background and 1..n on components, numbered in
    raster order of their first cell (as scipy.ndimage.label does). connectivity: 4 or 8.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, not {connectivity}")
    m = mask.bool().cpu()
    h, w = m.shape
    cells = m.tolist()
    labels = [[0] * w for _ in range(h)]
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    n = 0
    for r in range(h):
        for c in range(w):
            if not cells[r][c] or labels[r][c]:
                continue
            n += 1
            labels[r][c] = n
            queue = deque([(r, c)])
            while queue:
                y, x = queue.popleft()
                for dy, dx in steps:
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and cells[yy][xx] and not labels[yy][xx]:
                        labels[yy][xx] = n
                        queue.append((yy, xx))
    return torch.tensor(labels, dtype=torch.long).reshape(h, w), n


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
# The official steps, one function each (preset=official: seilk/LocalizationHeads @ 8ce33b0,
# "HEAD"; preset=official_v2: the authors' rewrite 9ffe219, "v2"). docs/lochead.md has the table.
# ---------------------------------------------------------------------------------------

SELECTIONS = ("ours", "official", "official_v2")
OFFICIAL_BINARIZE = (
    0.001  # HEAD localization_heads_finder.py:195; v2 conf/logic/selection_v1.yaml entropy.binarize_threshold
)
V2_BOTTOM_ROW = 0.05  # v2 analyze.py:98
V2_FIRST_LAYER = 2  # v2 analyze.py:112 keeps layer > 1
V2_MIN_KEEP = 1  # v2 selection_v1.yaml threshold.min_keep


def official_spatial_entropy(
    grid: torch.Tensor, mean_factor: float = 1.0, threshold: float = OFFICIAL_BINARIZE
) -> tuple[float, torch.Tensor, int]:
    """(entropy, labels, n components): HEAD localization_heads_finder.py:195-247 (mean_factor 1),
    v2 analyze.py:20-42 (mean_factor 2).

    B = relu(S - mean_factor * mean(S)); components of B > threshold, 8-connected; a component's
    share is its B mass over the total B mass (cells at or below the threshold included, so the
    shares need not sum to 1). Total B mass 0 gives +inf; B mass but no component gives 0, which
    ranks such a head first (an official quirk both presets keep).
    """
    g = grid.detach().float().cpu()
    b = torch.relu(g - g.mean() * mean_factor)
    labels, n = connected_components(b > threshold, 8)
    total = float(b.sum())
    if total <= 0:
        return math.inf, labels, 0
    mass = torch.zeros(n + 1, dtype=torch.float32).index_add_(0, labels.flatten(), b.flatten())[1:]
    p = [float(m) / total for m in mass if m > 0]
    return float(-sum(q * math.log(q) for q in p if q > 0)) if p else 0.0, labels, n


def _chord_argmax(y_sorted) -> int:
    """Index of the point farthest from the chord of (i, y_i): HEAD localization_heads_finder.py:270-289, v2 analyze.py:52-62."""
    import numpy as np

    pts = np.stack([np.arange(len(y_sorted), dtype=np.float64), y_sorted], 1)
    line = pts[-1] - pts[0]
    norm = np.linalg.norm(line)
    if norm == 0:
        return 0
    unit = line / norm
    vec = pts - pts[0]
    return int(np.argmax(np.linalg.norm(vec - np.outer(vec @ unit, unit), axis=1)))


def official_elbow_head_index(sums: Sequence[float]) -> int:
    """HEAD localization_heads_finder.py:249-293: sums sorted ascending, the chord's farthest point, and
    the *flattened head index* (layer * heads + head) of that head. HEAD then keeps the heads whose
    flattened index is >= it (:392), not those whose sum is: an official bug preset=official keeps."""
    import numpy as np

    y = np.asarray(sums, dtype=np.float64)
    order = np.argsort(y)
    return int(order[_chord_argmax(y[order])])


def official_elbow_value(sums: Sequence[float]) -> float:
    """v2 analyze.py:45-63: the sum at the chord's farthest point; heads with a sum >= it are kept (:91)."""
    import numpy as np

    y = np.sort(np.asarray(sums, dtype=np.float64))
    if len(y) <= 2:
        return float(y.min()) if len(y) else 0.0
    return float(y[_chord_argmax(y)])


def _head_sums(maps: torch.Tensor) -> list[float]:
    """Per-head image-attention sums in flattened (layer, head) order, float32 as the official `.sum().item()`."""
    return [float(v) for v in maps.float().sum(-1).flatten()]


def rank_heads_official(maps: torch.Tensor, grid_hw: tuple[int, int]) -> list[dict]:
    """HEAD analyze_attention_file (localization_heads_finder.py:311-430): every head, entropy computed for
    flattened index >= the elbow head's index (+inf otherwise), stably sorted by entropy (:422)."""
    n_layers, n_heads = maps.shape[:2]
    threshold = official_elbow_head_index(_head_sums(maps))
    rows = []
    for l in range(n_layers):
        for h in range(n_heads):
            idx = l * n_heads + h
            se = official_spatial_entropy(maps[l, h].reshape(grid_hw))[0] if idx >= threshold else math.inf
            rows.append({"layer": l, "head": h, "spatial_entropy": se})
    return sorted(rows, key=lambda r: r["spatial_entropy"])


def rank_heads_official_v2(maps: torch.Tensor, grid_hw: tuple[int, int], min_keep: int = V2_MIN_KEEP) -> list[dict]:
    """v2 analyze_heads (analyze.py:66-119): sums >= the elbow value, entropy at 2x the mean, drop layers
    0-1 and heads with a bottom-row cell > 0.05; fewer than ``min_keep`` left: the top sums instead."""
    n_heads = maps.shape[1]
    sums = _head_sums(maps)
    thr = official_elbow_value(sums)
    rows = []
    for i, s in enumerate(sums):
        l, h = divmod(i, n_heads)
        if s < thr:
            rows.append({"layer": l, "head": h, "attn_sum": s, "spatial_entropy": math.inf, "bottom_row_focus": False})
            continue
        grid = maps[l, h].reshape(grid_hw)
        se = official_spatial_entropy(grid, mean_factor=2.0)[0]
        rows.append(
            {
                "layer": l,
                "head": h,
                "attn_sum": s,
                "spatial_entropy": se,
                "bottom_row_focus": bool((grid[-1] > V2_BOTTOM_ROW).any()),
            }
        )
    kept = [
        r
        for r in rows
        if math.isfinite(r["spatial_entropy"]) and not r["bottom_row_focus"] and r["layer"] >= V2_FIRST_LAYER
    ]
    if len(kept) < min_keep:
        kept = [r for r in sorted(rows, key=lambda r: r["attn_sum"], reverse=True) if not r["bottom_row_focus"]][
            :min_keep
        ]
    return sorted(kept, key=lambda r: r["spatial_entropy"])


def official_box_grid(combined: torch.Tensor) -> tuple[int, int, int, int]:
    """v2 bbox.py:148-160: cells with relu(M - mean) > 0, their inclusive min/max (x0, y0, x1, y1); none: (0, 0, 0, 0)."""
    keep = combined > combined.mean()
    if not keep.any():
        return 0, 0, 0, 0
    rows, cols = keep.any(1).nonzero().flatten(), keep.any(0).nonzero().flatten()
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def official_box_pixels(box_grid: Sequence[int], image_size: tuple[int, int], side: int) -> tuple[int, int, int, int]:
    """v2 bbox.py:172-181: the grid box stretched onto the original W x H (inclusive pixels). The grid
    covers the *padded square* image, so on a non-square image this box is off (an official bug)."""
    x0, y0, x1, y1 = box_grid
    w, h = image_size
    sx, sy = w / side, h / side
    return int(x0 * sx), int(y0 * sy), int(min(w - 1, (x1 + 1) * sx - 1)), int(min(h - 1, (y1 + 1) * sy - 1))


def select_heads(
    maps: torch.Tensor, grid_hw: tuple[int, int], selection: str = "ours", per_sample: int = 10, connectivity: int = 8
) -> list[tuple[int, int]]:
    """One sample's best heads under ``selection`` (ours | official | official_v2), best first."""
    if selection == "ours":
        return select_sample_heads(maps, grid_hw, per_sample, connectivity)[0]
    if selection == "official":
        ranked = rank_heads_official(maps, grid_hw)
    elif selection == "official_v2":  # its fallback heads may have no entropy: pipeline.py:70 uses them all the same
        return [(r["layer"], r["head"]) for r in rank_heads_official_v2(maps, grid_hw)][:per_sample]
    else:
        raise ValueError(f"selection must be one of {SELECTIONS}, not {selection!r}")
    return [(r["layer"], r["head"]) for r in ranked if math.isfinite(r["spatial_entropy"])][:per_sample]


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
# Undoing the processor's geometry
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where the original image lands in the processed (model input) image, per axis:
    processed = original * scale + offset, inside an out_w x out_h canvas. Built by
    ``processor_geometry`` from the processor's own settings (pad, resize, center crop)."""

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    out_w: int
    out_h: int
    orig_w: int
    orig_h: int

    def to_original(self, box: Sequence[float]) -> list[float]:
        """A box in fractions of the processed image -> fractions of the original image, clipped to 0..1."""
        x1, y1, x2, y2 = box
        xs = [(v * self.out_w - self.offset_x) / self.scale_x / self.orig_w for v in (x1, x2)]
        ys = [(v * self.out_h - self.offset_y) / self.scale_y / self.orig_h for v in (y1, y2)]
        clip = lambda v: min(1.0, max(0.0, v))  # noqa: E731
        return [clip(xs[0]), clip(ys[0]), clip(xs[1]), clip(ys[1])]

    def after_pad(self, pad) -> "Geometry":
        """This geometry (of a pad-to-square canvas) composed with the pad: original -> square -> processed."""
        ox, oy = pad.offset
        return Geometry(
            self.scale_x,
            self.scale_y,
            self.offset_x + ox * self.scale_x,
            self.offset_y + oy * self.scale_y,
            self.out_w,
            self.out_h,
            pad.orig_w,
            pad.orig_h,
        )

    def to_processed(self, box: Sequence[float]) -> list[float]:
        """A box in fractions of the original image -> fractions of the processed image (unclipped)."""
        x1, y1, x2, y2 = box
        fx = lambda v: (v * self.orig_w * self.scale_x + self.offset_x) / self.out_w  # noqa: E731
        fy = lambda v: (v * self.orig_h * self.scale_y + self.offset_y) / self.out_h  # noqa: E731
        return [fx(x1), fy(y1), fx(x2), fy(y2)]


def _size_get(size, key):
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def processor_geometry(image_processor, image_size: tuple[int, int]) -> Geometry:
    """The affine map original -> processed image of a transformers image processor.

    Follows the processor's own steps: pad to a square (``do_pad``, LLaVA's expand2square,
    image centred), resize (``shortest_edge`` keeping the aspect ratio, or an exact
    height x width), center crop (``do_center_crop``, padding first if the crop is larger).
    The HF port of llava-1.5 uses CLIPImageProcessor: shortest-edge resize + center crop.
    """
    w, h = image_size
    sx = sy = 1.0
    ox = oy = 0.0
    cw, ch = w, h
    if getattr(image_processor, "do_pad", False):
        side = max(cw, ch)
        ox += (side - cw) // 2
        oy += (side - ch) // 2
        cw = ch = side
    if getattr(image_processor, "do_resize", True):
        size = image_processor.size
        short_edge = _size_get(size, "shortest_edge")
        if _size_get(size, "height") and _size_get(size, "width"):
            nh, nw = int(_size_get(size, "height")), int(_size_get(size, "width"))
        elif short_edge:
            short, long = (cw, ch) if cw <= ch else (ch, cw)
            new_short, new_long = int(short_edge), int(int(short_edge) * long / short)
            nw, nh = (new_short, new_long) if cw <= ch else (new_long, new_short)
        else:
            raise ValueError(f"unsupported image processor size {size!r}: need shortest_edge or height/width")
        fx, fy = nw / cw, nh / ch
        sx, sy, ox, oy = sx * fx, sy * fy, ox * fx, oy * fy
        cw, ch = nw, nh
    if getattr(image_processor, "do_center_crop", False):
        crop = image_processor.crop_size
        tw, th = int(_size_get(crop, "width")), int(_size_get(crop, "height"))
        if tw > cw or th > ch:  # the processor pads before cropping
            px, py = ((tw - cw) // 2 if tw > cw else 0), ((th - ch) // 2 if th > ch else 0)
            ox, oy = ox + px, oy + py
            cw, ch = max(cw, tw), max(ch, th)
        top, left = int((ch - th) / 2.0), int((cw - tw) / 2.0)
        ox, oy = ox - left, oy - top
        cw, ch = tw, th
    return Geometry(sx, sy, ox, oy, cw, ch, w, h)


def format_box(box: Sequence[float], decimals: int = 2) -> str:
    """``[x1, y1, x2, y2]`` as LLaVA-1.5 writes it and lmms-eval's REC parser reads it."""
    return "[" + ", ".join(f"{v:.{decimals}f}" for v in box) + "]"


class AnswerEncodingError(RequestError):
    """The checkpoint's tokenizer cannot write the box text so that it decodes back unchanged."""


# The box format lmms-eval's refcoco*_bbox_rec tasks read: the first "[a, b, c, d]" of four numbers.
REC_BOX_PATTERN = re.compile(
    r"\[\s*(-?\d+(?:\.\d+)?),\s*(-?\d+(?:\.\d+)?),\s*(-?\d+(?:\.\d+)?),\s*(-?\d+(?:\.\d+)?)\s*\]"
)


def parse_box(text: str) -> list[float] | None:
    m = REC_BOX_PATTERN.search(text)
    return [float(g) for g in m.groups()] if m else None


def answer_ids(tokenizer, text: str) -> list[int]:
    """Token ids whose decoding (skip_special_tokens, as lmms-eval's llava_hf does) is ``text``,
    or reads as the same box in the REC format (a word-level tokenizer may decode
    "[0.12, 0.34, 0.56, 0.78]" as "[ 0.12, 0.34, 0.56, 0.78 ]", which parses the same)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    back = tokenizer.decode(ids, skip_special_tokens=True).strip()
    if back != text and (parse_box(back) is None or parse_box(back) != parse_box(text)):
        raise AnswerEncodingError(
            f"this checkpoint's tokenizer cannot write the box {text!r}: it decodes back as {back!r}, which "
            "lmms-eval's REC parser does not read as the same box. llava_lochead answers through the tokenizer, "
            "as llava_hf's decoding does, so the tokenizer must represent the digits, '.', ',' and brackets of the "
            "box (LLaMA/SentencePiece and byte-level BPE tokenizers do; shapeworld-tiny's has number tokens)"
        )
    return ids


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


FORWARD_KEYS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "image_sizes",
    "position_ids",
    "image_grid_thw",
    "mm_token_type_ids",
)  # image_grid_thw, mm_token_type_ids: Qwen2.5-VL (the model derives its M-RoPE positions from them)


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
    n_layers = hooks.num_layers(model, "lm")
    layers = sorted(set(range(n_layers) if layers is None else layers))
    capture = hooks.Capture(layers=layers, rows=hooks.Rows.last(), keys=image_pos)
    edits = [capture]
    if layers[-1] < n_layers - 1:
        edits.append(StopAfter(layers=[layers[-1]], rows=hooks.Rows.last(), keys=image_pos[:1]))
    fwd = {k: v for k, v in inputs.items() if k in FORWARD_KEYS and v is not None}
    with hooks.edited(model, *edits):
        try:
            model(**fwd, use_cache=False, logits_to_keep=1)
        except _PrefillDone:
            pass
    return capture.stacked(0)[:, 0, :, 0, :]  # (layers, heads, keys)


# ---------------------------------------------------------------------------------------
# Heads files
# ---------------------------------------------------------------------------------------


class HeadsFileError(ValueError):
    pass


def model_geometry(model) -> dict:
    tc = model.config.text_config
    return {"num_layers": hooks.num_layers(model, "lm"), "num_heads": int(tc.num_attention_heads)}


def model_id(model) -> str:
    return str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "unknown")


def same_model_id(a: str, b: str) -> bool:
    """Model ids match on their last path component (a hub id and a local copy of it agree)."""
    norm = lambda s: Path(str(s).rstrip("/")).name.lower()  # noqa: E731
    return norm(a) == norm(b)


def write_heads_file(
    path,
    heads: Sequence[dict],
    *,
    model_id: str,
    num_layers: int,
    num_heads: int,
    source: str,
    extra: dict | None = None,
):
    """Write a heads file: JSON with the model id, its geometry, where the heads came from, and the ranked heads."""
    doc = {
        "model_id": model_id,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "source": source,
        **(extra or {}),
        "heads": [
            {
                "layer": int(h["layer"]),
                "head": int(h["head"]),
                **{k: v for k, v in h.items() if k not in ("layer", "head")},
            }
            for h in heads
        ],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)  # atomic: concurrent discoveries (one per accelerate rank) never leave a half file
    return doc


def read_heads_file(path) -> dict:
    """Parse and structurally check a heads file (no model needed)."""
    path = Path(path)
    if not path.is_file():
        raise HeadsFileError(f"heads file {path} does not exist; run `lmms-plugins discover-heads` or use heads=auto")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HeadsFileError(
            f"heads file {path} is not valid JSON ({e}); regenerate it with `lmms-plugins discover-heads`"
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("heads"), list) or not doc["heads"]:
        raise HeadsFileError(
            f"heads file {path} has no 'heads' list; expected {{'model_id': ..., 'heads': [{{'layer': L, 'head': H}}, ...]}}"
        )
    for i, h in enumerate(doc["heads"]):
        ok = isinstance(h, dict) and all(
            isinstance(h.get(k), int) and not isinstance(h.get(k), bool) for k in ("layer", "head")
        )
        if not ok:
            raise HeadsFileError(f"heads file {path}: entry {i} ({h!r}) needs integer 'layer' and 'head' (0-based)")
    if "model_id" not in doc:
        raise HeadsFileError(f"heads file {path} has no 'model_id'")
    return doc


def load_heads(path, model, *, check_model_id: bool = True) -> list[tuple[int, int]]:
    """The ranked (layer, head) list of a heads file, validated against ``model``."""
    doc = read_heads_file(path)
    geo = model_geometry(model)
    mid = model_id(model)
    if check_model_id and not same_model_id(doc["model_id"], mid):
        raise HeadsFileError(
            f"heads file {path} was made for model {doc['model_id']!r}, but the loaded model is {mid!r}. Heads do not "
            "transfer between models: discover them for this model (`lmms-plugins discover-heads` or heads=auto), or, "
            "if this is the same checkpoint under another name, pass check_model_id=false"
        )
    for key in ("num_layers", "num_heads"):
        if key in doc and not isinstance(doc[key], int):
            raise HeadsFileError(f"heads file {path}: {key} must be an integer, not {doc[key]!r}")
        if key in doc and doc[key] != geo[key]:
            raise HeadsFileError(
                f"heads file {path} is for a model with {key}={doc[key]}, but the loaded model has {geo[key]}"
            )
    for h in doc["heads"]:
        if not (0 <= h["layer"] < geo["num_layers"] and 0 <= h["head"] < geo["num_heads"]):
            raise HeadsFileError(
                f"heads file {path} names layer {h['layer']} head {h['head']} (0-based), outside this model's "
                f"{geo['num_layers']} layers x {geo['num_heads']} heads: it was made for another model"
            )
    return [(h["layer"], h["head"]) for h in doc["heads"]]


# The official prompt: conv "referseg" (HEAD llava/conversation.py:373-380, SeparatorStyle.PLAIN :98-110)
REFERSEG_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)


def official_query(prompt_text: str, image_token: str = "<image>") -> str:
    """The request's question without the chat template: the text after the image token, a trailing
    assistant turn marker removed (the official finder is given the bare expression)."""
    text = (prompt_text or "").rsplit(image_token, 1)[-1]
    text = re.sub(r"\s*(ASSISTANT|Assistant|assistant)\s*:?\s*$", "", text)
    return text.strip()


def official_prompt_ids(
    tokenizer, query: str, image_token_id: int, n_image_tokens: int, system: str = REFERSEG_SYSTEM
) -> list[int]:
    """The official prompt's ids: system + "\\n" + "<image>\\n" + query (PLAIN: no roles, no assistant turn,
    so the last prompt token is the query's last token), tokenized in two chunks around the image as
    tokenizer_image_token does (HEAD llava/mm_utils.py:185-199), and the lone word-boundary piece "▁"
    (id 29871 in LLaMA's vocabulary) dropped everywhere (HEAD lab/stations.py:316-324). The image
    placeholder is expanded to the model's ``n_image_tokens`` copies of ``image_token_id`` (llava-hf layout)."""
    first = tokenizer(system + "\n").input_ids
    second = tokenizer("\n" + query, add_special_tokens=False).input_ids
    space = tokenizer.get_vocab().get("\u2581") if hasattr(tokenizer, "get_vocab") else None
    ids = [*first, *[image_token_id] * n_image_tokens, *second]
    return [i for i in ids if space is None or i != space]


# ---------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------


def _finite_or_none(x: float):
    return x if math.isfinite(x) else None


@dataclasses.dataclass
class DiscoveryResult:
    """Selection counts over samples; ``ranked()`` gives the heads file entries."""

    num_layers: int
    num_heads: int
    n_samples: int = 0
    counts: dict = dataclasses.field(default_factory=dict)  # (l, h) -> times selected
    entropy_sum: dict = dataclasses.field(default_factory=dict)  # (l, h) -> sum of entropy when selected
    s_img_sum: torch.Tensor | None = None  # (layers, heads) summed over samples
    knee_sizes: list = dataclasses.field(default_factory=list)

    def add(self, selected, s_img, entropy, n_candidates):
        self.n_samples += 1
        self.s_img_sum = s_img.clone() if self.s_img_sum is None else self.s_img_sum + s_img
        self.knee_sizes.append(n_candidates)
        for lh in selected:
            self.counts[lh] = self.counts.get(lh, 0) + 1
            self.entropy_sum[lh] = self.entropy_sum.get(lh, 0.0) + entropy[lh]

    def state(self) -> dict:
        """JSON-able state (partial results of a long discovery; ``from_state`` resumes it)."""
        key = lambda lh: f"{lh[0]},{lh[1]}"  # noqa: E731
        return {
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "n_samples": self.n_samples,
            "counts": {key(k): v for k, v in self.counts.items()},
            "entropy_sum": {key(k): v for k, v in self.entropy_sum.items()},
            "s_img_sum": None if self.s_img_sum is None else self.s_img_sum.tolist(),
            "knee_sizes": self.knee_sizes,
        }

    @classmethod
    def from_state(cls, doc: dict) -> "DiscoveryResult":
        lh = lambda k: tuple(int(v) for v in k.split(","))  # noqa: E731
        s_img = doc.get("s_img_sum")
        return cls(
            doc["num_layers"],
            doc["num_heads"],
            doc["n_samples"],
            {lh(k): v for k, v in doc["counts"].items()},
            {lh(k): v for k, v in doc["entropy_sum"].items()},
            None if s_img is None else torch.tensor(s_img),
            list(doc["knee_sizes"]),
        )

    def ranked(self) -> list[dict]:
        order = sorted(self.counts, key=lambda lh: (-self.counts[lh], self.entropy_sum[lh] / self.counts[lh], lh))
        mean_s = self.s_img_sum / max(self.n_samples, 1)
        return [
            {
                "layer": l,
                "head": h,
                "frequency": round(self.counts[(l, h)] / self.n_samples, 4),
                "count": self.counts[(l, h)],
                "mean_entropy": _finite_or_none(
                    round(self.entropy_sum[(l, h)] / self.counts[(l, h)], 4)
                ),  # None: 9ffe219's fallback heads have no entropy
                "mean_s_img": round(float(mean_s[l, h]), 4),
            }
            for l, h in order
        ]

    def table(self, top: int = 20) -> str:
        rows = ["rank  layer  head  frequency  mean_entropy  mean_S_img"]
        for i, r in enumerate(self.ranked()[:top], 1):
            rows.append(
                f"{i:>4}  {r['layer']:>5}  {r['head']:>4}  {r['frequency']:>9.3f}  {r['mean_entropy'] if r['mean_entropy'] is not None else math.inf:>12.3f}  {r['mean_s_img']:>10.3f}"
            )
        return "\n".join(rows)


# lmms-eval 0.7.3 qwen2_5_vl's default system_prompt (its messages start with it)
QWEN_SYSTEM = "You are a helpful assistant."


def prompt_inputs(processor, image, text: str, prompt: str = "task", family: str = "llava") -> dict:
    """Processor inputs for one image + text: the processor's chat template (as lmms-eval's chat llava_hf
    builds them; Qwen2.5-VL: with lmms-eval qwen2_5_vl's system message first, the image resized by the
    processor at its min/max pixels), or (prompt="official") the official referseg prompt (official_prompt_ids)."""
    token = getattr(processor, "image_token", "<image>")
    text = text.replace(token, "").replace("<image>", "").strip()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    if family == "qwen2_5_vl":
        msgs.insert(0, {"role": "system", "content": QWEN_SYSTEM})
    chat = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=chat, return_tensors="pt")
    if prompt == "official":
        image_token_id = processor.tokenizer.convert_tokens_to_ids(token)
        n_image = int((inputs["input_ids"] == image_token_id).sum())
        ids = torch.tensor([official_prompt_ids(processor.tokenizer, text, image_token_id, n_image)])
        inputs["input_ids"], inputs["attention_mask"] = ids, torch.ones_like(ids)
    return inputs


def sample_grid(model, processor, image, inputs: dict, block: str = "base") -> tuple[torch.Tensor, tuple[int, int]]:
    """(positions, (rows, cols)) of the grid one discovery sample's maps are read over: LLaVA-1.5's square
    grid (``image_grid``), else the ``block`` of the family's geometry (methods/geometry.py), built from the
    same Request evaluation builds, so discovery and ``LocHead.locate`` read the same cells."""
    family = getattr(model.config, "model_type", "llava")
    input_ids = inputs["input_ids"]
    if family == "llava":
        pos = hooks.image_positions(input_ids, model.config.image_token_id)
        return pos, image_grid(model, pos.numel())
    req = Request(
        input_ids=input_ids,
        image_token_id=model.config.image_token_id,
        prompt_len=input_ids.shape[1],
        images=[image],
        processor=processor,
        config=model.config,
        inputs={k: inputs[k] for k in ("image_grid_thw",) if inputs.get(k) is not None},
    )
    b = req.geometry.block(block)
    if b.rows * b.cols == 0:
        raise RequestError(f"the {block} block of this {image.size} image is empty; use block=base")
    return b.positions.to(input_ids.device), b.grid_hw


def discover_heads(
    model,
    processor,
    samples: Iterable[tuple],
    *,
    per_sample: int = 10,
    connectivity: int = 8,
    selection: str = "ours",
    prompt: str = "task",
    progress=None,
    on_sample=None,
    result: "DiscoveryResult | None" = None,
    block: str = "base",
) -> DiscoveryResult:
    """Run the selection over ``samples`` ((PIL image, prompt text) pairs), one prefill each.

    ``selection``: ours | official (HEAD) | official_v2 (9ffe219); ``prompt``: task | official.
    ``result``: a partial result to continue (its first ``n_samples`` samples are skipped).
    ``block``: LLaVA-NeXT/OneVision, the geometry block the maps are read from (base | highres, as
    lochead's ``block``); LLaVA-1.5 and Qwen2.5-VL have one block (Qwen: the rows x cols merged grid).
    """
    family = getattr(model.config, "model_type", "llava")
    if family != "llava" and prompt != "task":
        raise RequestError(f"discovery with prompt={prompt} is LLaVA-1.5 only; use prompt=task on {family}")
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, not {block!r}")
    geo = model_geometry(model)
    result = result or DiscoveryResult(**geo)
    device = next(model.parameters()).device
    for i, (image, text) in enumerate(samples):
        if i < result.n_samples:
            continue
        inputs = prompt_inputs(processor, image, text, prompt, family).to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        pos, grid = sample_grid(model, processor, image, inputs, block)
        maps = capture_image_maps(model, inputs, pos)
        s_img = image_attention_sum(maps)
        if selection == "ours":
            selected, s_img, candidates, entropy = select_sample_heads(maps, grid, per_sample, connectivity)
        else:
            ranked = rank_heads_official(maps, grid) if selection == "official" else rank_heads_official_v2(maps, grid)
            entropy = {(r["layer"], r["head"]): r["spatial_entropy"] for r in ranked}
            candidates = [lh for lh, e in entropy.items() if math.isfinite(e)]
            selected = select_heads(maps, grid, selection, per_sample, connectivity)
        result.add(selected, s_img, entropy, len(candidates))
        if on_sample is not None:
            on_sample(result.n_samples - 1, image, maps, s_img, candidates, selected, grid)
        if progress is not None:
            progress.update(1)
    return result


# ---------------------------------------------------------------------------------------
# The technique
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Located:
    """One request's grounding: the box in original-image fractions and what produced it."""

    box: list
    box_processed: list
    heads: list
    head_maps: torch.Tensor  # (k, h, w)
    combined: torch.Tensor  # (h, w)
    geometry: Geometry | None
    mask: torch.Tensor | None = None  # optional SAM mask (original image size)
    image: object = None  # the original image (without the pad_to_square canvas)


def original_image(req: Request):
    """The request's first image as the user gave it: pad_to_square's canvas cropped away."""
    if not req.images:
        return None
    if not req.pads:
        return req.images[0]
    pad = req.pads[0]
    ox, oy = pad.offset
    return req.images[0].crop((ox, oy, ox + pad.orig_w, oy + pad.orig_h))


class LocHead(Technique):
    """Grounding from localization heads: one prefill, no decoding; the answer is the box text.

    heads: ranked (layer, head) list; top_k of them are used. ``heads="all"`` averages every
    head of every layer (the all-heads baseline).
    """

    name = "lochead"

    def __init__(self, heads, **params):
        super().__init__(**{**DEFAULTS, **params})
        p = self.params
        for key, allowed in (
            ("box_mode", BOX_MODES),
            ("selection", SELECTIONS),
            ("box_scaling", BOX_SCALINGS),
            ("prompt", PROMPTS),
        ):
            if p[key] not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, not {p[key]!r}")
        if heads in ("all", "self"):
            self.heads = heads
        else:
            heads = [tuple(map(int, h)) for h in heads]
            if not heads:
                raise ValueError("lochead needs at least one (layer, head)")
            self.heads = heads[: p["top_k"]]
        self.on_located = None  # optional callback(req, located) for saved visuals
        self.refiner = None  # optional SamRefiner
        self.pending = (
            None  # optional callback(processor) -> ranked heads, run at the first request (heads=auto off LLaVA-1.5)
        )

    def _resolve_pending(self, req: Request) -> None:
        """heads=auto discovered with the processor evaluation uses (its min/max pixels), at the first request."""
        if self.pending is not None:
            heads, self.pending = self.pending(req.processor), None
            self.heads = [tuple(map(int, h)) for h in heads][: self.params["top_k"]]

    def describe(self):
        heads = self.heads if isinstance(self.heads, str) else [f"L{l}H{h}" for l, h in self.heads]
        if self.pending is not None:
            heads = "auto: discovered at the first request, with the evaluation's processor"
        return {**super().describe(), "heads_used": heads}

    def locate(self, model, req: Request, **kwargs) -> Located:
        req.require_one_image(self.name)
        self._resolve_pending(req)
        inputs = self.prompt_inputs(req, kwargs)
        block = self.anyres_block(req)
        if block is None:  # LLaVA-1.5: the single square grid
            pos = hooks.image_positions(inputs["input_ids"], req.image_token_id)
            grid = image_grid(model, pos.numel())
        else:
            pos, grid = block.positions.to(inputs["input_ids"].device), block.grid_hw
        if self.heads == "all":
            maps = capture_image_maps(model, inputs, pos)  # (L, H, N)
            heads = "all"
            flat = maps.flatten(0, 1)
        elif self.heads == "self":  # this request's own best heads (9ffe219 pipeline.py:57-70)
            maps = capture_image_maps(model, inputs, pos)
            heads = select_heads(
                maps, grid, self.params["selection"], self.params["top_k"], self.params["connectivity"]
            )
            flat = torch.stack([maps[l, h] for l, h in heads])
        else:
            layers = sorted({l for l, _ in self.heads})
            maps = capture_image_maps(model, inputs, pos, layers)
            row = {l: i for i, l in enumerate(layers)}
            flat = torch.stack([maps[row[l], h] for l, h in self.heads])
            heads = list(self.heads)
        gh, gw = grid
        head_maps = flat.reshape(-1, gh, gw)
        combined = combine_head_maps(head_maps, self.params["sigma"])
        box_p = box_from_grid(combined, self.params["box_mode"], self.params["connectivity"])
        geometry = None
        if (
            self.params["box_scaling"] == "stretch"
        ):  # 9ffe219 bbox.py:148-181: grid cells onto W x H, padding not undone
            x0, y0, x1, y1 = official_box_grid(combined)
            box_p = [x0 / gw, y0 / gh, (x1 + 1) / gw, (y1 + 1) / gh]
            box = list(box_p)
        elif block is not None:  # the block's region of the image (undoes the anyres squash / tiling and padding)
            box = [min(1.0, max(0.0, v)) for v in block.to_image(box_p)]
            if req.pads:
                box = req.pads[0].to_original(box)
        elif req.images and req.processor is not None:
            ip = getattr(req.processor, "image_processor", req.processor)
            geometry = processor_geometry(ip, req.images[0].size)
            if req.pads:  # pad_to_square: the processor saw the square; map through the pad too
                geometry = geometry.after_pad(req.pads[0])
            box = geometry.to_original(box_p)
        else:
            box = list(box_p)
        located = Located(box, box_p, heads, head_maps, combined, geometry, image=original_image(req))
        if self.refiner is not None and req.images:
            peak = int(torch.argmax(combined))
            cell = [(peak % gw + 0.5) / gw, (peak // gw + 0.5) / gh]
            point = (geometry.to_original(cell * 2) if geometry else cell * 2)[:2]
            located.mask, mask_box = self.refiner(located.image, box, point)
            if self.refiner.use_box and mask_box is not None:
                located.box = mask_box
        if self.on_located is not None:
            self.on_located(req, located)
        return located

    def anyres_block(self, req: Request):
        """The geometry block the maps are read from on anyres models (None: LLaVA-1.5's single grid)."""
        if req.config is None or req.family == "llava":
            return None
        if self.params["prompt"] != "task":
            raise RequestError(
                f"lochead: prompt={self.params['prompt']} is LLaVA-1.5 only; use prompt=task on {req.family}"
            )
        block = req.geometry.block(self.params.get("block", "base"))
        if block.rows * block.cols == 0:
            raise RequestError(
                f"lochead: the {block.name} block of this {req.images[0].size} image is empty; use block=base"
            )
        return block

    def prompt_inputs(self, req: Request, kwargs: dict) -> dict:
        """The forward's inputs: the request's own, or (prompt=official) the official prompt's ids around the same image."""
        if self.params["prompt"] == "task":
            return {**kwargs, "input_ids": req.input_ids}
        tokenizer = getattr(req.processor, "tokenizer", req.processor)
        token = getattr(req.processor, "image_token", "<image>")
        ids = official_prompt_ids(tokenizer, official_query(req.text, token), req.image_token_id, req.image_pos.numel())
        input_ids = torch.tensor([ids], dtype=req.input_ids.dtype, device=req.input_ids.device)
        return {**kwargs, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def answer_text(self, located: Located) -> str:
        return format_box(located.box, self.params["decimals"])

    def generate(self, model, req: Request, **kwargs):
        """Prompt ids + the ids of the box text (what llava_hf decodes after the prompt)."""
        located = self.locate(model, req, **kwargs)
        tokenizer = getattr(req.processor, "tokenizer", req.processor)
        ids = answer_ids(tokenizer, self.answer_text(located))
        eos = getattr(tokenizer, "eos_token_id", None)
        tail = torch.tensor(
            [ids + ([eos] if eos is not None else [])], dtype=req.input_ids.dtype, device=req.input_ids.device
        )
        return torch.cat([req.input_ids, tail], dim=1)

    def forward(self, model, req: Request, **kwargs):
        raise RequestError(
            "llava_lochead answers grounding (generate_until) tasks with a box; it has no loglikelihood. "
            "Use llava_hf for multiple-choice/loglikelihood tasks"
        )


class SamRefiner:
    """Optional masks: a local SAM checkpoint (transformers ``SamModel``) prompted with the
    box and the peak point of the combined map. Never downloads: the path must be a local directory."""

    def __init__(self, path, use_box: bool = False):
        from transformers import SamModel, SamProcessor

        if not Path(path).is_dir():
            raise FileNotFoundError(
                f"sam={path} is not a local directory with a transformers SamModel checkpoint (SAM is optional; leave sam empty to skip masks)"
            )
        self.model = SamModel.from_pretrained(path, local_files_only=True).eval()
        self.processor = SamProcessor.from_pretrained(path, local_files_only=True)
        self.use_box = use_box

    @torch.no_grad()
    def __call__(self, image, box, point):
        """(mask (h, w) bool of the original image, its box in fractions or None if empty)."""
        w, h = image.size
        inputs = self.processor(
            images=image,
            input_boxes=[[[box[0] * w, box[1] * h, box[2] * w, box[3] * h]]],
            input_points=[[[[point[0] * w, point[1] * h]]]],
            return_tensors="pt",
        ).to(self.model.device)
        out = self.model(**inputs, multimask_output=False)
        masks = self.processor.image_processor.post_process_masks(
            out.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu()
        )
        mask = masks[0].reshape(-1, h, w)[0].bool()
        if not mask.any():
            return mask, None
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        return mask, [cols[0].item() / w, rows[0].item() / h, (cols[-1].item() + 1) / w, (rows[-1].item() + 1) / h]


def random_heads(num_layers: int, num_heads: int, k: int, seed: int) -> list[tuple[int, int]]:
    """k distinct (layer, head) pairs drawn uniformly with ``seed`` (the random-head baseline)."""
    rng = random.Random(seed)
    pairs = [(l, h) for l in range(num_layers) for h in range(num_heads)]
    return rng.sample(pairs, min(k, len(pairs)))
