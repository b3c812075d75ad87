"""Localization heads on the shipped ShapeWorld checkpoint, train split only (the test split is for measuring)."""

import random

import pytest
from conftest import load

from lmms_eval_plugins.shapeworld import checkpoint_path
from methods import hooks
from methods import lochead as L
from methods import lochead_heads as LH
from methods.technique import Request

pytestmark = pytest.mark.skipif(
    not (checkpoint_path() / "config.json").exists(), reason="shapeworld-tiny checkpoint not built yet"
)


def _train_samples(n, seed, skip=()):
    from lmms_eval_plugins.shapeworld import data

    docs = data.rec_docs("train")
    pool = [d for d in docs if d["question_id"] not in skip]
    picked = random.Random(seed).sample(pool, n)
    return [(data.render_doc(d), data.rec_text(d["answer"]), d) for d in picked]


def _centre_in(box, gt):
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return gt[0] <= cx <= gt[2] and gt[1] <= cy <= gt[3]


@pytest.fixture(scope="module")
def shapeworld():
    model, processor = load(checkpoint_path())
    hooks.install(model)
    calib = _train_samples(40, seed=0)
    result = LH.discover_heads(model, processor, [(im, t) for im, t, _ in calib])
    return model, processor, calib, result


def test_discovery_is_deterministic(shapeworld):
    model, processor, calib, result = shapeworld
    again = LH.discover_heads(model, processor, [(im, t) for im, t, _ in calib])
    assert again.ranked() == result.ranked()
    assert result.n_samples == 40 and result.ranked()[0]["frequency"] > 0.5


@pytest.mark.xfail(
    strict=True,
    reason="measured: on shapeworld-tiny the S_img-knee + spatial-entropy criteria rank heads with compact but off-target maps first "
    "(L1H1: one spot, rarely on the referred object; L1H2: the top row), which localise worse than averaging all heads; "
    "the best localiser (L1H3) ranks 6th. See docs/lochead.md. Strict: a checkpoint where the claim holds makes this fail.",
)
def test_selected_heads_beat_all_head_averaging_on_held_out_train_docs(shapeworld):
    model, processor, calib, result = shapeworld
    top = [(r["layer"], r["head"]) for r in result.ranked()]
    held_out = _train_samples(60, seed=1, skip={d["question_id"] for *_, d in calib})
    hits = {"top3": 0, "all": 0}
    techniques = {"top3": L.LocHead(top, top_k=3), "all": L.LocHead("all")}
    for image, text, doc in held_out:
        inputs = LH.prompt_inputs(processor, image, text)
        req = Request(
            inputs["input_ids"], model.config.image_token_id, inputs["input_ids"].shape[1], [image], text, processor
        )
        for name, tech in techniques.items():
            hits[name] += _centre_in(tech.locate(model, req, **inputs).box, doc["bbox"])
    # the paper's central claim, on train documents not used for discovery
    assert hits["top3"] > hits["all"], hits
