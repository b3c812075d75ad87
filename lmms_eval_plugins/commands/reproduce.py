"""`lmms-plugins reproduce PAPER`: run a paper's evaluation (its recipe) and print paper vs ours vs baseline.

    lmms-plugins reproduce                                   # the recipes and their rows
    lmms-plugins reproduce pm --dry-run                      # the exact lmms-eval commands, nothing run
    lmms-plugins reproduce pm --output results/pm            # run, resume, print and write the table
    lmms-plugins reproduce pai_paint --testbed --limit 20    # the ShapeWorld twins, on a CPU

Each run of the recipe (lmms_eval_plugins/recipes/PAPER.yaml) is one lmms-eval process over all the
tasks its selected rows need, so the model loads once. A task whose results already sit in
``--output/RUN`` with the same model_args and limit is not run again: a crashed run resumes where it
stopped. The table gives, per row, the paper's value, ours, the baseline (a run, or the published
number when the recipe has no baseline run or ``--published-baseline``), the delta with its paired
95% interval (from the per-sample logs, as ``compare``) and whether ours is within the paper's
reported precision (not judged on the testbed, whose tasks only stand for the paper's).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from ..paths import tasks_dir
from ..recipes import PLACEHOLDER, STOCK_MODELS, Recipe, RecipeError, Row, RunSpec, load, papers, published_value
from ..stats import CONFIDENCE, excludes_zero
from .compare import Run, delta, first_error, metric_rows


@dataclasses.dataclass
class Job:
    """One lmms-eval process: a recipe run over the tasks still missing from its output directory."""

    run: RunSpec
    tasks: list[str]  # every task the selected rows need from this run
    model_args: str
    output: Path
    done: list[str] = dataclasses.field(default_factory=list)  # tasks whose results already exist
    missing_inputs: list[str] = dataclasses.field(default_factory=list)

    @property
    def todo(self) -> list[str]:
        return [t for t in self.tasks if t not in self.done]

    def argv(self, limit: int | None) -> list[str]:
        """lmms-eval's arguments (after ``lmms-eval`` / ``python -m lmms_eval``)."""
        argv = ["--model", self.run.model, "--model_args", self.model_args, "--tasks", ",".join(self.todo)]
        argv += ["--batch_size", "1", "--output_path", str(self.output), "--log_samples"]
        argv += ["--include_path", str(tasks_dir())]
        if self.run.force_simple:
            argv.append("--force_simple")
        if limit:
            argv += ["--limit", str(limit)]
        return argv


def checkpoint(recipe: Recipe, testbed: bool, pretrained: str | None) -> str:
    from ..base import resolve_pretrained

    return resolve_pretrained(pretrained or (recipe.testbed if testbed else recipe.pretrained))


def runs_needed(recipe: Recipe, rows: tuple[Row, ...], testbed: bool, published_baseline: bool) -> dict[str, list[str]]:
    """run name -> the tasks the rows need from it, in row order."""
    needed: dict[str, list[str]] = {}
    for row in rows:
        if not row.runs or row.mean_of:
            continue
        names = [row.run] + ([row.baseline] if row.baseline and not published_baseline else [])
        for name in names:
            tasks = needed.setdefault(name, [])
            if row.task_on(testbed) not in tasks:
                tasks.append(row.task_on(testbed))
    return needed


def _results_files(output: Path) -> list[Path]:
    return sorted(Path(f) for f in glob.glob(str(output / "**" / "*_results.json"), recursive=True))


def finished(output: Path, model_args: str, limit: int | None) -> dict[str, Path]:
    """task -> the newest results file under ``output`` holding it, run with these model_args and limit."""
    found = {}
    for f in _results_files(output):
        results = json.loads(f.read_text())
        config = results.get("config", {})
        same_limit = (config.get("limit") or None) == (limit or None)
        if config.get("model_args") == model_args and same_limit:
            for task in results.get("results", {}):
                found[task] = f
    return found


def plan(recipe: Recipe, rows, *, output: Path, testbed=False, pretrained=None, device="cpu", limit=None,
         sets=None, published_baseline=False) -> list[Job]:  # fmt: skip
    ckpt = checkpoint(recipe, testbed, pretrained)
    sets = sets or {}
    jobs = []
    for name, tasks in runs_needed(recipe, rows, testbed, published_baseline).items():
        run = recipe.runs[name]
        args = run.args(testbed)
        missing = [p for p in PLACEHOLDER.findall(args) if p not in sets]
        args = PLACEHOLDER.sub(lambda m: str(sets.get(m.group(1), m.group(0))), args)
        device_args = f"device={device}" + (f",device_map={device}" if run.model in STOCK_MODELS else "")
        model_args = ",".join(a for a in (f"pretrained={ckpt}", device_args, args) if a)
        job = Job(run, tasks, model_args, output / name, missing_inputs=missing)
        job.done = [t for t in tasks if t in finished(job.output, model_args, limit)]
        jobs.append(job)
    return jobs


