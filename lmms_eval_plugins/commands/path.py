"""`lmms-plugins path NAME`: print a directory the installed package ships, for any loader.

    lmms-eval --model llava_hf --model_args pretrained=$(lmms-plugins path shapeworld-tiny),device_map=cpu \\
              --include_path $(lmms-plugins path tasks) --tasks shapeworld_pope_adversarial ...
"""

from __future__ import annotations

from ..paths import CHECKPOINTS, checkpoint_dir, tasks_dir

NAMES = ("tasks", *CHECKPOINTS)


def main(args) -> int:
    # only the asked-for path is resolved: one missing checkpoint does not break the others
    print(tasks_dir() if args.name == "tasks" else checkpoint_dir(args.name))
    return 0


def register(sub) -> None:
    p = sub.add_parser("path", help="print the task directory (for --include_path) or a shipped checkpoint's directory")
    p.add_argument("name", choices=NAMES, help="tasks: the lmms-eval task configs; otherwise a shipped checkpoint")
    p.set_defaults(func=main)
