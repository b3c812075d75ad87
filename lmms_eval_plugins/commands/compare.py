"""`lmms-plugins compare`: technique vs baseline, per task and metric, from lmms-eval result files.

    lmms-plugins compare results/llava_hf results/llava_pai          # first = baseline
    lmms-plugins compare --run llava_pai --model_args alpha=0.5 --tasks shapeworld_pope_adversarial

With --run, both models go through the real lmms-eval CLI on the same checkpoint
(default: the bundled shapeworld-tiny), one after the other, then the table is printed.
"""

from __future__ import annotations

import glob
import json
import os
import re
from pathlib import Path

from ..paper_figures import paper_figure
from ..paths import tasks_dir
from .env import check_or_exit


def latest_results(path) -> dict:
    """A results dict from a *_results.json file or the newest one under a directory."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(Path(f) for f in glob.glob(str(p / "**" / "*_results.json"), recursive=True))
    if not files:
        raise SystemExit(f"no lmms-eval *_results.json under {path}: did the run fail? (the CLI exits 0 even then)")
    return json.loads(files[-1].read_text())


def metric_rows(results: dict) -> dict[tuple[str, str], float]:
    rows = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if key == "alias" or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            rows[(task, key.split(",")[0])] = float(value)
    return rows


def model_label(results: dict) -> str:
    cfg = results.get("config", {})
    args = cfg.get("model_args", "")
    extra = ",".join(a for a in args.split(",") if a and not a.startswith(("pretrained=", "device")))
    return cfg.get("model", "?") + (f"({extra})" if extra else "")


def table(runs: list[dict]) -> str:
    """Markdown table: baseline (first run) and each other run with its delta."""
    base = runs[0]
    base_rows = metric_rows(base)
    head = ["task", "metric", "n", model_label(base)]
    for r in runs[1:]:
        head += [model_label(r), "delta"]
    head.append("paper (real benchmark)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (task, metric), b in sorted(base_rows.items()):
        n = base.get("n-samples", {}).get(task, {}).get("effective", "")
        cells = [task, metric, str(n), f"{b:.4g}"]
        for r in runs[1:]:
            v = metric_rows(r).get((task, metric))
            cells += ["-", "-"] if v is None else [f"{v:.4g}", f"{v - b:+.4f}"]
        cells.append(paper_figure(model_label(runs[-1]).split("(")[0], task, metric) or "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def first_error(log: str) -> str:
    """The first error an lmms-eval log reports (the CLI exits 0 even then), colour codes removed:
    a logged ERROR line, else the first exception line of a traceback."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in log.splitlines()]
    for pattern in (r"\|\s*ERROR\s*\|", r"^[\w.]+(Error|Exception)\b.*:"):
        hit = next((line for line in lines if re.search(pattern, line)), None)
        if hit:
            return hit
    return "(no error line in the log)"


def run_pair(model, model_args, tasks, pretrained, output, limit=None, include_path=None, device=None):
    from ..base import resolve_pretrained
    from ..testing import run_lmms_eval

    import torch

    check_or_exit()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = resolve_pretrained(pretrained)
    include_path = include_path or str(tasks_dir())
    extra = ["--limit", str(limit)] if limit else []
    runs = []
    for name, args in (("llava_hf", f"device_map={device}"), (model, model_args)):
        out = Path(output) / name
        full_args = ",".join(a for a in (f"pretrained={ckpt}", f"device={device}", args) if a)
        print(f"running {name} ({full_args}) on {tasks} ...", flush=True)
        results, log = run_lmms_eval(name, full_args, tasks, out, include_path=include_path, extra=extra, timeout=None)
        if results is None:
            raise SystemExit(
                f"lmms-eval run of {name} produced no results; its first error:\n  {first_error(log)}\n"
                f"(the run's last lines:)\n{log[-3000:]}"
            )
        runs.append(results)
    return runs


def main(args) -> int:
    if args.run:
        runs = run_pair(args.run, args.model_args, args.tasks, args.pretrained, args.output, args.limit, args.include_path)
    else:
        if len(args.paths) < 2:
            raise SystemExit("give a baseline and at least one other result path, or --run MODEL")
        runs = [latest_results(p) for p in args.paths]
    text = table(runs)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


def register(sub) -> None:
    p = sub.add_parser("compare", help="technique vs llava_hf table from lmms-eval results (or run both)")
    p.add_argument("paths", nargs="*", help="result files or output directories; the first is the baseline")
    p.add_argument("--run", metavar="MODEL", help="run llava_hf and MODEL through the lmms-eval CLI first")
    p.add_argument("--model_args", default="", help="extra model_args for MODEL (besides pretrained/device)")
    p.add_argument("--tasks", default="shapeworld_pope_adversarial")
    p.add_argument("--pretrained", default="shapeworld-tiny")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--include_path", default=None, help="task directory (default: the package's task_configs)")
    p.add_argument("--output", default=os.path.join("results", "compare"))
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    p.set_defaults(func=main)
