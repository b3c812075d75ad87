"""lmms-eval glue for the ShapeWorld tasks.

The data files hold one line naming the split; `process_docs` expands it into the fixed,
seeded docs of lmms_eval_plugins.shapeworld.data, and `doc_to_visual` renders each doc's
image from its seed.  Nothing to download, nothing large committed, same docs everywhere.
Prompts, parsers and metric names are those of lmms-eval's pope, coco_cap_chair,
refcoco_bbox_rec, countbench and cv_bench tasks.
"""

from datasets import Dataset

# the plugin is installed (pip install -e .) wherever lmms-eval can load its model names
from lmms_eval_plugins.shapeworld import data, metrics

# lmms-eval's aggregations over per-doc records {"prediction", "ground_truth"} (YAML: !function utils.pope_aggregate_*)
from lmms_eval_plugins.shapeworld.metrics import (  # noqa: F401
    pope_aggregate_accuracy,
    pope_aggregate_f1_score,
    pope_aggregate_precision,
    pope_aggregate_recall,
    pope_aggregate_yes_ratio,
)


def _expand(dataset, make_docs):
    split = dataset[0]["split"]
    return Dataset.from_list(make_docs(split))


def pope_random_docs(dataset):
    return _expand(dataset, lambda split: data.pope_docs("random", split))


def pope_popular_docs(dataset):
    return _expand(dataset, lambda split: data.pope_docs("popular", split))


def pope_adversarial_docs(dataset):
    return _expand(dataset, lambda split: data.pope_docs("adversarial", split))


def chair_docs(dataset):
    return _expand(dataset, data.chair_docs)


def rec_docs(dataset):
    return _expand(dataset, data.rec_docs)


def count_docs(dataset):
    return _expand(dataset, data.count_docs)


def spatial_docs(dataset):
    return _expand(dataset, data.spatial_docs)


def shapeworld_doc_to_visual(doc):
    return [data.render_doc(doc).convert("RGB")]


# ----------------------------------------------------------------------------- POPE


def pope_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question'].strip()}{kwargs.get('post_prompt', '')}"


POPE_METRICS = ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio")


def pope_process_results(doc, results):
    pred = metrics.pope_prediction(results[0])
    gt = doc["answer"].lower().strip()
    record = {
        "question_id": doc["question_id"],
        "score": float(pred == gt),
        "prediction": pred,
        "ground_truth": gt,
        "size_class": doc["size_class"],
        "category": doc["category"],
    }
    return {m: record for m in POPE_METRICS}


# ---------------------------------------------------------------------------- CHAIR


def chair_doc_to_text(doc):
    return data.CHAIR_PROMPT


def chair_process_results(doc, results):
    pred = results[0] if results else ""
    record = {
        "answer": list(doc["gt_object"]),
        "pred": metrics.caption_objects(pred),
        "image_id": int(doc["question_id"]),
        "caption": pred,
    }
    return {f"coco_cap_{m}": record for m in ("chair_i", "chair_s", "recall")}


def _chair(results, key):
    # the records hold already-parsed objects; re-join them so chair_scores parses the same words
    return metrics.chair_scores([(" ".join(r["pred"]), r["answer"]) for r in results])[key]


def chair_aggregate_chair_i(results):
    return _chair(results, "coco_cap_chair_i")


def chair_aggregate_chair_s(results):
    return _chair(results, "coco_cap_chair_s")


def chair_aggregate_recall(results):
    return _chair(results, "coco_cap_recall")


# ------------------------------------------------------------------------------ REC


def rec_doc_to_text(doc):
    return data.rec_text(doc["answer"])


def rec_process_results(doc, results):
    pred = results[0] if results else ""
    record = {
        "answer": doc["answer"],
        "pred": metrics.parse_box(pred),
        "ann_id": doc["question_id"],
        "bbox": list(doc["bbox"]),
        "size_class": doc["size_class"],
    }
    return {f"refcoco_{m}": record for m in metrics.REC_METRICS}


def _rec(results, key):
    items = [("[" + ", ".join(str(v) for v in r["pred"]) + "]", r["bbox"]) for r in results]
    return metrics.rec_scores(items)[key]


def rec_aggregate_iou(results):
    return _rec(results, "refcoco_IoU")


def rec_aggregate_acc01(results):
    return _rec(results, "refcoco_ACC@0.1")


def rec_aggregate_acc03(results):
    return _rec(results, "refcoco_ACC@0.3")


def rec_aggregate_acc05(results):
    return _rec(results, "refcoco_ACC@0.5")


def rec_aggregate_acc07(results):
    return _rec(results, "refcoco_ACC@0.7")


def rec_aggregate_acc09(results):
    return _rec(results, "refcoco_ACC@0.9")


def rec_aggregate_center_acc(results):
    return _rec(results, "refcoco_Center_ACC")


# ---------------------------------------------------------------------------- count


def count_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question'].strip()}{kwargs.get('post_prompt', '')}"


def count_doc_to_target(doc):
    return metrics.normalise_count(doc["number"])


def count_process_results(doc, results):
    return {"acc": metrics.count_score(results[0], doc["number"])}


# -------------------------------------------------------------------------- spatial


def spatial_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    letters = ", ".join(chr(65 + i) for i in range(len(doc["choices"])))
    return kwargs.get("pre_prompt", "").format(letters) + "\n" + doc["prompt"]


def spatial_process_results(doc, results):
    response = results[0]
    letter = metrics.answer_letter(response)
    gt = doc["answer"].strip("()")
    record = {
        "id": doc["idx"],
        "gt_content": gt,
        "pred_parsed": letter,
        "pred": response,
        "type": doc["type"],
        "task": doc["task"],
        "source": doc["source"],
        "size_class": doc["size_class"],
        "is_correct": letter == gt,
    }
    return {"cv_bench_acc": record}


def spatial_aggregate(results):
    return sum(r["is_correct"] for r in results) / len(results) if results else 0.0
