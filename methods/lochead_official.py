"""Localization heads: the official code's steps, one function each, selected by lochead's ``selection``,
``prompt`` and ``box_scaling``.

preset=official follows seilk/LocalizationHeads @ 8ce33b0 ("HEAD"), preset=official_v2 the authors'
rewrite 9ffe219 ("v2"); each function names the official file:line it mirrors, official bugs included
where a preset keeps them. docs/lochead.md has the table of the steps and where we differ, and
tests/test_parity_lochead.py compares each step with golden fixtures of the official code (fp32, a tiny
random model, the analysis under the numpy 2.2.6 8ce33b0 pins; rankings outside near-ties of 2e-5 and up to
8 capture-noise flips, exact ties in the official order, see its tests).
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np
import torch

from .lochead_maps import connected_components, select_sample_heads

SELECTIONS = ("ours", "official", "official_v2")
# HEAD localization_heads_finder.py:195; v2 conf/logic/selection_v1.yaml entropy.binarize_threshold
OFFICIAL_BINARIZE = 0.001
V2_BOTTOM_ROW = 0.05  # v2 analyze.py:98
V2_FIRST_LAYER = 2  # v2 analyze.py:112 keeps layer > 1
V2_MIN_KEEP = 1  # v2 selection_v1.yaml threshold.min_keep


def official_spatial_entropy(
    grid: torch.Tensor, mean_factor: float = 1.0, threshold: float = OFFICIAL_BINARIZE, fp16: bool = False
) -> tuple[float, torch.Tensor, int]:
    """(entropy, labels, n components): HEAD localization_heads_finder.py:195-247 (mean_factor 1),
    v2 analyze.py:20-42 (mean_factor 2).

    B = relu(S - mean_factor * mean(S)); components of B > threshold, 8-connected; a component's
    share is its B mass over the total B mass (cells at or below the threshold included, so the
    shares need not sum to 1). Total B mass 0 gives +inf; B mass but no component gives 0, which
    ranks such a head first (an official quirk both presets keep).

    The arithmetic is the official code's under the numpy 8ce33b0 pins (2.2.6, dependency_pip.txt), where
    NEP 50 keeps it float32: a component's mass is numpy's float32 ``sum`` of its cells (HEAD :233), the
    total torch's float32 sum (:222, exact as a Python float), and ``component_sum / total`` (:237) stays
    float32 because a Python float no longer promotes a numpy float32 scalar; so do ``np.log``, the
    products and the left-to-right ``sum`` (:240; v2 analyze.py:31-41 alike). Under numpy < 2 the share
    was float64 (entropies within 1e-6 of these). In float32 two heads whose maps differ by a scale
    factor can tie exactly; the callers' stable sorts then keep them in (layer, head) order, as HEAD's
    ``results.sort`` (:422) and v2's ``kept.sort`` (analyze.py:118) do.

    fp16=True (``precision=official``): S is the stored fp16 map, and mean(S), S - mean, relu and the
    total B mass are fp16 tensors as in the official fp16 runs (each reduction accumulated in float32
    and rounded once to fp16, as CUDA's); the component masses stay float32 numpy (``.to(float32)``).
    """
    if fp16:
        s = _fp16(grid.detach().float().cpu())
        mean = _fp16(s.float().mean())  # torch.mean of an fp16 tensor
        b = torch.relu(_fp16(s.float() - _fp16(mean.float() * mean_factor).float())).float()
        total = np.float32(float(_fp16(b.sum())))  # torch.sum(B_h).item() of an fp16 tensor
    else:
        g = grid.detach().float().cpu()
        b = torch.relu(g - g.mean() * mean_factor)
        total = np.float32(b.sum().item())  # torch.sum(B_h).item(); a float32 scalar divides as float32 (NEP 50)
    labels, n = connected_components(b > threshold, 8)
    if total <= 0:
        return math.inf, labels, 0
    b_np, lab = b.numpy(), labels.numpy()
    mass = [b_np[lab == i].sum() for i in range(1, n + 1)]
    p = [m / total for m in mass if m > 0]
    terms = [q * np.log(q) for q in p if q > 0]
    entropy = np.float32(0.0)
    for t in terms:
        entropy = entropy + t
    return (float(-entropy) if terms else 0.0), labels, n


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16)


def _chord_argmax(y_sorted) -> int:
    """Index of the point farthest from the chord of (i, y_i): HEAD localization_heads_finder.py:270-289, v2 analyze.py:52-62."""
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
    y = np.asarray(sums, dtype=np.float64)
    order = np.argsort(y)
    return int(order[_chord_argmax(y[order])])


def official_elbow_value(sums: Sequence[float]) -> float:
    """v2 analyze.py:45-63: the sum at the chord's farthest point; heads with a sum >= it are kept (:91)."""
    y = np.sort(np.asarray(sums, dtype=np.float64))
    if len(y) <= 2:
        return float(y.min()) if len(y) else 0.0
    return float(y[_chord_argmax(y)])


def _head_sums(maps: torch.Tensor, fp16: bool = False) -> list[float]:
    """Per-head image-attention sums in flattened (layer, head) order, as the official `.sum().item()`: of a
    float32 map, or (fp16) of the stored fp16 map, accumulated in float32 and rounded to fp16."""
    if fp16:
        return [float(v) for v in _fp16(_fp16(maps.float()).float().sum(-1)).flatten()]
    return [float(v) for v in maps.float().sum(-1).flatten()]


def rank_heads_official(maps: torch.Tensor, grid_hw: tuple[int, int], fp16: bool = False) -> list[dict]:
    """HEAD analyze_attention_file (localization_heads_finder.py:311-430): every head, entropy computed for
    flattened index >= the elbow head's index (+inf otherwise), stably sorted by entropy (:422).
    fp16: the maps, sums and entropies as the official fp16 runs store and compute them; the sums then
    tie often, and ``np.argsort``'s unstable order of the ties picks the elbow head (:264)."""
    n_layers, n_heads = maps.shape[:2]
    threshold = official_elbow_head_index(_head_sums(maps, fp16))
    rows = []
    for l in range(n_layers):
        for h in range(n_heads):
            idx = l * n_heads + h
            se = official_spatial_entropy(maps[l, h].reshape(grid_hw), fp16=fp16)[0] if idx >= threshold else math.inf
            rows.append({"layer": l, "head": h, "spatial_entropy": se})
    return sorted(rows, key=lambda r: r["spatial_entropy"])


def rank_heads_official_v2(
    maps: torch.Tensor, grid_hw: tuple[int, int], min_keep: int = V2_MIN_KEEP, fp16: bool = False
) -> list[dict]:
    """v2 analyze_heads (analyze.py:66-119): sums >= the elbow value, entropy at 2x the mean, drop layers
    0-1 and heads with a bottom-row cell > 0.05; fewer than ``min_keep`` left: the top sums instead.
    fp16: maps, sums and entropies in fp16 as the official runs (collector.py:155 runs the model in fp16)."""
    n_heads = maps.shape[1]
    sums = _head_sums(maps, fp16)
    if fp16:
        maps = _fp16(maps.float())
    thr = official_elbow_value(sums)
    rows = []
    for i, s in enumerate(sums):
        l, h = divmod(i, n_heads)
        if s < thr:
            rows.append({"layer": l, "head": h, "attn_sum": s, "spatial_entropy": math.inf, "bottom_row_focus": False})
            continue
        grid = maps[l, h].reshape(grid_hw)
        se = official_spatial_entropy(grid, mean_factor=2.0, fp16=fp16)[0]
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
    maps: torch.Tensor,
    grid_hw: tuple[int, int],
    selection: str = "ours",
    per_sample: int = 10,
    connectivity: int = 8,
    fp16: bool = False,
) -> list[tuple[int, int]]:
    """One sample's best heads under ``selection`` (ours | official | official_v2), best first; fp16: the
    official selections in the official runs' fp16 (``rank_heads_official``)."""
    if selection == "ours":
        return select_sample_heads(maps, grid_hw, per_sample, connectivity)[0]
    if selection == "official":
        ranked = rank_heads_official(maps, grid_hw, fp16)
    elif selection == "official_v2":  # its fallback heads may have no entropy: pipeline.py:70 uses them all the same
        return [(r["layer"], r["head"]) for r in rank_heads_official_v2(maps, grid_hw, fp16=fp16)][:per_sample]
    else:
        raise ValueError(f"selection must be one of {SELECTIONS}, not {selection!r}")
    return [(r["layer"], r["head"]) for r in ranked if math.isfinite(r["spatial_entropy"])][:per_sample]


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
