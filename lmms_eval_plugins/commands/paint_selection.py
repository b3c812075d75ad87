"""`lmms-plugins paint-selection`: do PAINT's selected tokens land on objects? (ShapeWorld)

For the first N ShapeWorld CHAIR scenes, runs the checkpoint's vision tower once with PAINT's
vision-tower capture installed, selects local / summary / spatial tokens exactly as
`llava_paint` does, and compares each set with the exact object mask of the scene: the
fraction of its patches that cover an object (>= --cover of the patch's pixels), against the
fraction of all patches that do (the chance level).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from methods import hooks
from methods.paint import DEFAULTS, TokenSelector, image_geometry


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
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from ..shapeworld import data, resolve_pretrained

    path = resolve_pretrained(args.pretrained)
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    hooks.install(model)
    grid, _ = image_geometry(model)
    n_vision = hooks.num_layers(model, "vision")
    layers = (DEFAULTS["local_layer"], DEFAULTS["summary_layer"] % n_vision)
    hits = {k: [0, 0] for k in ("local", "summary", "spatial", "all patches")}
    for doc in data.chair_docs("test")[: args.limit]:
        scene = data.sample_scene(int(doc["scene_seed"]), data.WORLDS[doc["world"]])
        image, labels = scene.render(with_labels=True)
        pixel_values = processor.image_processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"]
        selector = TokenSelector(*layers, grid, args.top_ratio, args.spatial_ratio)
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
    print(f"{args.limit} ShapeWorld CHAIR scenes, grid {grid}, vision layers local={layers[0]} summary={layers[1]}")
    print("| tokens | per image | on an object |\n|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['tokens_per_image']:.1f} | {r['on_object']:.1%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def register(sub) -> None:
    p = sub.add_parser("paint-selection", help="how often PAINT's selected tokens cover objects (ShapeWorld)")
    p.add_argument("--pretrained", default="shapeworld-tiny")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--top_ratio", type=float, default=DEFAULTS["top_ratio"])
    p.add_argument("--spatial_ratio", type=float, default=0.05)
    p.add_argument("--cover", type=float, default=0.1, help="fraction of object pixels for a patch to count as object")
    p.add_argument("--json", default=None)
    p.set_defaults(func=main)
