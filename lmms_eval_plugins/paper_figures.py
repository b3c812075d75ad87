"""Figures the papers report on the real benchmarks, shown beside ShapeWorld numbers by `compare`.

Data, not code: each entry names the model (our registered name), the real lmms-eval task
and metric it was reported on, the value, and where it comes from. A ShapeWorld task maps
to the real task it stands for. Only figures we could trace to a source are listed.
"""

from __future__ import annotations

STANDS_FOR = {
    "shapeworld_pope_random": "pope_random",
    "shapeworld_pope_popular": "pope_pop",
    "shapeworld_pope_adversarial": "pope_adv",
    "shapeworld_chair": "coco_cap_chair",
    "shapeworld_rec": "refcoco_bbox_rec",
}

# (model, real task, metric) -> (value, source)
FIGURES: dict[tuple[str, str, str], tuple[str, str]] = {}


def paper_figure(model: str, task: str, metric: str) -> str | None:
    hit = FIGURES.get((model, STANDS_FOR.get(task, task), metric))
    return None if hit is None else f"{hit[0]} ({hit[1]})"
