"""`lmms-plugins viral-teacher`: train the ShapeWorld teacher for VIRAL (see lmms_eval_plugins/viral_teacher.py).

    lmms-plugins viral-teacher --output-dir lmms_eval_plugins/checkpoints/shapeworld-teacher
reproduces the shipped teacher (same seed and settings); then
    lmms-plugins viral-train ... --teacher shapeworld-teacher
"""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "viral-teacher",
        help="train the ShapeWorld teacher (dense per-patch labels) for VIRAL",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output-dir", required=True)
    p.add_argument("--scenes", type=int, default=2000, help="ShapeWorld train scenes")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--hidden", type=int, default=96)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..viral_teacher import train_teacher

    keys = ("scenes", "steps", "batch_size", "lr", "image_size", "patch", "hidden", "layers", "heads", "seed")
    train_teacher(args.output_dir, **{k: getattr(args, k) for k in keys})
    return 0
