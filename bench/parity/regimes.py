"""Planted attention regimes: parity outside the degenerate regime of random models (issue 25, part 3).

A random model gives the official analyses nothing to find: every 9ffe219 box is the whole 24x24 grid,
HEAD's top heads have entropy 0, and no PM search runs past 2 refinement passes. Here the attention is
planted instead, in the official shapes (32 layers x 32 heads x 576 image tokens on a 24x24 grid):

- ``lochead_stack(spec)``: one sample's [32, 32, 576] maps of the last prompt row over the image.
  Every head has a diffuse, noisy background and a few isolated "speck" cells (attention-absorbing
  tokens, so every head has connected components); localization heads add a blob of 1-30 cells on
  the sample's object, some a weaker blob on a distractor; a few heads in layers 0-1 and a few
  bottom-row heads exercise 9ffe219's filters.
- ``PMModel(spec)``: a scripted "model" whose last-row attention is a fixed weight per key,
  renormalised over the keys a mask leaves visible (a softmax whose logits are log-weights): blocking
  the most attended object moves its share to the rest (the attention sink, the next object). Objects
  of decreasing strength make PM's search run several refinement passes.

Everything here is numpy-only and drawn the same on every CPU: ``Generator(PCG64(seed)).random()`` (a
fixed bit stream) and IEEE +, -, *, / in float64, then one rounding to float32 (no exp/log/sqrt, whose
last bits depend on the math library). ``sha256`` of the float32 arrays is stored with the fixtures,
so a test can check it rebuilt the very inputs the official code ran on. Used by
``regimes_official.py`` (the official venv) and ``tests/test_parity_regimes.py`` (ours).
"""

from __future__ import annotations

import hashlib

import numpy as np

GRID = 24
N_IMAGE = GRID * GRID
N_LAYERS = 32
N_HEADS = 32


def _rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def sha256(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes()).hexdigest()


