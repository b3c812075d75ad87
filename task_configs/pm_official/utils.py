"""The Perception Magnifier paper's evaluation as lmms-eval tasks (ShunqiM/PM @ 58c2c0f).

What the official scripts score and lmms-eval's pope / mme tasks do not:

- the answer is read from the first answer token: "yes" if P(yes) > P(no), else "no"
  (eval/pope/eval_pope_seeds.py:62-63 on ``logits_score``; eval/MME/convert_and_eval.py:74 on
  ``naive``). Here: an lmms-eval ``multiple_choice`` request per answer word, the lower
  loss (negative log-likelihood of the answer token after the prompt) wins, ties go to "no";
- the POPE prompt is the question + " Please answer this question with one word."
  (model_generate.py:66-67); the MME prompt is the LLaVA question file's
  "<question>\\nAnswer the question using a single word or phrase." (eval/MME/llava_mme.jsonl),
  which is lmms-eval's mme prompt;
- MME keeps 8 of its 14 subsets (model_generate.py:146-149).

ShapeWorld twins (``shapeworld_*_first_token``) run the same scoring on the ShapeWorld POPE
docs, so the tasks are tested here without downloads. Metrics keep lmms-eval's names.
"""

from datasets import Dataset

# the plugin is installed (pip install -e .) wherever lmms-eval can load its model names
from lmms_eval_plugins.shapeworld import data

# lmms-eval's aggregations over per-doc records {"prediction", "ground_truth"} (YAML: !function utils.pope_aggregate_*)
from lmms_eval_plugins.shapeworld.metrics import (  # noqa: F401
    pope_aggregate_accuracy,
    pope_aggregate_f1_score,
    pope_aggregate_precision,
    pope_aggregate_recall,
    pope_aggregate_yes_ratio,
)

POPE_POSTFIX = " Please answer this question with one word."  # model_generate.py:66-67
MME_POST_PROMPT = "\nAnswer the question using a single word or phrase."  # eval/MME/llava_mme.jsonl
MME_SUBSETS = (  # model_generate.py:147
    "existence",
    "count",
    "position",
    "color",
    "commonsense_reasoning",
    "numerical_calculation",
    "text_translation",
    "code_reasoning",
)
POPE_METRICS = ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio")


def first_token_answer(results) -> str:
    """ "yes" if the first choice (yes) has the lower loss, else "no" (a tie answers "no", as
    ``'yes' if p_yes > p_no else 'no'``). ``results``: one (loss, is_greedy) per choice."""
    loss_yes, loss_no = (r[0] if isinstance(r, (tuple, list)) else r for r in results[:2])
    return "yes" if loss_yes < loss_no else "no"


# ------------------------------------------------------------------ lmms-eval's POPE / MME data


def pope_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"].strip() + POPE_POSTFIX


def pope_doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def pope_process_results(doc, results):
    from lmms_eval.tasks.pope.utils import pope_process_results as lmms_pope

    return lmms_pope(doc, [first_token_answer(results)])


def mme_official_docs(dataset):
    return dataset.filter(lambda doc: doc["category"] in MME_SUBSETS)


def mme_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    from lmms_eval.tasks.mme.utils import mme_doc_to_text as lmms_mme

    return lmms_mme(doc, {"pre_prompt": "", "post_prompt": MME_POST_PROMPT})


def mme_doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def mme_process_results(doc, results):
    from lmms_eval.tasks.mme.utils import mme_process_results as lmms_mme

    return lmms_mme(doc, ["Yes" if first_token_answer(results) == "yes" else "No"])


def mme_aggregate_results(results):
    from lmms_eval.tasks.mme.utils import mme_aggregate_results as lmms_mme

    return lmms_mme(results)


# ------------------------------------------------------------------------- ShapeWorld twins


def _docs(rule):
    def expand(dataset):
        return Dataset.from_list(data.pope_docs(rule, dataset[0]["split"]))

    return expand


shapeworld_pope_random_docs = _docs("random")
shapeworld_pope_popular_docs = _docs("popular")
shapeworld_pope_adversarial_docs = _docs("adversarial")


def shapeworld_doc_to_visual(doc):
    return [data.render_doc(doc).convert("RGB")]


def shapeworld_pope_process_results(doc, results):
    pred, gt = first_token_answer(results), doc["answer"].lower().strip()
    record = {
        "question_id": doc["question_id"],
        "score": float(pred == gt),
        "prediction": pred,
        "ground_truth": gt,
        "size_class": doc["size_class"],
        "category": doc["category"],
    }
    return {m: record for m in POPE_METRICS}


def shapeworld_mme_docs(dataset):
    """MME-shaped docs over ShapeWorld: the POPE "random" questions as the ``existence`` subset
    (ShapeWorld has no twin for the other 7 subsets), grouped per scene for MME's acc+, passed
    through the same 8-subset filter."""
    docs = [
        {
            **d,
            "question_id": f"scene-{d['scene_seed']}",
            "category": "existence",
            "answer": d["answer"].capitalize(),
            "question": d["question"] + " Please answer yes or no.",
        }
        for d in data.pope_docs("random", dataset[0]["split"])
    ]
    return mme_official_docs(Dataset.from_list(docs))


def yes_no_target(doc) -> int:
    return 0 if doc["answer"].strip().lower() == "yes" else 1


def _lmms_pope(name):
    def aggregate(results):
        import lmms_eval.tasks.pope.utils as lmms_pope

        return getattr(lmms_pope, name)(results)

    aggregate.__name__ = f"lmms_{name}"
    return aggregate


lmms_pope_aggregate_accuracy = _lmms_pope("pope_aggregate_accuracy")
lmms_pope_aggregate_precision = _lmms_pope("pope_aggregate_precision")
lmms_pope_aggregate_recall = _lmms_pope("pope_aggregate_recall")
lmms_pope_aggregate_f1_score = _lmms_pope("pope_aggregate_f1_score")
lmms_pope_aggregate_yes_ratio = _lmms_pope("pope_aggregate_yes_ratio")
