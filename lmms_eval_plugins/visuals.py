"""Where saved visuals go: ``save_visuals=DIR``, or ``save_visuals=auto`` for under lmms-eval's --output_path.

lmms-eval does not hand its output path to the model, so ``auto`` reads it from the command
line of the running ``lmms-eval``/``python -m lmms_eval`` process (``./visuals`` without one).
Each process of a multi-process run writes its own file names (prefix ``rank{N}_``).
"""

from __future__ import annotations

import sys
from pathlib import Path

AUTO = ("auto", "true", "1", "yes")


def output_path_from_argv(argv=None) -> str | None:
    argv = list(sys.argv if argv is None else argv)
    for i, arg in enumerate(argv):
        if arg == "--output_path" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--output_path="):
            return arg.split("=", 1)[1]
    return None


def visuals_dir(save_visuals: str, model_name: str, argv=None) -> Path | None:
    """None when visuals are off; otherwise the directory to write them to."""
    value = (save_visuals or "").strip()
    if not value or value.lower() in ("none", "false", "0", "no"):
        return None
    if value.lower() in AUTO:
        return Path(output_path_from_argv(argv) or ".") / "visuals" / model_name
    return Path(value)


def rank_prefix() -> str:
    """``rank{N}_`` under a multi-process launch, else empty."""
    try:
        from accelerate import PartialState

        state = PartialState()
        return f"rank{state.process_index}_" if state.num_processes > 1 else ""
    except Exception:  # accelerate not initialised in this process: single process
        return ""
