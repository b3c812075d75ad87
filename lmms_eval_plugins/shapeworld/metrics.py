"""Scoring of ShapeWorld answers, with the parsers and metric definitions of the real
lmms-eval tasks (pope, coco_cap_chair, refcoco_bbox_rec, countbench, cv_bench).

Kept in the package (not only in task_configs/) so the training script can report the
same numbers the lmms-eval CLI will.
"""

from __future__ import annotations

import re

from .scenes import PLURALS, SHAPES

# ------------------------------------------------------------------------------- POPE
# lmms-eval's POPE compares the lower-cased, stripped answer to "yes"/"no" exactly:
# "Yes" scores as "yes", "Yes." does not (and counts as neither yes nor no).


def pope_prediction(text: str) -> str:
    return text.lower().strip()


def pope_scores(items) -> dict:
    """items: (prediction text, ground truth "yes"/"no").  Returns accuracy, precision,
    recall, f1 and yes_ratio as lmms-eval's pope aggregations define them (yes_ratio is
    the ground-truth "yes" share there, kept as is)."""
    preds = [(pope_prediction(p), g.lower().strip()) for p, g in items]
    n = len(preds)
    tp = sum(p == "yes" and g == "yes" for p, g in preds)
    fp = sum(p == "yes" and g == "no" for p, g in preds)
    fn = sum(p == "no" and g == "yes" for p, g in preds)
    accuracy = sum(p == g for p, g in preds) / n if n else 0.0
    precision = tp / (tp + fp) if tp + fp else 0
    recall = tp / (tp + fn) if tp + fn else 0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0
    yes_ratio = sum(g == "yes" for _, g in preds) / n if n else 0
    return {
        "pope_accuracy": accuracy,
        "pope_precision": precision,
        "pope_recall": recall,
        "pope_f1_score": f1,
        "pope_yes_ratio": yes_ratio,
    }


# lmms-eval aggregations (the task utils re-export them for their YAMLs)
def _pope(results, key):
    return pope_scores([(r["prediction"], r["ground_truth"]) for r in results])[key]


def pope_aggregate_accuracy(results):
    return _pope(results, "pope_accuracy")


def pope_aggregate_precision(results):
    return _pope(results, "pope_precision")


def pope_aggregate_recall(results):
    return _pope(results, "pope_recall")


def pope_aggregate_f1_score(results):
    return _pope(results, "pope_f1_score")


def pope_aggregate_yes_ratio(results):
    return _pope(results, "pope_yes_ratio")


# ------------------------------------------------------------------------------ CHAIR
# The closed vocabulary: every word that names a ShapeWorld shape, with synonyms and
# plurals (COCO-CHAIR's synonym table, for this world).
SHAPE_SYNONYMS = {
    "circle": ["circle", "disc", "disk", "ball", "dot"],
    "square": ["square", "box", "block", "cube", "rectangle"],
    "triangle": ["triangle", "pyramid"],
    "star": ["star", "pentagram"],
    "diamond": ["diamond", "rhombus", "lozenge"],
    "cross": ["cross", "plus"],
}
_IRREGULAR_PLURALS = {
    "boxes": "box",
    "crosses": "cross",
    "discs": "disc",
    "disks": "disk",
    "rhombi": "rhombus",
    "rhombuses": "rhombus",
    "pluses": "plus",
    "plusses": "plus",
}
WORD_TO_SHAPE = {}
for _shape, _words in SHAPE_SYNONYMS.items():
    for _w in _words:
        WORD_TO_SHAPE[_w] = _shape
        WORD_TO_SHAPE[_w + "s"] = _shape
for _plural, _singular in _IRREGULAR_PLURALS.items():
    WORD_TO_SHAPE[_plural] = WORD_TO_SHAPE[_singular]
for _shape in SHAPES:
    WORD_TO_SHAPE[PLURALS[_shape]] = _shape


def caption_objects(caption: str) -> list:
    """Shape names mentioned in a caption, one entry per mention (as CHAIR counts them)."""
    words = re.findall(r"[a-z]+", caption.lower())
    return [WORD_TO_SHAPE[w] for w in words if w in WORD_TO_SHAPE]


def chair_scores(items) -> dict:
    """items: (caption text, ground-truth shape list).  CHAIR_I = hallucinated mentions /
    all mentions, CHAIR_S = captions with a hallucination / captions, recall = ground-truth
    shapes mentioned / ground-truth shapes; all x 100, as coco_cap_chair reports them."""
    mentions = hallucinated = bad_captions = matched = total_gt = 0
    for text, gt in items:
        pred = caption_objects(text)
        gt = set(gt)
        mentions += len(pred)
        wrong = sum(p not in gt for p in pred)
        hallucinated += wrong
        bad_captions += wrong > 0
        matched += len(gt & set(pred))
        total_gt += len(gt)
    n = len(items)
    return {
        "coco_cap_chair_i": 100.0 * hallucinated / mentions if mentions else 0.0,
        "coco_cap_chair_s": 100.0 * bad_captions / n if n else 0.0,
        "coco_cap_recall": 100.0 * matched / total_gt if total_gt else 0.0,
    }


# -------------------------------------------------------------------------------- REC
REC_METRICS = ["IoU", "ACC@0.1", "ACC@0.3", "ACC@0.5", "ACC@0.7", "ACC@0.9", "Center_ACC"]
_FLOAT = r"(-?\d+(?:\.\d+)?)"
_BOX_PATTERN = re.compile(r"\[\s*" + r",\s*".join([_FLOAT] * 4) + r"\s*\]")


def parse_box(text: str) -> list:
    """First "[x1, y1, x2, y2]" in the text, as refcoco_bbox_rec parses it; [0, 0, 0, 0]
    when there is none."""
    m = _BOX_PATTERN.search(text)
    return [float(m.group(i)) for i in range(1, 5)] if m else [0.0, 0.0, 0.0, 0.0]


def box_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def centre_inside(gt, pred) -> bool:
    """refcoco's Center_ACC: the predicted box's centre lies inside the ground-truth box."""
    cx, cy = (pred[0] + pred[2]) / 2.0, (pred[1] + pred[3]) / 2.0
    return gt[0] <= cx <= gt[2] and gt[1] <= cy <= gt[3]


def rec_scores(items) -> dict:
    """items: (answer text, ground-truth box in 0..1)."""
    ious, centres = [], []
    for text, gt in items:
        pred = parse_box(text)
        ious.append(box_iou(gt, pred))
        centres.append(centre_inside(gt, pred))
    n = len(items) or 1
    out = {"refcoco_IoU": sum(ious) / n}
    for t in (0.1, 0.3, 0.5, 0.7, 0.9):
        out[f"refcoco_ACC@{t}"] = sum(i >= t for i in ious) / n
    out["refcoco_Center_ACC"] = sum(centres) / n
    return out


# ------------------------------------------------------------------------------ count
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}


def normalise_count(answer) -> str:
    """CountBench's normalisation: lower-case, strip, number words to digits."""
    a = str(answer).strip().lower()
    return NUMBER_WORDS.get(a, a)


def count_score(text: str, number) -> float:
    return float(normalise_count(text) == normalise_count(number))


# ---------------------------------------------------------------------------- spatial


def answer_letter(text: str) -> str:
    """CV-Bench's letter extraction: "(A)", "A", "a.", "A) left" -> "A"."""
    m = re.match(r"[\(\s]*([A-Z])[\)\.\s]*", text.strip(), flags=re.IGNORECASE)
    return m.group(1).upper() if m else ""


def spatial_correct(text: str, answer: str) -> bool:
    return answer_letter(text) == answer.strip("()")
