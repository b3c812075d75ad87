"""ShapeWorld scenes: a seeded generator of coloured shapes with exact ground truth.

A scene is sampled from a seed and a `WorldConfig`, then rendered with Pillow at high
resolution (336 px).  Every quantity a task asks about (objects, boxes, counts,
left/right/above/below) is computed here from the drawn pixels, never guessed.

Planted phenomena, each controlled by the config:
- small objects (`small_size`, `small_prob`): about 30 px at 336 px, i.e. ~6 px at the
  tiny model's 64 px input, where star / cross / diamond / circle blur together, but
  clear once the region is enlarged;
- co-occurrence (`cooccurrence`): shapes come in partner pairs (circle-square,
  triangle-star, diamond-cross); a scene with A contains its partner B with exactly
  this probability, so captions and answers learned from training scenes carry the
  prior "A means B" that POPE-adversarial and CHAIR measure;
- uneven shape frequencies (`group_weights`), so POPE's "popular" negatives differ from
  its random ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (45, 85, 215),
    "yellow": (225, 190, 25),
    "purple": (140, 60, 185),
}
COLOUR_NAMES = tuple(COLOURS)
SIZE_CLASSES = ("small", "large")
# Partner groups: the co-occurrence prior lives inside a group.
GROUPS = (("circle", "square"), ("triangle", "star"), ("diamond", "cross"))
PARTNER = {a: b for a, b in GROUPS} | {b: a for a, b in GROUPS}
BACKGROUND = (232, 230, 224)


@dataclass(frozen=True)
class WorldConfig:
    """Knobs of the world.  Training and test scenes differ only in these numbers."""

    canvas: int = 336
    # P(partner present | shape present).  A partner group enters a scene as a pair with
    # probability q = c / (2 - c), else as one of its two shapes alone; then P(B | A) = c.
    # 18/19 is a pair rate of exactly 0.9.
    cooccurrence: float = 18 / 19
    group_weights: tuple = (0.45, 0.35, 0.20)  # circle/square most frequent: POPE "popular"
    units_weights: tuple = (0.45, 0.55)  # 1 or 2 partner groups per scene
    multiplicity_weights: tuple = (0.75, 0.2, 0.05)  # 1, 2 or 3 copies of a shape
    small_prob: float = 0.4
    small_size: tuple = (22, 32)  # bounding square side in px at `canvas`
    large_size: tuple = (76, 108)
    margin: int = 8  # min gap between objects and to the border
    texture: float = 5.0  # std of the background's pixel noise (0 = plain)

    def replace(self, **changes) -> "WorldConfig":
        return dataclasses.replace(self, **changes)


TRAIN_WORLD = WorldConfig()
# Test scenes break the prior more often, so that "A without its partner" (the
# situation POPE-adversarial and CHAIR probe) is common enough to measure.
TEST_WORLD = WorldConfig(cooccurrence=0.4)  # pair rate 0.25


@dataclass
class ShapeObject:
    shape: str
    colour: str
    size: str  # "small" | "large"
    box: tuple  # (x0, y0, x1, y1) in pixels, tight around drawn pixels, x1/y1 exclusive

    @property
    def centre(self) -> tuple:
        return ((self.box[0] + self.box[2]) / 2.0, (self.box[1] + self.box[3]) / 2.0)

    def to_dict(self) -> dict:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "box": list(self.box),
            "centre": list(self.centre),
        }


@dataclass
class Scene:
    seed: int
    config: WorldConfig
    objects: list = field(default_factory=list)
    # private: where each object's drawing square sits (x, y, side)
    _placements: list = field(default_factory=list, repr=False)

    @property
    def canvas(self) -> int:
        return self.config.canvas

    def shapes_present(self) -> list:
        return sorted({o.shape for o in self.objects}, key=SHAPES.index)

    def count(self, shape: str) -> int:
        return sum(o.shape == shape for o in self.objects)

    def counts(self) -> dict:
        return {s: self.count(s) for s in SHAPES}

    def normalised_box(self, i: int) -> list:
        x0, y0, x1, y1 = self.objects[i].box
        c = float(self.canvas)
        return [x0 / c, y0 / c, x1 / c, y1 / c]

    def relations(self) -> list:
        """All (i, relation, j) with relation in left/right/above/below, from box geometry.

        i is left of j when i's box ends before j's box starts (strict separation);
        objects whose boxes overlap on an axis have no relation on that axis.
        """
        out = []
        for i, a in enumerate(self.objects):
            for j, b in enumerate(self.objects):
                if i == j:
                    continue
                if a.box[2] <= b.box[0]:
                    out.append((i, "left", j))
                if a.box[0] >= b.box[2]:
                    out.append((i, "right", j))
                if a.box[3] <= b.box[1]:
                    out.append((i, "above", j))
                if a.box[1] >= b.box[3]:
                    out.append((i, "below", j))
        return out

    def to_dict(self) -> dict:
        return {"seed": self.seed, "canvas": self.canvas, "objects": [o.to_dict() for o in self.objects]}

    def render(self, with_labels: bool = False):
        """RGB image (and, if asked, an 'L' label map: 0 background, i+1 object i)."""
        return render_scene(self, with_labels=with_labels)


def derive_seed(*parts) -> int:
    """Stable 31-bit seed from any parts (str/int), independent of PYTHONHASHSEED."""
    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


def _shape_points(shape: str, x: float, y: float, side: float):
    """Polygon (or ellipse box) of a shape drawn in the square (x, y, side)."""
    x1, y1 = x + side, y + side
    cx, cy = x + side / 2.0, y + side / 2.0
    if shape == "circle":
        return ("ellipse", [x, y, x1 - 1, y1 - 1])
    if shape == "square":
        inset = side * 0.08
        return (
            "polygon",
            [
                (x + inset, y + inset),
                (x1 - 1 - inset, y + inset),
                (x1 - 1 - inset, y1 - 1 - inset),
                (x + inset, y1 - 1 - inset),
            ],
        )
    if shape == "triangle":
        return ("polygon", [(cx, y), (x1 - 1, y1 - 1), (x, y1 - 1)])
    if shape == "diamond":
        return ("polygon", [(cx, y), (x1 - 1, cy), (cx, y1 - 1), (x, cy)])
    if shape == "star":
        r_out, r_in = side / 2.0, side / 2.0 * 0.42
        pts = []
        for k in range(10):
            r = r_out if k % 2 == 0 else r_in
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * math.cos(ang), cy + r * math.sin(ang) + side * 0.04))
        return ("polygon", pts)
    if shape == "cross":
        a = side / 3.0
        return (
            "polygon",
            [
                (x + a, y),
                (x + 2 * a, y),
                (x + 2 * a, y + a),
                (x1 - 1, y + a),
                (x1 - 1, y + 2 * a),
                (x + 2 * a, y + 2 * a),
                (x + 2 * a, y1 - 1),
                (x + a, y1 - 1),
                (x + a, y + 2 * a),
                (x, y + 2 * a),
                (x, y + a),
                (x + a, y + a),
            ],
        )
    raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")


def _draw(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, side: float, fill) -> None:
    kind, pts = _shape_points(shape, x, y, side)
    if kind == "ellipse":
        draw.ellipse(pts, fill=fill)
    else:
        draw.polygon(pts, fill=fill)


def _tight_box(shape: str, x: int, y: int, side: int) -> tuple:
    """Exact pixel box of a shape drawn at integer (x, y), from a private mask."""
    mask = Image.new("L", (side + 2, side + 2), 0)
    _draw(ImageDraw.Draw(mask), shape, 0, 0, side, 255)
    bx0, by0, bx1, by1 = mask.getbbox()
    return (x + bx0, y + by0, x + bx1, y + by1)


def _weighted(rng: random.Random, items, weights):
    return rng.choices(list(items), weights=list(weights), k=1)[0]


def sample_scene(seed: int, config: WorldConfig = TRAIN_WORLD) -> Scene:
    """The scene for `seed`: which shapes, colours, sizes, and where (no pixels yet)."""
    rng = random.Random(seed)
    for _attempt in range(100):
        n_units = _weighted(rng, (1, 2), config.units_weights)
        groups = []
        pool = list(range(len(GROUPS)))
        weights = list(config.group_weights)
        for _ in range(n_units):
            g = _weighted(rng, pool, weights)
            k = pool.index(g)
            pool.pop(k)
            weights.pop(k)
            groups.append(g)
        shapes = []
        for g in groups:
            first = rng.choice(GROUPS[g])
            shapes.append(first)
            if rng.random() < config.cooccurrence / (2.0 - config.cooccurrence):
                shapes.append(PARTNER[first])
        specs = []
        for s in shapes:
            copies = _weighted(rng, (1, 2, 3), config.multiplicity_weights)
            for _ in range(copies):
                size = "small" if rng.random() < config.small_prob else "large"
                lo, hi = config.small_size if size == "small" else config.large_size
                specs.append((s, rng.choice(COLOUR_NAMES), size, rng.randint(lo, hi)))
        # large first: they are the hard ones to fit
        order = sorted(range(len(specs)), key=lambda k: -specs[k][3])
        placed = {}
        ok = True
        for k in order:
            side = specs[k][3]
            for _try in range(200):
                x = rng.randint(config.margin, config.canvas - config.margin - side)
                y = rng.randint(config.margin, config.canvas - config.margin - side)
                if all(
                    x + side + config.margin <= px
                    or px + ps + config.margin <= x
                    or y + side + config.margin <= py
                    or py + ps + config.margin <= y
                    for (px, py, ps) in placed.values()
                ):
                    placed[k] = (x, y, side)
                    break
            else:
                ok = False
                break
        if not ok:
            continue  # resample the whole scene: keeps the co-occurrence rate exact
        scene = Scene(seed=seed, config=config)
        for k in range(len(specs)):
            s, c, size, side = specs[k]
            x, y, _ = placed[k]
            scene.objects.append(ShapeObject(s, c, size, _tight_box(s, x, y, side)))
            scene._placements.append((x, y, side))
        return scene
    raise RuntimeError(f"could not place the objects of scene {seed}")


def render_scene(scene: Scene, with_labels: bool = False):
    cfg = scene.config
    n = cfg.canvas
    if cfg.texture > 0:
        noise = np.random.default_rng(scene.seed).normal(0.0, cfg.texture, size=(n, n, 1))
        base = np.clip(np.array(BACKGROUND, dtype=np.float64)[None, None, :] + noise, 0, 255).astype(np.uint8)
        img = Image.fromarray(base, "RGB")
    else:
        img = Image.new("RGB", (n, n), BACKGROUND)
    draw = ImageDraw.Draw(img)
    labels = Image.new("L", (n, n), 0) if with_labels else None
    ldraw = ImageDraw.Draw(labels) if with_labels else None
    for i, (obj, (x, y, side)) in enumerate(zip(scene.objects, scene._placements)):
        _draw(draw, obj.shape, x, y, side, COLOURS[obj.colour])
        if with_labels:
            _draw(ldraw, obj.shape, x, y, side, i + 1)
    return (img, labels) if with_labels else img


def scene_from_seed(seed: int, world: str = "train") -> Scene:
    return sample_scene(seed, WORLDS[world])


WORLDS = {"train": TRAIN_WORLD, "test": TEST_WORLD}


# ---------------------------------------------------------------- language of the world


def object_phrase(obj: ShapeObject, with_size: bool = True) -> str:
    return f"{obj.size} {obj.colour} {obj.shape}" if with_size else f"{obj.colour} {obj.shape}"


def unique_expressions(scene: Scene, i: int) -> list:
    """Referring expressions ("the small red circle") that pick out object i only."""
    target = scene.objects[i]
    out = []
    for keys in (("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape")):
        matches = [o for o in scene.objects if all(getattr(o, k) == getattr(target, k) for k in keys)]
        if len(matches) == 1:
            out.append("the " + " ".join(getattr(target, k) for k in keys))
    return out


NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}


def caption(scene: Scene) -> str:
    """Canonical caption: groups of identical (size, colour, shape), large ones first,
    then left to right, e.g. "a large red circle , two small blue squares and a small green star ."."""
    groups = {}
    for o in scene.objects:
        groups.setdefault((o.size, o.colour, o.shape), []).append(o)
    keys = sorted(groups, key=lambda k: (SIZE_CLASSES.index(k[0]) * -1, min(o.box[0] for o in groups[k])))
    parts = []
    for size, colour, shape in keys:
        n = len(groups[(size, colour, shape)])
        noun = shape if n == 1 else PLURALS[shape]
        parts.append(f"{NUMBER_WORDS[n]} {size} {colour} {noun}")
    if len(parts) == 1:
        body = parts[0]
    else:
        body = " , ".join(parts[:-1]) + " and " + parts[-1]
    return body + " ."
