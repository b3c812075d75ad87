"""`lmms-plugins paint-selection`: do PAINT's selected tokens land on objects? (ShapeWorld)

Runs on the families ``llava_paint`` runs on (LLaVA-1.5; LLaVA-NeXT from its base crop, as ``llava_paint``
reads it); the families PAINT refuses (``methods.paint.REFUSED``: no CLS token, or tokens that merge several
patches) are refused here with the same reason.

For the first N ShapeWorld CHAIR scenes, runs the checkpoint's vision tower once with PAINT's
vision-tower capture installed, selects local / summary / spatial tokens exactly as
`llava_paint` does, and compares each set with the exact object mask of the scene: the
fraction of its patches that cover an object (>= --cover of the patch's pixels), against the
fraction of all patches that do (the chance level).

``--source received`` selects with the CLS-free substitute instead (``selection_source=received``);
``--compare`` runs both on each scene in the same vision-tower pass and reports their agreement:
Jaccard overlap of the local and summary sets (chance level: the expected Jaccard of random sets
of the same sizes) and Spearman rank correlation of the two scores per patch, in the local layer
and the summary layer. This is the validation of the substitute where CLS exists (CLIP).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from methods import hooks
from methods.paint import DEFAULTS, image_geometry
from methods.paint_selection import TokenSelector, cls_attention


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D score vectors (ties broken by position)."""
    ra, rb = (x.argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def jaccard(a: np.ndarray, b: np.ndarray) -> float | None:
    union = int((a | b).sum())
    return None if union == 0 else int((a & b).sum()) / union


def chance_jaccard(n: int, ka: int, kb: int) -> float | None:
    """E[|A & B|] / E[|A | B|] for random sets of sizes ka, kb among n (a ratio of expectations)."""
    inter = ka * kb / n
    return None if ka + kb - inter == 0 else inter / (ka + kb - inter)


def load(pretrained: str, image_processor: str | None):
    """(model, image processor, family adapter) of a checkpoint whose family PAINT runs on (a separate image
    processor dir if it has none); SystemExit with the reason for the families PAINT refuses (``paint.REFUSED``:
    towers without CLS, tokens that merge several patches) and for model types without an adapter."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText

    from methods import families
    from methods.geometry import GeometryError
    from methods.paint import REFUSED

    from ..shapeworld import resolve_pretrained

    path = resolve_pretrained(pretrained)
    model_type = AutoConfig.from_pretrained(path).model_type
    try:
        family = families.adapter(model_type, "paint-selection")
    except GeometryError as e:
        raise SystemExit(str(e)) from e
    if model_type in REFUSED:
        runs_on = ", ".join(
            dict.fromkeys(f.display_name for t, f in sorted(families.ADAPTERS.items()) if t not in REFUSED)
        )
        raise SystemExit(
            f"paint-selection: PAINT does not run on {family.display_name} ({pretrained}): {REFUSED[model_type]}. "
            f"It runs on {runs_on}"
        )
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoImageProcessor.from_pretrained(image_processor or path), family


def tower_pixels(family, image_processor, image) -> torch.Tensor:
    """The pixels of the one tower crop whose CLS sees the whole image (the family's ``cls_crop``, as ``llava_paint``
    reads it: LLaVA-NeXT's base crop; LLaVA-1.5's only one)."""
    pixel_values = image_processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"]
    return pixel_values[:, family.cls_crop] if pixel_values.ndim == 5 else pixel_values


def object_patches(label_map, grid: tuple[int, int], cover: float) -> np.ndarray:
    """Bool (grid_h * grid_w,): patches whose area is at least ``cover`` object pixels."""
    lab = np.asarray(label_map) > 0
    gh, gw = grid
    h, w = lab.shape
    out = np.zeros(gh * gw, dtype=bool)
    for r in range(gh):
        for c in range(gw):
            cell = lab[r * h // gh : (r + 1) * h // gh, c * w // gw : (c + 1) * w // gw]
            out[r * gw + c] = cell.mean() >= cover
    return out


def main(args) -> int:
    from ..shapeworld import data

    if args.compare:
        return compare(args)
    model, image_processor, family = load(args.pretrained, args.image_processor)
    hooks.install(model)
    grid, _ = image_geometry(model)
    n_vision = hooks.num_layers(model, "vision")
    layers = (DEFAULTS["local_layer"], DEFAULTS["summary_layer"] % n_vision)
    hits = {k: [0, 0] for k in ("local", "summary", "spatial", "all patches")}
    for doc in data.chair_docs("test")[: args.limit]:
        scene = data.sample_scene(int(doc["scene_seed"]), data.WORLDS[doc["world"]])
        image, labels = scene.render(with_labels=True)
        pixel_values = tower_pixels(family, image_processor, image)
        selector = TokenSelector(*layers, grid, args.top_ratio, args.spatial_ratio, source=args.source)
        with torch.no_grad(), hooks.edited(model, selector.capture):
            model.model.vision_tower(pixel_values.to(model.dtype))
        sel = selector.current()
        on_object = object_patches(labels, grid, args.cover)
        for kind in ("local", "summary", "spatial"):
            idx = getattr(sel, kind)[0].numpy()
            hits[kind][0] += int(on_object[idx].sum())
            hits[kind][1] += int(idx.sum())
        hits["all patches"][0] += int(on_object.sum())
        hits["all patches"][1] += on_object.size
    rows = {k: {"on_object": h / max(n, 1), "tokens_per_image": n / args.limit} for k, (h, n) in hits.items()}
    print(
        f"{args.limit} ShapeWorld CHAIR scenes, grid {grid}, vision layers local={layers[0]} summary={layers[1]}, "
        f"selection_source={args.source}"
    )
    print("| tokens | per image | on an object |\n|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['tokens_per_image']:.1f} | {r['on_object']:.1%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def compare(args) -> int:
    """CLS selection vs the received-attention selection, same scenes, same vision-tower pass."""
    from ..shapeworld import data

    model, image_processor, family = load(args.pretrained, args.image_processor)
    hooks.install(model)
    grid, _ = image_geometry(model)
    n = grid[0] * grid[1]
    n_vision = hooks.num_layers(model, "vision")
    layers = (DEFAULTS["local_layer"], DEFAULTS["summary_layer"] % n_vision)
    rows = []
    for doc in data.chair_docs("test")[: args.limit]:
        scene = data.sample_scene(int(doc["scene_seed"]), data.WORLDS[doc["world"]])
        image, labels = scene.render(with_labels=True)
        pixel_values = tower_pixels(family, image_processor, image)
        cls = TokenSelector(*layers, grid, args.top_ratio, 0.0)
        rec = TokenSelector(*layers, grid, args.top_ratio, 0.0, source="received")
        with torch.no_grad(), hooks.edited(model, cls.capture, rec.capture):
            model.model.vision_tower(pixel_values.to(model.dtype))
        a, b = cls.current(), rec.current()
        on_object = object_patches(labels, grid, args.cover)
        row = {}
        for kind in ("local", "summary"):
            x, y = getattr(a, kind)[0].numpy(), getattr(b, kind)[0].numpy()
            row[f"{kind} jaccard"] = jaccard(x, y)
            row[f"{kind} chance"] = chance_jaccard(n, int(x.sum()), int(y.sum()))
            row[f"{kind} size cls"], row[f"{kind} size received"] = int(x.sum()), int(y.sum())
            row[f"{kind} on object cls"] = (int(on_object[x].sum()), int(x.sum()))
            row[f"{kind} on object received"] = (int(on_object[y].sum()), int(y.sum()))
        cls_maps = cls.capture.latest()
        for name, layer in zip(("local", "summary"), layers):
            row[f"{name} spearman"] = spearman(cls_attention(cls_maps[layer])[0], rec.capture.latest()[layer][0])
        row["chance on object"] = (int(on_object.sum()), n)
        rows.append(row)

    def mean(key):
        vals = [r[key] for r in rows if r[key] is not None]
        return float(np.mean(vals)) if vals else float("nan")

    def pooled(key):
        hit, tot = (sum(r[key][i] for r in rows) for i in (0, 1))
        return hit / max(tot, 1)

    summary = {k: mean(k) for k in rows[0] if not isinstance(rows[0][k], tuple)}
    summary.update({k: pooled(k) for k in rows[0] if isinstance(rows[0][k], tuple)})
    print(
        f"{args.limit} ShapeWorld CHAIR scenes, {args.pretrained}: grid {grid}, vision layers local={layers[0]} "
        f"summary={layers[1]}, top_ratio={args.top_ratio}; CLS selection vs received-attention selection"
    )
    print(
        "| set | Jaccard (mean) | chance Jaccard | size cls / received | Spearman of the scores | on an object: cls / received |"
    )
    print("|---|---|---|---|---|---|")
    for kind in ("local", "summary"):
        print(
            f"| {kind} | {summary[kind + ' jaccard']:.3f} | {summary[kind + ' chance']:.3f} | "
            f"{summary[kind + ' size cls']:.1f} / {summary[kind + ' size received']:.1f} | {summary[kind + ' spearman']:.3f} | "
            f"{summary[kind + ' on object cls']:.1%} / {summary[kind + ' on object received']:.1%} |"
        )
    print(f"all patches on an object (chance): {summary['chance on object']:.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "per_scene": rows}, f, indent=1)
    return 0


def register(sub) -> None:
    p = sub.add_parser("paint-selection", help="how often PAINT's selected tokens cover objects (ShapeWorld)")
    p.add_argument("--pretrained", default="shapeworld-tiny")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--top_ratio", type=float, default=DEFAULTS["top_ratio"])
    p.add_argument("--spatial_ratio", type=float, default=0.05)
    p.add_argument("--cover", type=float, default=0.1, help="fraction of object pixels for a patch to count as object")
    p.add_argument("--source", default="cls", choices=("cls", "received"), help="selection_source to analyse")
    p.add_argument("--compare", action="store_true", help="agreement of the CLS and the received-attention selections")
    p.add_argument("--image_processor", default=None, help="image processor dir, for a checkpoint saved without one")
    p.add_argument("--json", default=None)
    p.set_defaults(func=main)
