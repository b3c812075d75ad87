"""Figures the papers report on the real benchmarks, shown beside ShapeWorld numbers by `compare`.

The numbers live in the paper recipes (lmms_eval_plugins/recipes/*.yaml, one place per number): each
``Figure`` names the model (our registered name, ``llava_hf`` for a paper's greedy baseline row),
the paper's row, the real lmms-eval task and metric it corresponds to (``metric=None`` when lmms-eval
has no such single metric), the value, where it comes from, and how the paper's evaluation differs
from the lmms-eval task. A ShapeWorld task maps to the real task it stands for. Only figures traced
to a source are listed (all LLaVA-1.5-7B).
"""

from __future__ import annotations

import dataclasses

STANDS_FOR = {
    "shapeworld_pope_random": "pope_random",
    "shapeworld_pope_popular": "pope_pop",
    "shapeworld_pope_adversarial": "pope_adv",
    "shapeworld_chair": "coco_cap_chair",
    "shapeworld_rec": "refcoco_bbox_rec_val",  # the localization-heads paper's first REC column
    # the PM paper's evaluation (task_configs/pm_official) and its ShapeWorld twins
    "shapeworld_pope_random_first_token": "pope_random_first_token",
    "shapeworld_pope_popular_first_token": "pope_pop_first_token",
    "shapeworld_pope_adversarial_first_token": "pope_adv_first_token",
    "shapeworld_mme_first_token": "mme_official8_first_token",
}


@dataclasses.dataclass(frozen=True)
class Figure:
    model: str  # our registered model name
    row: str  # the paper's row label
    task: str  # the real lmms-eval task
    metric: str | None  # its lmms-eval metric (None: lmms-eval reports no such metric)
    value: float
    source: str
    preset: str | None = None  # our preset that runs this row's configuration, if any
    differs: str = ""  # how the paper's evaluation differs from the lmms-eval task
    primary: bool = True  # the one `compare` shows for (model, task, metric)


def _figures() -> list[Figure]:
    """Every paper value of every recipe (lmms_eval_plugins/recipes/*.yaml), as a Figure of the run's model."""
    from .recipes import all_recipes

    out = []
    for recipe in all_recipes():
        for row in recipe.rows:
            if row.paper is None:
                continue
            run = recipe.runs[row.run]
            task = row.task or recipe.row(row.mean_of[0]).task
            # a summed, averaged or relative value is no single lmms-eval metric
            single = len(row.metric) == 1 and not row.relative and not row.not_run
            out.append(
                Figure(
                    model=run.model,
                    row=row.paper.row,
                    task=task,
                    metric=row.metric[0] if single else None,
                    value=row.paper.value,
                    source=row.paper.source,
                    preset=None if row.not_run else run.preset,
                    differs=row.paper.differs,
                    primary=row.paper.primary,
                )
            )
    return out


FIGURES: list[Figure] = _figures()


def figures_for(model: str, task: str | None = None) -> list[Figure]:
    """Every figure of ``model`` (on the real task ``task`` stands for, if given)."""
    real = None if task is None else STANDS_FOR.get(task, task)
    return [f for f in FIGURES if f.model == model and (real is None or f.task == real)]


def paper_figure(model: str, task: str, metric: str) -> str | None:
    """The paper's headline figure for (model, task, metric) as `compare` prints it, or None."""
    for f in figures_for(model, task):
        if f.primary and f.metric == metric:
            return f"{f.value:g} ({f.row}; {f.source})"
    return None
