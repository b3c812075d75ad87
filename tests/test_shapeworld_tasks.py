"""ShapeWorld tasks: fixed splits, vocabulary coverage, and the metrics against hand
calculations (through the task_configs glue lmms-eval calls)."""

import importlib.util
from pathlib import Path

import pytest

from lmms_eval_plugins.shapeworld import data, metrics
from lmms_eval_plugins.shapeworld.scenes import SHAPES, sample_scene, WORLDS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def utils():
    spec = importlib.util.spec_from_file_location(
        "shapeworld_task_utils", ROOT / "task_configs" / "shapeworld" / "utils.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def aggregate(utils, process, aggregations, docs, answers):
    per_metric = {}
    for doc, ans in zip(docs, answers):
        for k, v in process(doc, [ans]).items():
            per_metric.setdefault(k, []).append(v)
    return {k: agg(per_metric[k]) for k, agg in aggregations.items()}


# ------------------------------------------------------------------------ the splits


def test_splits_are_fixed_and_sized():
    for make in (
        lambda s: data.pope_docs("adversarial", s),
        data.chair_docs,
        data.rec_docs,
        data.count_docs,
        data.spatial_docs,
    ):
        test_a, test_b, train = make("test"), make("test"), make("train")
        assert test_a == test_b
        assert len(test_a) == 300 and len(train) == 300
        assert not {d["scene_seed"] for d in test_a} & {d["scene_seed"] for d in train}


def test_pope_questions_are_true_and_follow_the_rules():
    docs = {rule: data.pope_docs(rule) for rule in data.POPE_RULES}
    freq, cooc = data.train_statistics()
    for rule, ds in docs.items():
        assert sum(d["answer"] == "yes" for d in ds) == 150
        for d in ds:
            scene = sample_scene(d["scene_seed"], WORLDS[d["world"]])
            assert (d["object"] in scene.shapes_present()) == (d["answer"] == "yes")
            if d["answer"] == "no":
                assert d["size_class"] == "absent"
                absent = [s for s in SHAPES if s not in scene.shapes_present()]
                if rule == "popular":
                    assert freq[d["object"]] == max(freq[s] for s in absent)
                if rule == "adversarial":
                    score = lambda s, scene=scene: sum(cooc[p][s] for p in scene.shapes_present())
                    assert score(d["object"]) == max(score(s) for s in absent)
    # the three rules share images and "yes" questions
    yes = [[(d["scene_seed"], d["object"]) for d in ds if d["answer"] == "yes"] for ds in docs.values()]
    assert yes[0] == yes[1] == yes[2]
    # adversarial negatives are mostly the absent partner of a present shape
    adv_partner = [d["partner_present"] for d in docs["adversarial"] if d["answer"] == "no"]
    rnd_partner = [d["partner_present"] for d in docs["random"] if d["answer"] == "no"]
    assert sum(adv_partner) >= 0.7 * len(adv_partner)
    assert sum(adv_partner) > 1.5 * sum(rnd_partner)


def test_rec_spatial_count_ground_truth():
    for d in data.rec_docs()[:50]:
        scene = sample_scene(d["scene_seed"], WORLDS[d["world"]])
        words = d["answer"].split()[1:]
        matches = [k for k, o in enumerate(scene.objects) if all(w in (o.size, o.colour, o.shape) for w in words)]
        assert len(matches) == 1 and scene.normalised_box(matches[0]) == d["bbox"]
        assert all(0 <= v <= 1 for v in d["bbox"])
    for d in data.count_docs()[:50]:
        scene = sample_scene(d["scene_seed"], WORLDS[d["world"]])
        assert scene.count(d["object"]) == int(d["number"])
    for d in data.spatial_docs()[:50]:
        letter = d["answer"].strip("()")
        assert d["choices"]["AB".index(letter)] == d["relation"]
        assert d["prompt"].endswith(f"(A) {d['choices'][0]}\n(B) {d['choices'][1]}")


# ------------------------------------------------------------------ vocabulary / model IO


def test_every_task_prompt_is_in_vocabulary(utils):
    from lmms_eval_plugins.shapeworld.model import build_tokenizer

    tok = build_tokenizer()
    unk = tok.unk_token_id
    kw_pope = {"pre_prompt": "", "post_prompt": data.POPE_POST_PROMPT}
    kw_count = {"pre_prompt": data.COUNT_PRE_PROMPT, "post_prompt": ""}
    kw_spatial = {"pre_prompt": data.SPATIAL_PRE_PROMPT}
    texts = [utils.pope_doc_to_text(d, kw_pope) for d in data.pope_docs("adversarial")[:24]]  # 6 shapes x yes/no
    texts += [utils.chair_doc_to_text(d) for d in data.chair_docs()[:2]]
    texts += [utils.rec_doc_to_text(d) for d in data.rec_docs()[:100]]
    texts += [utils.count_doc_to_text(d, kw_count) for d in data.count_docs()[:60]]
    texts += [utils.spatial_doc_to_text(d, kw_spatial) for d in data.spatial_docs()[:100]]
    # every word the generator can put in a question, whatever the sample
    from lmms_eval_plugins.shapeworld.scenes import COLOUR_NAMES, SIZE_CLASSES

    texts += [data.pope_text(s) + data.count_text(s) for s in SHAPES] + [" ".join(COLOUR_NAMES + SIZE_CLASSES)]
    for t in texts:
        simple = tok.apply_chat_template(
            [{"role": "user", "content": "<image>\n" + t}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(simple)["input_ids"]
        assert unk not in ids, tok.convert_ids_to_tokens(ids)
    # answers the tasks parse
    for answer in ["yes", "no", "A", "3", "[0.05, 0.10, 0.95, 1.00]", data.chair_docs()[0]["reference_caption"]]:
        ids = tok(answer, add_special_tokens=False)["input_ids"]
        assert unk not in ids


def test_decoded_box_parses_as_refcoco_does():
    from lmms_eval_plugins.shapeworld.model import build_tokenizer

    tok = build_tokenizer()
    text = tok.decode(tok("[0.05, 0.10, 0.95, 1.00]", add_special_tokens=False)["input_ids"])
    assert metrics.parse_box(text) == [0.05, 0.10, 0.95, 1.00]
    assert tok.decode(tok("yes", add_special_tokens=False)["input_ids"]) == "yes"


# --------------------------------------------------------------------------- metrics


def pope_aggs(utils):
    return {
        "pope_accuracy": utils.pope_aggregate_accuracy,
        "pope_precision": utils.pope_aggregate_precision,
        "pope_recall": utils.pope_aggregate_recall,
        "pope_f1_score": utils.pope_aggregate_f1_score,
        "pope_yes_ratio": utils.pope_aggregate_yes_ratio,
    }


def test_pope_metrics(utils):
    docs = data.pope_docs("random")[:8]  # yes, no, yes, no, ...
    perfect = aggregate(utils, utils.pope_process_results, pope_aggs(utils), docs, [d["answer"] for d in docs])
    assert perfect == {
        "pope_accuracy": 1.0,
        "pope_precision": 1.0,
        "pope_recall": 1.0,
        "pope_f1_score": 1.0,
        "pope_yes_ratio": 0.5,
    }
    # lmms-eval's POPE: lower-case + strip, then exact match: "Yes" counts, "Yes." does not
    answers = ["Yes", "yes", " YES ", "no", "Yes.", "No", "no", "no"]
    # gt:      yes   no     yes     no    yes     no    yes   no
    # tp: docs 0, 2 -> 2; fp: doc 1 -> 1; fn: docs 6 -> 1 ("Yes." is neither yes nor no)
    got = aggregate(utils, utils.pope_process_results, pope_aggs(utils), docs, answers)
    assert got["pope_accuracy"] == pytest.approx(5 / 8)
    assert got["pope_precision"] == pytest.approx(2 / 3)
    assert got["pope_recall"] == pytest.approx(2 / 3)
    assert got["pope_f1_score"] == pytest.approx(2 / 3)
    assert got["pope_yes_ratio"] == 0.5


def test_pope_agrees_with_lmms_eval_pope():
    from lmms_eval.tasks.pope import utils as real

    docs = data.pope_docs("adversarial")[:10]
    answers = ["Yes", "no", "Yes.", "No", "yes", "yes", "no", "no", "maybe", "yes"]
    res = [real.pope_process_results(d, [a])["pope_accuracy"] for d, a in zip(docs, answers)]
    ours = metrics.pope_scores([(a, d["answer"]) for a, d in zip(answers, docs)])
    assert ours["pope_accuracy"] == pytest.approx(real.pope_aggregate_accuracy(res))
    assert ours["pope_precision"] == pytest.approx(real.pope_aggregate_precision(res))
    assert ours["pope_recall"] == pytest.approx(real.pope_aggregate_recall(res))
    assert ours["pope_f1_score"] == pytest.approx(real.pope_aggregate_f1_score(res))


def test_chair_metrics_with_synonyms_and_plurals(utils):
    docs = [
        {"question_id": 0, "gt_object": ["circle", "square"]},
        {"question_id": 1, "gt_object": ["star"]},
        {"question_id": 2, "gt_object": ["diamond", "cross"]},
    ]
    aggs = {
        "coco_cap_chair_i": utils.chair_aggregate_chair_i,
        "coco_cap_chair_s": utils.chair_aggregate_chair_s,
        "coco_cap_recall": utils.chair_aggregate_recall,
    }
    perfect = ["a large red circle and two small blue squares .", "a green star .", "a rhombus next to a plus ."]
    assert aggregate(utils, utils.chair_process_results, aggs, docs, perfect) == {
        "coco_cap_chair_i": 0.0,
        "coco_cap_chair_s": 0.0,
        "coco_cap_recall": 100.0,
    }
    captions = [
        "a red disc , two boxes and a triangle .",  # circle, square, triangle(h): 1 of 3 hallucinated
        "two stars and a small square .",  # star, square(h)
        "a diamond .",  # diamond; misses cross
    ]
    got = aggregate(utils, utils.chair_process_results, aggs, docs, captions)
    # mentions 3 + 2 + 1 = 6, hallucinated 2; captions with hallucination 2 of 3;
    # recall: (2 + 1 + 1) of (2 + 1 + 2) ground-truth objects
    assert got["coco_cap_chair_i"] == pytest.approx(100 * 2 / 6)
    assert got["coco_cap_chair_s"] == pytest.approx(100 * 2 / 3)
    assert got["coco_cap_recall"] == pytest.approx(100 * 4 / 5)


def test_rec_metrics(utils):
    docs = data.rec_docs()[:4]
    aggs = {
        f"refcoco_{m}": getattr(utils, f"rec_aggregate_{n}")
        for m, n in zip(metrics.REC_METRICS, ["iou", "acc01", "acc03", "acc05", "acc07", "acc09", "center_acc"])
    }
    perfect = [data.format_box(d["bbox"]) for d in docs]
    got = aggregate(utils, utils.rec_process_results, aggs, docs, perfect)
    for k, v in got.items():
        # the answer is rounded to 2 decimals: IoU within rounding of 1
        assert v == pytest.approx(1.0, abs=0.15) if k == "refcoco_IoU" else v >= 0.75, (k, v)
    docs = [
        {"answer": "the star", "question_id": 0, "bbox": [0.0, 0.0, 0.5, 0.5], "size_class": "large"},
        {"answer": "the cross", "question_id": 1, "bbox": [0.5, 0.5, 1.0, 1.0], "size_class": "small"},
    ]
    answers = ["[0.0, 0.0, 0.5, 0.25]", "no box here"]  # IoU 0.5 (centre inside); unparseable -> [0,0,0,0]
    got = aggregate(utils, utils.rec_process_results, aggs, docs, answers)
    assert got["refcoco_IoU"] == pytest.approx(0.25)
    assert got["refcoco_ACC@0.5"] == 0.5 and got["refcoco_ACC@0.7"] == 0.0
    assert got["refcoco_Center_ACC"] == 0.5


def test_count_and_spatial_parsing(utils):
    doc = {"number": "2"}
    assert [utils.count_process_results(doc, [a])["acc"] for a in ["2", " two ", "Two", "3", "2 circles"]] == [
        1.0,
        1.0,
        1.0,
        0.0,
        0.0,
    ]
    doc = {"idx": 0, "answer": "(B)", "type": "2D", "task": "Relation", "source": "ShapeWorld", "size_class": "large"}
    got = [
        utils.spatial_process_results(doc, [a])["cv_bench_acc"]["is_correct"]
        for a in ["B", "(B)", "b", "B. right", "A", "right"]
    ]
    assert got == [True, True, True, True, False, False]
    assert utils.spatial_aggregate([{"is_correct": True}, {"is_correct": False}]) == 0.5


def test_resolve_pretrained():
    from lmms_eval_plugins.shapeworld import checkpoint_path, resolve_pretrained

    assert resolve_pretrained("shapeworld-tiny") == str(checkpoint_path())
    assert resolve_pretrained("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
    assert checkpoint_path().name == "shapeworld-tiny"
