"""ShapeWorld generator: determinism and exact ground truth."""

import numpy as np
import pytest

from lmms_eval_plugins.shapeworld import metrics
from lmms_eval_plugins.shapeworld.scenes import (
    BACKGROUND,
    PARTNER,
    SHAPES,
    TEST_WORLD,
    TRAIN_WORLD,
    caption,
    derive_seed,
    sample_scene,
    unique_expressions,
)

SEEDS = [derive_seed("pytest", i) for i in range(40)]


def test_same_seed_same_bytes():
    for seed in SEEDS[:5]:
        a = sample_scene(seed).render().tobytes()
        b = sample_scene(seed).render().tobytes()
        assert a == b
    assert sample_scene(SEEDS[0]).render().tobytes() != sample_scene(SEEDS[1]).render().tobytes()


def test_derive_seed_is_stable():
    # independent of PYTHONHASHSEED and of the process: a fixed value
    assert derive_seed("test", "pope", 0) == derive_seed("test", "pope", 0)
    assert derive_seed("test", "pope", 0) != derive_seed("train", "pope", 0)


@pytest.mark.parametrize("seed", SEEDS[:20])
def test_boxes_are_the_drawn_pixels(seed):
    scene = sample_scene(seed)
    img, labels = scene.render(with_labels=True)
    lab = np.asarray(labels)
    rgb = np.asarray(img).astype(int)
    for k, obj in enumerate(scene.objects):
        ys, xs = np.nonzero(lab == k + 1)
        assert len(xs) > 0
        # tight box, x1/y1 exclusive
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == tuple(obj.box)
        # the object's pixels carry its colour, nothing is drawn outside the boxes
        assert np.abs(rgb[ys, xs] - np.array(data_colour(obj.colour))).max() == 0
    outside = lab == 0
    assert np.abs(rgb[outside].mean(0) - np.array(BACKGROUND)).max() < 2.0


def data_colour(name):
    from lmms_eval_plugins.shapeworld.scenes import COLOURS

    return COLOURS[name]


@pytest.mark.parametrize("seed", SEEDS[:20])
def test_relations_match_geometry(seed):
    scene = sample_scene(seed)
    _, labels = scene.render(with_labels=True)
    lab = np.asarray(labels)
    rels = set(scene.relations())
    for i in range(len(scene.objects)):
        yi, xi = np.nonzero(lab == i + 1)
        for j in range(len(scene.objects)):
            if i == j:
                continue
            yj, xj = np.nonzero(lab == j + 1)
            assert ((i, "left", j) in rels) == (xi.max() < xj.min())
            assert ((i, "right", j) in rels) == (xi.min() > xj.max())
            assert ((i, "above", j) in rels) == (yi.max() < yj.min())
            assert ((i, "below", j) in rels) == (yi.min() > yj.max())


def test_objects_do_not_overlap_and_sizes_are_classed():
    for seed in SEEDS:
        scene = sample_scene(seed)
        for a in range(len(scene.objects)):
            oa = scene.objects[a]
            side = max(oa.box[2] - oa.box[0], oa.box[3] - oa.box[1])
            lo, hi = TRAIN_WORLD.small_size if oa.size == "small" else TRAIN_WORLD.large_size
            assert 0.8 * lo - 2 <= side <= hi  # squares are drawn with a small inset
            for b in range(a + 1, len(scene.objects)):
                ob = scene.objects[b]
                assert (
                    oa.box[2] <= ob.box[0] or ob.box[2] <= oa.box[0] or oa.box[3] <= ob.box[1] or ob.box[3] <= oa.box[1]
                )


@pytest.mark.parametrize("world", [TRAIN_WORLD, TEST_WORLD])
def test_cooccurrence_rate_is_the_configured_one(world):
    with_a = with_both = 0
    for i in range(3000):
        present = set(sample_scene(derive_seed("cooc", i), world).shapes_present())
        for a in present:
            with_a += 1
            with_both += PARTNER[a] in present
    rate = with_both / with_a
    # binomial standard error at ~4000 draws is < 0.01
    assert abs(rate - world.cooccurrence) < 0.03, rate


def test_train_captions_carry_the_prior():
    """In training captions, a shape is mentioned with its partner at the configured rate."""
    with_a = with_both = 0
    for i in range(1500):
        mentioned = set(metrics.caption_objects(caption(sample_scene(derive_seed("cap", i), TRAIN_WORLD))))
        for a in mentioned:
            with_a += 1
            with_both += PARTNER[a] in mentioned
    assert abs(with_both / with_a - TRAIN_WORLD.cooccurrence) < 0.03


def test_caption_mentions_exactly_the_objects():
    for seed in SEEDS:
        scene = sample_scene(seed)
        mentioned = metrics.caption_objects(caption(scene))
        assert set(mentioned) == set(scene.shapes_present())


def test_referring_expressions_are_unique():
    for seed in SEEDS:
        scene = sample_scene(seed)
        for k in range(len(scene.objects)):
            for expr in unique_expressions(scene, k):
                words = expr.split()[1:]
                matches = [o for o in scene.objects if all(w in (o.size, o.colour, o.shape) for w in words)]
                assert matches == [scene.objects[k]]


def test_small_objects_are_small_at_the_model_resolution():
    # the planted difficulty: a small object spans at most ~6 px of the 64 px model input
    assert TRAIN_WORLD.small_size[1] * 64 / TRAIN_WORLD.canvas <= 6.5
    assert TRAIN_WORLD.large_size[0] * 64 / TRAIN_WORLD.canvas >= 14


def test_shapes_vocabulary():
    assert set(PARTNER) == set(SHAPES)
    assert all(PARTNER[PARTNER[s]] == s for s in SHAPES)