def execute(job: Job, limit: int | None) -> str:
    """Run the job's missing tasks through the lmms-eval CLI; its log goes to OUTPUT/RUN/lmms_eval.log.
    Returns "" or the first error of a run that left no results (the CLI exits 0 even then)."""
    job.output.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    log_path = job.output / "lmms_eval.log"
    with open(log_path, "a") as log:
        log.write(f"\n$ lmms-eval {shlex.join(job.argv(limit))}\n")
        log.flush()
        subprocess.run(
            [sys.executable, "-m", "lmms_eval", *job.argv(limit)], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    now = finished(job.output, job.model_args, limit)
    lost = [t for t in job.todo if t not in now]
    job.done = [t for t in job.tasks if t in now]
    if lost:
        return f"no results for {', '.join(lost)}: {first_error(log_path.read_text())} (log: {log_path})"
    return ""


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Cell:
    ours: float | None = None
    base: float | None = None
    base_label: str = ""  # "" for a run; the published cell's label otherwise
    interval: tuple[float, float] | None = None
    why: str = ""  # why there is no value
    no_interval: str = ""  # why a delta of two runs has no interval


def _value(run: Run | None, task: str, metrics: tuple[str, ...]) -> float | None:
    if run is None:
        return None
    rows = metric_rows(run.results)
    values = [rows.get((task, m)) for m in metrics]
    return None if None in values else sum(values)


def _load(job: Job | None, task: str, limit) -> Run | None:
    if job is None:
        return None
    f = finished(job.output, job.model_args, limit).get(task)
    return Run(json.loads(f.read_text()), f) if f else None


def measure(recipe: Recipe, rows, jobs: dict[str, Job], *, testbed, limit, pretrained_id, published_baseline) -> dict:
    cells: dict[str, Cell] = {}
    for row in rows:
        if row.not_run:
            cells[row.name] = Cell(why=f"not run: {row.not_run}")
            continue
        if row.mean_of:
            parts = [cells[n] for n in row.mean_of]
            ours = [c.ours for c in parts]
            base = [c.base for c in parts]
            cells[row.name] = Cell(
                ours=None if None in ours else sum(ours) / len(ours),
                base=None if None in base else sum(base) / len(base),
                base_label=parts[0].base_label,
                why="" if None not in ours else "a part has no result",
            )
            continue
        task, metrics = row.task_on(testbed), row.metric_on(testbed)
        run = _load(jobs.get(row.run), task, limit)
        cell = Cell(ours=_value(run, task, metrics))
        if cell.ours is not None:
            cell.ours *= row.scale
        elif row.run in jobs and jobs[row.run].missing_inputs:
            cell.why = "needs " + ", ".join(f"--set {p}=..." for p in jobs[row.run].missing_inputs)
        else:
            cell.why = "no result"
        if row.baseline and not published_baseline:
            base_run = _load(jobs.get(row.baseline), task, limit)
            cell.base = _value(base_run, task, metrics)
            if cell.base is not None:
                cell.base *= row.scale
            if run and base_run and len(metrics) == 1 and not row.relative:
                d = delta(base_run, run, task, metrics[0], str(tasks_dir()))
                cell.interval = d.interval and (d.interval[0] * row.scale, d.interval[1] * row.scale)
                cell.no_interval = d.why_no_interval
        elif not testbed:
            published = published_value(pretrained_id, task, metrics)
            if published is not None:
                cell.base = published.value
                cell.base_label = published.label()
        if row.relative and cell.ours is not None:
            if cell.base:
                cell.ours = 100 * cell.ours / cell.base
            else:
                cell.ours, cell.why = None, "no baseline result"
        cells[row.name] = cell
    return cells


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.4g}"


