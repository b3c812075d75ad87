"""Figures the papers report on the real benchmarks, shown beside ShapeWorld numbers by `compare`.

Data, not code: each ``Figure`` names the model (our registered name, ``llava_hf`` for a
paper's greedy baseline row), the paper's row, the real lmms-eval task and metric it
corresponds to (``metric=None`` when lmms-eval has no such metric), the value, where it comes
from, and how the paper's evaluation differs from the lmms-eval task. A ShapeWorld task maps to
the real task it stands for. Only figures traced to a source are listed (all LLaVA-1.5-7B).
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


# PAINT (arXiv 2501.12206), CHAIR on MSCOCO. The official evaluation (hasanar1f/PAINT @ 2a9e8f8,
# modPAI/chair_eval.py and modPAI/chair.py) differs from lmms-eval's coco_cap_chair: prompt
# "Please help me describe the image in detail." after the Vicuna system message
# (chair_eval.py:89-100, constants.py:14,27) vs lmms-eval's "Please describe this image in detail.";
# 500 images of COCO val2014 in a seeded shuffle of os.listdir (eval_data_loader.py:14-15, seed 927 at
# chair_eval.py:19, the first 500 batches at :94) vs the tsunghanwu/mscoco_chair test split;
# max_new_tokens 512 (chair_eval.py:59) vs 2048; CHAIR by modPAI/chair.py's cached evaluator
# (chair.pkl) vs lmms-eval's own implementation; every PAINT run with CFG gamma 1.1
# (modpai_eval.sh:17). F1 (of CHAIR precision and recall) has no lmms-eval metric.
_PAINT_CHAIR = (
    "MSCOCO val2014, 500 images (seeded shuffle), prompt 'Please help me describe the image in detail.' with the "
    "Vicuna system message, max 512 new tokens, CHAIR by the repository's chair.py (lmms-eval: "
    "tsunghanwu/mscoco_chair, 'Please describe this image in detail.', max 2048 tokens)"
)
_PAINT_MAIN = "PAINT (arXiv 2501.12206), CHAIR comparison on MSCOCO"
_PAINT_ALPHA = "PAINT (arXiv 2501.12206), ablation of alpha (beta 0.3, 25% local tokens, no spatial tokens)"


def _chair_rows(model, row, source, preset, s, i, f1, primary=True, differs=_PAINT_CHAIR):
    common = dict(
        model=model, row=row, task="coco_cap_chair", source=source, preset=preset, differs=differs, primary=primary
    )
    return [
        Figure(metric="coco_cap_chair_s", value=s, **common),
        Figure(metric="coco_cap_chair_i", value=i, **common),
        Figure(metric=None, value=f1, **{**common, "row": f"{row} (F1)"}),
    ]


# Perception Magnifier ("Through the Magnifying Glass", Mao, Zhang and Cai, 2025), LLaVA-1.5-7B,
# starred averages of the paper's main tables. Official evaluation (ShunqiM/PM @ 58c2c0f):
# first answer token P(yes) vs P(no) (eval_pope_seeds.py:62-63, MME/convert_and_eval.py:74),
# Vicuna system prompt, sampling at T=1 (model_generate.py:698) for the text only.
_PM = "PM (Mao, Zhang and Cai, 2025), main tables, starred averages"
_PM_MME = (
    "'Total*' over the 8 hallucination subsets the official code keeps (existence, count, position, color, commonsense "
    "reasoning, numerical calculation, text translation, code reasoning); first-token P(Yes) vs P(No); lmms-eval's mme "
    "reports perception and cognition separately over all 14 subsets (their sum over these 8 is the paper's total)"
)
_PM_POPE = (
    "'AVG*' accuracy over COCO, A-OKVQA and GQA x random / popular / adversarial; first-token P(yes) vs P(no) with the "
    "prompt suffix ' Please answer this question with one word.'; lmms-eval ships the COCO POPE splits only"
)
_PM_FIGURES = [
    Figure(
        model="llava_pm",
        row="PM",
        task="mme_official8_first_token",
        metric=None,
        value=683.33,
        source=_PM,
        preset="official_mme",
        differs=_PM_MME,
    ),
    Figure(
        model="llava_pm",
        row="PM",
        task="pope_adv_first_token",
        metric=None,
        value=86.70,
        source=_PM,
        preset="official_pope",
        differs=_PM_POPE,
    ),
]

# Localization heads (Kang et al., CVPR 2025, arXiv 2503.06287), LLaVA-1.5-7B with its own heads (no training).
# REC accuracy at IoU 0.5 (percent; lmms-eval's refcoco_ACC@0.5 is a fraction) and RES mIoU with SAM.
_LOCHEAD = "Localization heads (Kang et al., CVPR 2025), REC / RES tables, LLaVA-1.5-7B"
_LOCHEAD_REC = (
    "heads discovered by the paper on RefCOCO train (1000 samples x 5; not the heads we ship for llava-1.5-7b-hf, "
    "a third-party fork's list), prompt = the bare expression, the original LLaVA-1.5 with pad-to-square; lmms-eval's "
    "refcoco_bbox_rec tasks prompt with an instruction through the chat template and llava-hf's processor centre-crops"
)
_LOCHEAD_RES = (
    "mask mIoU with SAM prompted by the heads' box and point; lmms-eval has no mask-scored RES task (its refcoco_seg "
    "tasks score captions)"
)
_LOCHEAD_SPLITS = [
    ("refcoco", "val", 86.5, 74.2),
    ("refcoco", "testA", 89.8, 76.5),
    ("refcoco", "testB", 80.2, 70.4),
    ("refcoco+", "val", 80.1, 62.5),
    ("refcoco+", "testA", 86.3, 65.2),
    ("refcoco+", "testB", 71.9, 56.0),
    ("refcocog", "val", 82.3, 64.2),
    ("refcocog", "test", 83.0, 68.1),
]
_LOCHEAD_FIGURES = [
    figure
    for ds, split, rec, res in _LOCHEAD_SPLITS
    for figure in (
        Figure(
            model="llava_lochead",
            row=f"LLaVA-1.5-7B, {ds} {split}, REC Acc@0.5",
            task=f"{ds}_bbox_rec_{split}",
            metric="refcoco_ACC@0.5",
            value=rec,
            source=_LOCHEAD,
            preset="paper",
            differs=_LOCHEAD_REC,
        ),
        Figure(
            model="llava_lochead",
            row=f"LLaVA-1.5-7B, {ds} {split}, RES mIoU (SAM)",
            task=f"{ds}_bbox_rec_{split}",
            metric=None,
            value=res,
            source=_LOCHEAD,
            preset=None,
            differs=_LOCHEAD_RES,
            primary=False,
        ),
    )
]

FIGURES: list[Figure] = [
    *_PM_FIGURES,
    *_LOCHEAD_FIGURES,
    *_chair_rows("llava_hf", "LLaVA-1.5 (original)", _PAINT_MAIN, None, 46.2, 13.8, 75.9),
    # PAI as PAINT's table reports it (PAI's own settings in that run are not stated)
    *_chair_rows("llava_pai", "PAI", _PAINT_MAIN, None, 24.6, 6.8, 74.7),
    # margins not stated with the table; the spatial ablation's base is alpha 0.7, beta 0.4
    *_chair_rows("llava_paint", "PAINT", _PAINT_MAIN, "paper", 17.6, 4.0, 71.8),
    *_chair_rows(
        "llava_paint",
        "PAINT with spatial tokens (alpha 0.7, beta 0.4)",
        _PAINT_MAIN,
        "paper_spatial",
        15.4,
        4.8,
        69.8,
        primary=False,
    ),
    *_chair_rows(
        "llava_paint", "alpha 0.7 (caption length 179.7)", _PAINT_ALPHA, "official", 18.0, 3.9, 72.0, primary=False
    ),
    *_chair_rows("llava_paint", "alpha 0.5", _PAINT_ALPHA, None, 49.4, 13.3, 77.0, primary=False),
    *_chair_rows("llava_paint", "alpha 0.8", _PAINT_ALPHA, None, 4.6, 1.0, 51.1, primary=False),
]


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
