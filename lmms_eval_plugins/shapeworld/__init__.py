"""ShapeWorld: the project's testbed (scenes with exact ground truth, lmms-eval tasks in
task_configs/shapeworld, and a tiny LLaVA checkpoint shipped with the package)."""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_NAME = "shapeworld-tiny"
QWEN_CHECKPOINT_NAME = "shapeworld-tiny-qwen"  # the same testbed in the Qwen2.5-VL architecture (train_qwen.py)
LLAVA15_CHECKPOINT_NAME = (
    "shapeworld-llava"  # LLaVA-1.5's own geometry: 336 px, 24x24 grid, 8 LM layers (train.py --arch llava-1.5)
)


def checkpoint_path() -> Path:
    """Directory of the shipped tiny LLaVA (loads with from_pretrained like any HF checkpoint)."""
    from ..paths import CHECKPOINTS

    return CHECKPOINTS[CHECKPOINT_NAME]


def resolve_pretrained(name):
    """Map a shipped ShapeWorld checkpoint's name to its path; any other name unchanged."""
    from ..paths import CHECKPOINTS

    if isinstance(name, str) and name.strip() in (CHECKPOINT_NAME, QWEN_CHECKPOINT_NAME, LLAVA15_CHECKPOINT_NAME):
        return str(CHECKPOINTS[name.strip()])
    return name