def table(recipe: Recipe, rows, cells, *, testbed: bool, ckpt: str) -> str:
    head = [
        "row",
        "task",
        "metric",
        "paper",
        "ours",
        "baseline",
        "delta",
        f"{CONFIDENCE:.0%} CI",
        "within paper's precision",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes: list[str] = []
    differs: dict[str, list[str]] = {}  # how the paper's evaluation differs -> the rows it concerns
    for row in rows:
        c = cells[row.name]
        task = row.task_on(testbed) or ", ".join(recipe.row(n).task_on(testbed) for n in row.mean_of)
        metric = " + ".join(row.metric_on(testbed)) or ("mean of " + ", ".join(row.mean_of) if row.mean_of else "")
        if row.relative:
            metric = f"{metric} (% of baseline)"
        paper = f"{row.paper.value:.{row.paper.decimals}f}" if row.paper else ("claim" if row.claim else "")
        base = _fmt(c.base) + (" (published)" if c.base_label and c.base is not None else "")
        d = c.ours - c.base if c.ours is not None and c.base is not None and not row.relative else None
        ci = "[{:+.4g}, {:+.4g}]".format(*c.interval) if c.interval else ""
        mark = "*" if c.interval and excludes_zero(*c.interval) else ""
        within = ""
        if row.paper and c.ours is not None:
            within = "- (testbed)" if testbed else ("yes" if row.paper.within(c.ours) else "no")
        ours = _fmt(c.ours) if c.ours is not None else c.why
        lines.append(
            "| "
            + " | ".join(
                [row.name, task, metric, paper, ours, base, "" if d is None else f"{d:+.4g}{mark}", ci, within]
            )
            + " |"
        )
        if c.no_interval:
            notes.append(f"- {row.name}: no interval: {c.no_interval}")
        if row.claim:
            notes.append(f"- {row.name}: the paper's claim: {row.claim}")
        if row.paper and row.paper.differs:
            differs.setdefault(row.paper.differs, []).append(row.name)
        if c.base_label and c.base is not None:
            notes.append(f"- {row.name}: baseline {c.base_label} (not re-run: no interval)")
    notes += [f"- {', '.join(names)}: the paper's evaluation differs: {text}" for text, names in differs.items()]
    where = f"the ShapeWorld twins on {ckpt}" if testbed else ckpt
    head_lines = [f"## {recipe.title}", "", f"{recipe.paper}: {where}. Source: {recipe.source}.", ""]
    foot = [
        "",
        f"ours and baseline in the paper's units; delta = ours - baseline, * where its paired {CONFIDENCE:.0%} "
        "interval (bootstrap over documents, as `lmms-plugins compare`) excludes 0.",
    ]
    if testbed:
        foot.append("Testbed: the paper's values are on the real benchmarks; no row is judged against them.")
    return "\n".join(head_lines + lines + foot + ([""] + notes if notes else []))


def _sets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: give NAME=VALUE")
        out[key] = value
    return out


def list_recipes() -> str:
    lines = []
    for name in papers():
        r = load(name)
        lines.append(f"{name}: {r.title}")
        lines.append(f"  pretrained {r.pretrained} (testbed {r.testbed}); rows: {', '.join(x.name for x in r.rows)}")
        for key, what in r.inputs.items():
            lines.append(f"  needs --set {key}=... : {what}")
    return "\n".join(lines)


def main(args) -> int:
    if not args.paper:
        print(list_recipes())
        return 0
    try:
        recipe = load(args.paper)
        rows = recipe.select(args.rows.split(",") if args.rows else None)
    except RecipeError as e:
        raise SystemExit(str(e)) from None
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    output = Path(
        args.output or os.path.join("results", "reproduce", args.paper + ("_testbed" if args.testbed else ""))
    )
    common = dict(testbed=args.testbed, limit=args.limit)
    jobs = plan(recipe, rows, output=output, pretrained=args.pretrained, device=device, sets=_sets(args.set),
                published_baseline=args.published_baseline, **common)  # fmt: skip
    for job in jobs:
        if job.missing_inputs:
            print(f"# {job.run.name}: skipped, needs " + ", ".join(f"--set {p}=..." for p in job.missing_inputs))
        elif not job.todo:
            print(f"# {job.run.name}: done ({', '.join(job.tasks)} in {job.output})")
        else:
            print(f"lmms-eval {shlex.join(job.argv(args.limit))}", flush=True)
    if args.dry_run:
        return 0
    from .env import check_or_exit

    check_or_exit()
    failed = []
    for job in jobs:
        if job.todo and not job.missing_inputs:
            error = execute(job, args.limit)
            if error:
                failed.append(f"{job.run.name}: {error}")
                print(f"# {job.run.name} failed: {error}", file=sys.stderr)
    ckpt = checkpoint(recipe, args.testbed, args.pretrained)
    pretrained_id = args.pretrained or recipe.pretrained
    cells = measure(recipe, rows, {j.run.name: j for j in jobs}, pretrained_id=pretrained_id,
                    published_baseline=args.published_baseline, **common)  # fmt: skip
    text = table(recipe, rows, cells, testbed=args.testbed, ckpt=ckpt)
    print(text)
    output.mkdir(parents=True, exist_ok=True)
    (output / "table.md").write_text(text + "\n")
    return 1 if failed else 0


def register(sub) -> None:
    p = sub.add_parser("reproduce", help="run a paper's evaluation (its recipe): paper vs ours vs baseline")
    p.add_argument("paper", nargs="?", help="a recipe (lmms_eval_plugins/recipes/*.yaml); none: list them")
    p.add_argument("--rows", default=None, help="comma-separated row names (default: every row)")
    p.add_argument("--output", default=None, help="where the runs and table.md go (default results/reproduce/PAPER)")
    p.add_argument("--limit", type=int, default=None, help="the first N documents of each task")
    p.add_argument("--dry-run", action="store_true", help="print the lmms-eval commands; run nothing")
    p.add_argument(
        "--testbed", action="store_true", help="the ShapeWorld twins (tasks, metrics, checkpoint): a CPU run"
    )
    p.add_argument("--pretrained", default=None, help="another checkpoint than the recipe's (or its testbed's)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--set", action="append", metavar="NAME=VALUE", help="a recipe input, e.g. --set adapter=DIR")
    p.add_argument(
        "--published-baseline",
        action="store_true",
        help="compare with the published numbers (recipes/published_baselines.yaml) instead of running the baseline",
    )
    p.set_defaults(func=main)
