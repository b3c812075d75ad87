"""Where the installed package keeps what lmms-eval needs: the task configs and the shipped checkpoints.

The same lookups work from a wheel (``pip install .``: the repository's ``task_configs/`` is
installed as ``lmms_eval_plugins/task_configs``) and from a source checkout (editable install:
the package directory sits next to ``task_configs/``). ``lmms-plugins path NAME`` prints them
for any other loader, stock ``llava_hf`` and ``--include_path`` included.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def tasks_dir() -> Path:
    """The directory to pass to lmms-eval's ``--include_path`` (holds ``shapeworld/``)."""
    for candidate in (PACKAGE_DIR / "task_configs", PACKAGE_DIR.parent / "task_configs"):
        if (candidate / "shapeworld").is_dir():
            return candidate
    raise FileNotFoundError(
        f"no task_configs/ found in {PACKAGE_DIR} or next to it: the package was installed without its "
        "package data; reinstall with `pip install lmms-eval-plugins` (or `pip install .` from a checkout)"
    )


# Every checkpoint the package ships, by the name the wrappers accept (``pretrained=shapeworld-tiny``,
# ``--teacher shapeworld-teacher``). Weights the project trained itself; the scripts that made them
# are in lmms_eval_plugins/shapeworld/train.py (``--arch llava-1.5``: shapeworld-llava; ``--arch qwen2_5_vl``: train_qwen.py) and
# lmms_eval_plugins/viral_teacher.py.
CHECKPOINTS = {
    "shapeworld-tiny": PACKAGE_DIR / "shapeworld" / "checkpoints" / "shapeworld-tiny",
    "shapeworld-tiny-qwen": PACKAGE_DIR / "shapeworld" / "checkpoints" / "shapeworld-tiny-qwen",
    "shapeworld-llava": PACKAGE_DIR / "shapeworld" / "checkpoints" / "shapeworld-llava",
    "shapeworld-teacher": PACKAGE_DIR / "checkpoints" / "shapeworld-teacher",
}


def checkpoint_dir(name: str) -> Path:
    """A shipped checkpoint's directory; a clear error when the package data is missing."""
    path = CHECKPOINTS[name]
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the shipped checkpoint {name!r} is missing from {path}: reinstall the package")
    return path


def named_paths() -> dict[str, Path]:
    """``tasks`` and every shipped checkpoint: what ``lmms-plugins path`` knows."""
    return {"tasks": tasks_dir(), **{name: checkpoint_dir(name) for name in CHECKPOINTS}}
