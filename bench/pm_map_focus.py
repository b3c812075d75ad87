"""Where do PM's perception maps point on ShapeWorld? Share of each map on the object tokens.

    python bench/pm_map_focus.py [--n 60] [--task adversarial] [--kernel 5] [--alpha 15]

For the first n POPE test questions about a present object ("yes" answers), on shapeworld-tiny:
the share of the map's mass that falls on image tokens covering any object, for the first
(unmasked) map, for H* after the iterative refinement, and for H* without refinement
(max_iter=0), against the share of tokens that cover an object (what a map blind to the
objects would give). Also the share on the asked-about object's tokens alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmms_eval_plugins.base import resolve_pretrained  # noqa: E402
from lmms_eval_plugins.shapeworld import data  # noqa: E402
from methods import hooks, pm, pm_view  # noqa: E402
from methods.technique import Request  # noqa: E402


def token_cover(boxes, grid: int, canvas: int) -> np.ndarray:
    """(grid*grid,) bool: tokens whose cell overlaps any of the boxes (x0, y0, x1, y1), raster order."""
    cell = canvas / grid
    cover = np.zeros((grid, grid), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        cover[int(y0 // cell) : int(np.ceil(y1 / cell)), int(x0 // cell) : int(np.ceil(x1 / cell))] = True
    return cover.ravel()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--task", default="adversarial", choices=data.POPE_RULES)
    ap.add_argument("--pretrained", default="shapeworld-tiny")
    ap.add_argument("--kernel", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=15.0)
    a = ap.parse_args()
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    ckpt = resolve_pretrained(a.pretrained)
    model = LlavaForConditionalGeneration.from_pretrained(ckpt).eval()
    processor = AutoProcessor.from_pretrained(ckpt)
    hooks.install(model)
    n_layers, grid = hooks.num_layers(model), pm_view.image_grid(model)
    knobs = {"kernel": a.kernel, "alpha": a.alpha}
    refined, flat = (
        pm.PerceptionMagnifier(n_layers, grid, **knobs),
        pm.PerceptionMagnifier(n_layers, grid, max_iter=0, **knobs),
    )
    rows = []
    docs = [d for d in data.pope_docs(a.task, "test") if d["answer"] == "yes"][: a.n]
    for doc in docs:
        scene = json.loads(doc["scene"])
        image = data.render_doc(doc).convert("RGB")
        msgs = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": data.pope_text(doc["object"])}]}
        ]
        prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=[image], text=prompt, return_tensors="pt")
        req = Request(
            inputs["input_ids"], model.config.image_token_id, inputs["input_ids"].shape[1], [image], prompt, processor
        )
        all_cover = token_cover([o["box"] for o in scene["objects"]], grid, scene["canvas"])
        asked = token_cover([o["box"] for o in scene["objects"] if o["shape"] == doc["object"]], grid, scene["canvas"])
        row = {"size": doc["size_class"], "area": all_cover.mean(), "asked_area": asked.mean()}
        for name, t in (("refined", refined), ("flat", flat)):
            t.generate(model, req, **inputs, max_new_tokens=1, do_sample=False)
            s = t.last_magnified.search
            first, h = s.maps[0], s.h_star
            if name == "refined":
                row["first_map"] = first[all_cover].sum() / first.sum()
                row["first_map_asked"] = first[asked].sum() / first.sum()
                row["passes"] = s.iterations
            row[f"h_star_{name}"] = h[all_cover].sum() / h.sum()
            row[f"h_star_{name}_asked"] = h[asked].sum() / h.sum()
            d = t.last_magnified.grid_map.ravel()
            row[f"density_{name}"] = d[all_cover].sum() / d.sum()
        rows.append(row)
    keys = [k for k in rows[0] if k != "size"]
    print(
        f"{len(rows)} POPE '{a.task}' questions about a present object, {a.pretrained} ({grid}x{grid} tokens), kernel {a.kernel}, alpha {a.alpha}:"
    )
    print("| share of the map on ... | " + " | ".join(keys) + " |")
    for size in ("all", "small", "large"):
        sel = [r for r in rows if size == "all" or r["size"] == size]
        if sel:
            print(
                f"| {size} (n={len(sel)}) | " + " | ".join(f"{np.mean([r[k] for r in sel]):.3f}" for k in keys) + " |"
            )
    return 0


if __name__ == "__main__":
    with torch.no_grad():
        raise SystemExit(main())
