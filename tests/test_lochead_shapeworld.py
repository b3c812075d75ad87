"""Localization heads on the shipped ShapeWorld checkpoint, train split only (the test split is for measuring)."""

import random

import pytest
from conftest import load

from lmms_eval_plugins.shapeworld import checkpoint_path
from methods import hooks
from methods import lochead as L
from methods.technique import Request

pytestmark = pytest.mark.skipif(not (checkpoint_path() / "config.json").exists(), reason="shapeworld-tiny checkpoint not built yet")


def _train_samples(n, seed, skip=()):
    from lmms_eval_plugins.shapeworld import data

    docs = data.rec_docs("train")
    pool = [d for d in docs if d["question_id"] not in skip]
    picked = random.Random(seed).sample(pool, n)
    return [(data.render_doc(d), data.rec_text(d["answer"]), d) for d in picked]


def _centre_in(box, gt):
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return gt[0] <= cx <= gt[2] and gt[1] <= cy <= gt[3]


def test_discovery_is_deterministic_and_its_heads_localise():
    model, processor = load(checkpoint_path())
    hooks.install(model)
    calib = _train_samples(40, seed=0)
    first = L.discover_heads(model, processor, [(im, t) for im, t, _ in calib])
    again = L.discover_heads(model, processor, [(im, t) for im, t, _ in calib])
    assert first.ranked() == again.ranked()
    top = [(r["layer"], r["head"]) for r in first.ranked()]
    held_out = _train_samples(60, seed=1, skip={d["question_id"] for *_, d in calib})
    hits = {"top3": 0, "all": 0}
    techniques = {"top3": L.LocHead(top, top_k=3), "all": L.LocHead("all")}
    for image, text, doc in held_out:
        inputs = L.prompt_inputs(processor, image, text)
        req = Request(inputs["input_ids"], model.config.image_token_id, inputs["input_ids"].shape[1], [image], text, processor)
        for name, tech in techniques.items():
            hits[name] += _centre_in(tech.locate(model, req, **inputs).box, doc["bbox"])
    # the paper's central claim, on held-out train documents: a few selected heads beat averaging all heads
    assert hits["top3"] > hits["all"], hits
