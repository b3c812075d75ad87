"""The ShapeWorld teacher's dense labels, and the shipped teacher loading as a VIRAL backbone."""

import json

import numpy as np
import pytest
import torch

from lmms_eval_plugins import viral_teacher as vt
from lmms_eval_plugins.shapeworld import scenes as sw
from methods import viral_teachers


def test_patch_labels_follow_the_objects():
    scene = sw.scene_from_seed(5)
    grid = 16
    labels = vt.patch_labels(scene, grid)
    cell = scene.canvas // grid
    assert labels.shape == (3, grid, grid)
    assert ((labels[0] > 0) == (labels[1] > 0)).all() and ((labels[0] > 0) == (labels[2] > 0)).all()
    for r, c in zip(*np.nonzero(labels[0])):
        x0, y0 = c * cell, r * cell
        # some object of that shape, colour and size overlaps the cell
        assert any(
            o.shape == sw.SHAPES[labels[0, r, c] - 1]
            and o.colour == sw.COLOUR_NAMES[labels[1, r, c] - 1]
            and o.size == sw.SIZE_CLASSES[labels[2, r, c] - 1]
            and o.box[0] < x0 + cell
            and o.box[2] > x0
            and o.box[1] < y0 + cell
            and o.box[3] > y0
            for o in scene.objects
        )
    for obj in scene.objects:  # every object, small ones included, owns at least one cell
        assert (labels[0] == sw.SHAPES.index(obj.shape) + 1).any()
    with pytest.raises(ValueError, match="multiple"):
        vt.patch_labels(scene, 13)


@pytest.mark.skipif(not (vt.teacher_path() / "config.json").exists(), reason="teacher not trained yet")
def test_shipped_teacher_loads_as_a_backbone():
    teacher = viral_teachers.BackboneTeacher.from_pretrained(vt.resolve_teacher(vt.TEACHER_NAME))
    info = json.loads((vt.teacher_path() / "teacher_info.json").read_text())
    assert teacher.image_size == info["image_size"] and teacher.patch_size == info["patch"]
    image = sw.scene_from_seed(1, "test").render()
    feats, grid = teacher.features_from_images([image])
    assert grid == (info["image_size"] // info["patch"],) * 2 and feats.shape == (1, grid[0] * grid[1], info["hidden"])
    assert torch.isfinite(feats).all()
    acc = info["held_out_accuracy"]  # it learnt this world, it is not random: far above chance on object patches
    assert acc["shape_object_patches"] > 2 / len(sw.SHAPES) and acc["colour_object_patches"] > 0.9