def blob(cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    """(24, 24) float64 elliptic paraboloid max(0, 1 - ((y-cy)/ry)^2 - ((x-cx)/rx)^2): its support is
    the ellipse's cells (about pi*ry*rx of them: 1 cell for r < 1 at a cell centre, ~28 for r = 3)."""
    y = np.arange(GRID, dtype=np.float64)[:, None]
    x = np.arange(GRID, dtype=np.float64)[None, :]
    dy, dx = (y - cy) / ry, (x - cx) / rx
    return np.maximum(0.0, 1.0 - dy * dy - dx * dx)


def blob_cells(b: np.ndarray) -> int:
    return int((b > 0).sum())


# ---------------------------------------------------------------------------------------
# Localization heads
# ---------------------------------------------------------------------------------------

# One sample: an object (cy, cx, ry, rx), a distractor, and the localization heads:
# (layer, head, target, share of the head's image attention, distractor share).
LOCHEAD_SPECS = [
    {
        "name": "square_3x3",
        "seed": 11,
        "object": (8.0, 14.0, 1.6, 1.6),
        "distractor": (19.0, 4.0, 1.2, 1.2),
        "heads": [
            (14, 24, 0.70, 0.03),
            (14, 13, 0.62, 0.12),
            (12, 5, 0.55, 0.20),
            (16, 30, 0.66, 0.05),
            (9, 2, 0.50, 0.25),
            (20, 17, 0.45, 0.30),
            (1, 7, 0.80, 0.02),
            (0, 3, 0.75, 0.1),
        ],
    },
    {
        "name": "one_cell",
        "seed": 12,
        "object": (5.0, 5.0, 0.8, 0.8),
        "distractor": (17.0, 18.0, 1.5, 2.0),
        "heads": [
            (15, 1, 0.60, 0.04),
            (13, 9, 0.52, 0.10),
            (18, 22, 0.58, 0.18),
            (11, 31, 0.47, 0.02),
            (21, 4, 0.55, 0.35),
        ],
    },
    {
        "name": "wide_30",
        "seed": 13,
        "object": (12.0, 11.5, 2.2, 3.8),
        "distractor": (3.0, 20.0, 1.0, 1.0),
        "heads": [
            (14, 24, 0.75, 0.08),
            (15, 6, 0.68, 0.03),
            (17, 12, 0.71, 0.15),
            (10, 27, 0.60, 0.22),
            (22, 0, 0.64, 0.04),
            (8, 8, 0.58, 0.30),
        ],
    },
    {
        "name": "corner",
        "seed": 14,
        "object": (1.0, 22.0, 1.5, 1.5),
        "distractor": (2.0, 2.0, 1.0, 1.0),
        "heads": [(16, 16, 0.66, 0.02), (13, 3, 0.59, 0.06), (19, 28, 0.61, 0.12), (12, 12, 0.50, 0.40)],
    },
    {
        "name": "tall_edge",
        "seed": 15,
        "object": (12.0, 0.5, 3.2, 1.3),
        "distractor": (6.0, 17.0, 1.3, 1.3),
        "heads": [
            (14, 24, 0.72, 0.10),
            (14, 13, 0.67, 0.03),
            (14, 26, 0.63, 0.18),
            (25, 9, 0.55, 0.26),
            (7, 19, 0.52, 0.05),
        ],
    },
    {
        "name": "distractor_led",
        "seed": 16,
        "object": (15.0, 15.0, 1.8, 1.8),
        "distractor": (4.0, 6.0, 1.6, 1.6),
        # two heads look mostly at the distractor (target share < distractor share): the box spans both
        "heads": [
            (13, 20, 0.40, 0.45),
            (15, 2, 0.35, 0.50),
            (17, 11, 0.68, 0.05),
            (12, 30, 0.60, 0.03),
            (19, 7, 0.62, 0.10),
        ],
    },
    {
        "name": "early_layers",
        "seed": 17,
        "object": (10.0, 9.0, 1.4, 2.4),
        "distractor": (20.0, 16.0, 1.0, 1.4),
        # the strongest blobs in layers 0-1 (9ffe219 drops them), bottom-row heads with large sums
        "heads": [
            (0, 4, 0.90, 0.02),
            (1, 18, 0.88, 0.02),
            (1, 2, 0.85, 0.03),
            (16, 5, 0.50, 0.15),
            (18, 25, 0.46, 0.05),
            (23, 14, 0.44, 0.22),
        ],
    },
    {
        "name": "tight",
        "seed": 19,
        "object": (14.0, 9.0, 1.3, 1.8),
        "distractor": (15.5, 12.0, 0.8, 0.8),
        # the distractor touches the object: a box of a few cells
        "heads": [
            (14, 24, 0.70, 0.04),
            (16, 8, 0.66, 0.06),
            (18, 3, 0.62, 0.03),
            (12, 19, 0.64, 0.08),
            (20, 26, 0.60, 0.05),
            (22, 14, 0.58, 0.07),
        ],
    },
    {
        "name": "speck_object",
        "seed": 18,
        "object": (3.0, 12.0, 0.9, 0.9),
        "distractor": (14.0, 3.0, 0.9, 0.9),
        "heads": [(14, 24, 0.35, 0.02), (20, 20, 0.30, 0.10), (24, 1, 0.32, 0.05), (10, 10, 0.28, 0.14)],
    },
]


def lochead_stack(spec: dict) -> np.ndarray:
    """[32, 32, 576] float32: one sample's planted maps (values like attention: each head's image share < 1)."""
    rng = _rng(spec["seed"])
    L, H = N_LAYERS, N_HEADS
    out = np.zeros((L, H, N_IMAGE), dtype=np.float64)
    obj = blob(*spec["object"])
    dis = blob(*spec["distractor"])
    for l in range(L):
        for h in range(H):
            share = 0.02 + 0.30 * rng.random()  # the head's background share of attention on the image
            noise = rng.random(N_IMAGE)
            bg = noise * noise * noise  # heavy-ish tail: a diffuse but uneven map
            bg = share * bg / bg.sum()
            n_specks = 1 + int(6 * rng.random())  # isolated attention-absorbing cells
            cells = (rng.random(n_specks) * N_IMAGE).astype(np.int64)
            vals = 0.002 + 0.010 * rng.random(n_specks)
            bg[cells] += vals
            out[l, h] = bg
    # bottom-row heads (9ffe219 drops heads with a bottom-row cell > 0.05): large sums, mass on the last row
    for l, h in ((5 + spec["seed"] % 7, 11), (20, 29)):
        row = np.zeros((GRID, GRID))
        row[-1, :] = 1.0
        row[-1, 3] = 4.0
        out[l, h] = 0.55 * row.ravel() / row.sum() + 0.1 * out[l, h]
    for l, h, target, distract in spec["heads"]:
        jitter = 0.75 + 0.5 * rng.random((GRID, GRID))
        b = obj * jitter
        m = target * b.ravel() / b.sum()
        if distract > 0:
            d = dis * (0.75 + 0.5 * rng.random((GRID, GRID)))
            m = m + distract * d.ravel() / d.sum()
        out[l, h] = 0.25 * out[l, h] + m
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------------
# Perception Magnifier: a scripted model
# ---------------------------------------------------------------------------------------

# One case: objects (cy, cx, ry, rx, strength), the exit threshold and max_iteration (run_llava_pm.sh's
# are 0.4 / 0.3 and 8), the number of deep-layer heads that look at objects, the image sink's weight.
PM_SPECS = [
    {
        "name": "ladder5_pope",
        "seed": 21,
        "settings": "pope",
        "sink": 1.0,
        "objects": [
            (6.0, 6.0, 1.6, 1.6, 3.0),
            (16.0, 18.0, 2.0, 2.0, 1.6),
            (18.0, 5.0, 1.2, 1.5, 0.9),
            (4.0, 18.0, 1.0, 1.0, 0.5),
            (12.0, 12.0, 1.3, 1.3, 0.28),
        ],
    },
    {"name": "one_strong_pope", "seed": 22, "settings": "pope", "sink": 2.0, "objects": [(10.0, 14.0, 2.5, 2.5, 2.5)]},
    {
        "name": "two_objects_pope",
        "seed": 23,
        "settings": "pope",
        "sink": 1.0,
        "objects": [(5.0, 16.0, 1.4, 2.2, 2.2), (17.0, 7.0, 2.4, 1.6, 1.2)],
    },
    {
        "name": "many_small_mme",
        "seed": 24,
        "settings": "mme",
        "sink": 0.6,
        "objects": [
            (3.0, 3.0, 0.8, 0.8, 1.5),
            (3.0, 20.0, 1.0, 1.0, 1.2),
            (20.0, 3.0, 1.0, 1.2, 1.0),
            (20.0, 20.0, 1.2, 1.2, 0.8),
            (11.0, 11.0, 1.5, 1.5, 0.65),
            (8.0, 14.0, 0.9, 0.9, 0.5),
            (15.0, 9.0, 1.1, 0.9, 0.4),
            (12.0, 21.0, 1.0, 1.0, 0.3),
            (21.0, 12.0, 0.9, 1.3, 0.22),
            (2.0, 11.0, 1.0, 1.0, 0.16),
        ],
    },
    {
        "name": "diffuse_mme",
        "seed": 25,
        "settings": "mme",
        "sink": 0.3,
        # a strong diffuse image share: once the objects are hidden, every visible token is "high" (the blocked
        # zeros are the low cluster), so the last pass blocks the whole image
        "background": 2.0,
        "objects": [(12.0, 12.0, 2.0, 2.0, 1.0), (5.0, 5.0, 1.0, 1.0, 0.6), (18.0, 18.0, 1.0, 1.0, 0.4)],
    },
    # ladders of objects whose strengths fall geometrically, a weak sink: one object per pass
    {
        "name": "ladder9_mme_cap",
        "seed": 26,
        "settings": "mme",
        "sink": 0.02,
        "objects": [
            (3.0, 3.0, 1.2, 1.2, 1.0),
            (3.0, 12.0, 1.2, 1.2, 0.4),
            (3.0, 20.0, 1.2, 1.2, 0.16),
            (12.0, 3.0, 1.2, 1.2, 0.064),
            (12.0, 12.0, 1.2, 1.2, 0.0256),
            (12.0, 20.0, 1.2, 1.2, 0.0102),
            (20.0, 3.0, 1.2, 1.2, 0.0041),
            (20.0, 12.0, 1.2, 1.2, 0.0016),
            (20.0, 20.0, 1.2, 1.2, 0.00066),
        ],
    },
    {
        "name": "ladder9_exit06",
        "seed": 26,
        "settings": "mme_exit06",
        "sink": 0.02,
        "objects": [
            (3.0, 3.0, 1.2, 1.2, 1.0),
            (3.0, 12.0, 1.2, 1.2, 0.4),
            (3.0, 20.0, 1.2, 1.2, 0.16),
            (12.0, 3.0, 1.2, 1.2, 0.064),
            (12.0, 12.0, 1.2, 1.2, 0.0256),
            (12.0, 20.0, 1.2, 1.2, 0.0102),
            (20.0, 3.0, 1.2, 1.2, 0.0041),
            (20.0, 12.0, 1.2, 1.2, 0.0016),
            (20.0, 20.0, 1.2, 1.2, 0.00066),
        ],
    },
    {
        "name": "halving_pope",
        "seed": 27,
        "settings": "pope",
        "sink": 0.05,
        "objects": [
            (4.0, 4.0, 1.5, 1.5, 1.0),
            (4.0, 19.0, 1.5, 1.5, 0.5),
            (19.0, 4.0, 1.5, 1.5, 0.25),
            (19.0, 19.0, 1.5, 1.5, 0.125),
            (11.0, 11.0, 1.5, 1.5, 0.0625),
            (11.0, 2.0, 1.5, 1.5, 0.031),
            (2.0, 11.0, 1.5, 1.5, 0.0156),
        ],
    },
    {
        "name": "steep_pope",
        "seed": 28,
        "settings": "pope",
        "sink": 0.01,
        "objects": [
            (6.0, 6.0, 2.0, 2.0, 1.0),
            (16.0, 16.0, 2.0, 2.0, 0.3),
            (6.0, 17.0, 2.0, 2.0, 0.09),
            (17.0, 6.0, 2.0, 2.0, 0.027),
            (11.0, 11.0, 1.0, 1.0, 0.008),
        ],
    },
]
PM_SETTINGS = {
    "pope": dict(enhance_coe=15, kernel_size=5, exit_threshold=0.4, max_iteration=8),
    "mme": dict(enhance_coe=10, kernel_size=3, exit_threshold=0.3, max_iteration=8),
    # the official --exit_threshold argument at another value: the exit by the threshold after 5 passes
    "mme_exit06": dict(enhance_coe=10, kernel_size=3, exit_threshold=0.6, max_iteration=8),
}
PM_BEFORE = [319, 13563, 1546, 3148, 1001, 29901]  # text before the image (ids only; no tokenizer needed)
PM_AFTER = [1317, 727, 263, 11203, 29973, 319, 1799, 29901]


class PMModel:
    """The last prompt row's attention, [32 layers, 32 heads, T keys], as weights renormalised over the
    visible keys. T = 1 + len(PM_BEFORE) + 576 + len(PM_AFTER); key 0 is BOS (the attention sink).
    ``attention(visible)``: visible is a bool [T] key mask (True: visible)."""

    def __init__(self, spec: dict):
        rng = _rng(spec["seed"])
        self.vis_start = 1 + len(PM_BEFORE)
        self.length = self.vis_start + N_IMAGE + len(PM_AFTER)
        L, H, T = N_LAYERS, N_HEADS, self.length
        w = np.zeros((L, H, T), dtype=np.float64)
        objs = [blob(cy, cx, ry, rx) for cy, cx, ry, rx, _ in spec["objects"]]
        strengths = [s for *_, s in spec["objects"]]
        bg_scale = spec.get("background", 0.04)
        img = slice(self.vis_start, self.vis_start + N_IMAGE)
        for l in range(L):
            for h in range(H):
                w[l, h, 0] = spec["sink"] * (0.5 + rng.random())
                w[l, h, 1:] = 0.01 * rng.random(T - 1)
                u = rng.random(N_IMAGE)
                w[l, h, img] = bg_scale * (0.5 + u) / N_IMAGE
                # about a third of the heads look at objects, each at its own mix of them
                if rng.random() < 0.35:
                    for b, s in zip(objs, strengths):
                        g = rng.random()
                        if g < 0.25:
                            continue
                        jitter = 0.8 + 0.4 * rng.random((GRID, GRID))
                        bj = b * jitter
                        w[l, h, img] += s * g * bj.ravel() / bj.sum()
        self.weights = w

    def attention(self, visible: np.ndarray) -> np.ndarray:
        """[32, 32, T] float32: weights * visible / their sum, in float64, rounded once."""
        v = np.asarray(visible, dtype=bool)
        w = self.weights * v
        return (w / w.sum(axis=-1, keepdims=True)).astype(np.float32)

    def image_attention(self, blocked_image: np.ndarray | None = None) -> np.ndarray:
        """[32, 32, 576] float32 attention over the image keys with ``blocked_image`` (bool [576]) hidden."""
        visible = np.ones(self.length, dtype=bool)
        if blocked_image is not None:
            visible[self.vis_start : self.vis_start + N_IMAGE] = ~np.asarray(blocked_image, dtype=bool).ravel()
        return self.attention(visible)[:, :, self.vis_start : self.vis_start + N_IMAGE]


def pm_image(seed: int = 31, size: int = 96):
    """A square RGB test image (uint8 [size, size, 3]): a smooth field with small bright squares
    (square, so the padded view is the image itself)."""
    rng = _rng(seed)
    y = np.arange(size, dtype=np.float64)[:, None, None]
    x = np.arange(size, dtype=np.float64)[None, :, None]
    base = np.array([60.0, 110.0, 160.0]) + 60.0 * (y / size) - 40.0 * (x / size)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    for _ in range(6):
        cy, cx, s = int(rng.random() * (size - 12)), int(rng.random() * (size - 12)), 4 + int(rng.random() * 8)
        img[cy : cy + s, cx : cx + s] = 255.0 * rng.random(3)
    return np.clip(img, 0, 255).astype(np.uint8)
