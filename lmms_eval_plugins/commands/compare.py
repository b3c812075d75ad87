"""`lmms-plugins compare`: technique vs baseline, per task and metric, from lmms-eval result files.

    lmms-plugins compare results/llava_hf results/llava_pai          # first = baseline
    lmms-plugins compare --run llava_pai --model_args alpha=0.5 --tasks shapeworld_pope_adversarial
    lmms-plugins compare --baseline published:llava-1.5-7b results/llava_pm       # published, not re-run

With --run, both models go through the real lmms-eval CLI on the same checkpoint
(default: the bundled shapeworld-tiny), one after the other, then the table is printed. The baseline
is stock llava_hf, or, when MODEL's model_args (or preset) preprocess images otherwise than the class
does (pad_to_square, image_backend), MODEL itself with baseline=true and that preprocessing
(``baseline_run``): the technique is then the one difference between the two runs.
Each delta gets a paired 95% interval from the runs' per-sample logs (lmms-eval --log_samples;
--run always writes them), accuracies also an exact McNemar p-value: docs/compare.md.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
import re
from pathlib import Path

from ..paper_figures import paper_figure
from ..paths import tasks_dir
from ..stats import (
    CONFIDENCE,
    N_RESAMPLES,
    SEED,
    excludes_zero,
    mcnemar_p,
    paired_interval,
)
from .env import check_or_exit

NO_LOG = "no per-sample log (run lmms-eval with --log_samples)"


@dataclasses.dataclass
class Run:
    """One lmms-eval run: its results dict and the results file its per-sample logs sit beside
    (None when only the dict is known)."""

    results: dict
    file: Path | None = None
    _samples: dict = dataclasses.field(default_factory=dict, repr=False)

    def samples_file(self, task: str) -> Path | None:
        # lmms-eval names both after one date id: <date>_results.json, <date>_samples_<task>.jsonl
        return self.file and self.file.with_name(self.file.name.removesuffix("results.json") + f"samples_{task}.jsonl")

    def samples(self, task: str) -> dict[int, dict] | None:
        """The task's per-sample log (``--log_samples``) by doc_id, or None when there is none."""
        if task not in self._samples:
            path = self.samples_file(task)
            found = path is not None and path.is_file()
            self._samples[task] = (
                {r["doc_id"]: r for r in map(json.loads, path.read_text().splitlines())} if found else None
            )
        return self._samples[task]


def results_file(path) -> Path:
    """A *_results.json file, or the newest one under a directory."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(Path(f) for f in glob.glob(str(p / "**" / "*_results.json"), recursive=True))
    if not files:
        raise SystemExit(f"no lmms-eval *_results.json under {path}: did the run fail? (the CLI exits 0 even then)")
    return files[-1]


def load_run(path) -> Run:
    f = results_file(path)
    return Run(json.loads(f.read_text()), f)


def latest_results(path) -> dict:
    """A results dict from a *_results.json file or the newest one under a directory."""
    return load_run(path).results


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
    extra = [a for a in args.split(",") if a and not a.startswith(("pretrained=", "device"))]
    if "baseline=true" in (a.lower() for a in extra):  # compare --run's baseline: the wrapper without its technique
        rest = "; ".join(a for a in extra if a.lower() != "baseline=true")
        return f"{cfg.get('model', '?')} baseline (no technique{'; ' + rest if rest else ''})"
    return cfg.get("model", "?") + (f"({','.join(extra)})" if extra else "")


@functools.cache
def _task_index(include_path: str | None, defaults: bool) -> dict:
    from lmms_eval.tasks import TaskManager

    return TaskManager(verbosity="ERROR", include_path=include_path, include_defaults=defaults).task_index


def task_aggregation(task: str, metric: str, include_path: str | None = None):
    """The task's own aggregation of ``metric`` (a function of its per-document records), loaded
    from the task's YAML as lmms-eval loads it, or None when the task or metric is not found."""
    from lmms_eval.api.registry import get_aggregation, get_metric_aggregation
    from lmms_eval.utils import load_yaml_config

    # the plugin's (or the given) task directory first: indexing lmms-eval's ~2000 tasks takes seconds
    for defaults in (False, True):
        entry = _task_index(include_path, defaults).get(task)
        if entry and entry.get("type") == "task":
            break
    else:
        return None
    for m in load_yaml_config(entry["yaml_path"], mode="full").get("metric_list", []):
        if m["metric"] == metric:
            agg = m.get("aggregation") or get_metric_aggregation(metric)
            return get_aggregation(agg) if isinstance(agg, str) else agg
    return None


@dataclasses.dataclass(frozen=True)
class Delta:
    value: float
    interval: tuple[float, float] | None = None  # paired bootstrap interval of the delta
    p: float | None = None  # exact McNemar p-value, for accuracies
    why_no_interval: str = ""


def paired_records(base: Run, other: Run, task: str, metric: str):
    """Both runs' per-document records of ``metric`` in the same doc_id order, or why there are none."""
    logs = [run.samples(task) for run in (base, other)]
    if any(log is None for log in logs):
        return NO_LOG
    b, o = logs
    if b.keys() != o.keys():
        return "the two per-sample logs hold different documents"
    ids = sorted(b)
    if any(metric not in b[i] or metric not in o[i] for i in ids):
        return f"the per-sample logs hold no per-document {metric}"
    return [b[i][metric] for i in ids], [o[i][metric] for i in ids]


def accuracy_outcomes(metric: str, aggregate, records: list, reported: float) -> list[bool] | None:
    """Each document's right/wrong when ``metric`` is an accuracy, i.e. the mean of per-document
    0/1 outcomes (checked, not assumed from the name alone), else None."""
    if "acc" not in metric.lower():
        return None
    try:
        outcomes = [float(aggregate([r])) for r in records]
    except Exception:  # noqa: BLE001 - one that needs more than one document is no mean of outcomes
        return None
    if not set(outcomes) <= {0.0, 1.0} or not math.isclose(
        sum(outcomes) / len(outcomes), reported, rel_tol=1e-9, abs_tol=1e-12
    ):
        return None
    return [o == 1.0 for o in outcomes]


def delta(base: Run, other: Run, task: str, metric: str, include_path: str | None = None) -> Delta:
    """``other`` minus ``base`` on (task, metric), with its interval from the per-sample logs: the
    task's aggregation recomputed on each resample of documents, so the interval is for this number."""
    b_value, o_value = (metric_rows(r.results)[(task, metric)] for r in (base, other))
    plain = functools.partial(Delta, o_value - b_value)
    paired = paired_records(base, other, task, metric)
    if isinstance(paired, str):
        return plain(why_no_interval=paired)
    if len(paired[0]) < 2:
        return plain(why_no_interval="fewer than 2 documents")
    aggregate = task_aggregation(task, metric, include_path)
    if aggregate is None:
        return plain(why_no_interval="its aggregation was not found (give the task directory with --include_path)")
    for records, reported in zip(paired, (b_value, o_value)):
        try:
            again = float(aggregate(records))
        except Exception as e:  # noqa: BLE001 - any task's code: report, do not crash the table
            return plain(why_no_interval=f"its aggregation fails on the logged records ({type(e).__name__}: {e})")
        if not math.isclose(again, reported, rel_tol=1e-9, abs_tol=1e-12):
            return plain(
                why_no_interval=f"its aggregation of the logged records gives {again:.6g}, the results file {reported:.6g}"
            )
    try:
        interval = paired_interval(lambda records: float(aggregate(records)), *paired)
    except Exception as e:  # noqa: BLE001 - e.g. MME's aggregation needs both questions of an image in a resample
        return plain(
            why_no_interval=f"its aggregation fails on a resample of documents ({type(e).__name__}: {e}): "
            "the metric needs groups of documents kept together"
        )
    outcomes = [
        accuracy_outcomes(metric, aggregate, records, reported) for records, reported in zip(paired, (b_value, o_value))
    ]
    p = mcnemar_p(*outcomes) if None not in outcomes else None
    return plain(interval=interval, p=p)


def table(runs: list, include_path: str | None = None) -> str:
    """Markdown table: baseline (first run) and each other run with its delta, the delta's paired
    95% interval and, for accuracies, the exact McNemar p-value; notes below say which deltas got
    no interval and why. ``runs``: Run objects or bare results dicts (these have no per-sample logs)."""
    runs = [r if isinstance(r, Run) else Run(r) for r in runs]
    include_path = str(include_path or tasks_dir())
    base = runs[0]
    base_rows = metric_rows(base.results)
    head = ["task", "metric", "n", model_label(base.results)]
    for r in runs[1:]:
        head += [model_label(r.results), "delta", "95% CI", "McNemar p"]
    head.append("paper (real benchmark)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    missing: dict[tuple[str, str, str], list[str]] = {}  # (run, task, why) -> metrics without an interval
    for (task, metric), b in sorted(base_rows.items()):
        n = base.results.get("n-samples", {}).get(task, {}).get("effective", "")
        cells = [task, metric, str(n), f"{b:.4g}"]
        for r in runs[1:]:
            v = metric_rows(r.results).get((task, metric))
            if v is None:
                cells += ["-"] * 4
                continue
            d = delta(base, r, task, metric, include_path)
            ci = "" if d.interval is None else "[{:+.4f}, {:+.4f}]".format(*d.interval)
            mark = "*" if d.interval and excludes_zero(*d.interval) else ""
            cells += [f"{v:.4g}", f"{d.value:+.4f}{mark}", ci, "" if d.p is None else f"{d.p:.3g}"]
            if d.why_no_interval:
                missing.setdefault((model_label(r.results), task, d.why_no_interval), []).append(metric)
        cells.append(paper_figure(model_label(runs[-1].results).split("(")[0], task, metric) or "")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        (
            f"Deltas marked * have a paired {CONFIDENCE:.0%} interval that excludes 0 (percentile bootstrap over "
            f"documents, {N_RESAMPLES} resamples, seed {SEED}, each resample re-aggregated by the task's own function). "
            "McNemar p: exact two-sided test on the documents the two runs score differently (accuracies only)."
        ),
    ]
    for (label, task, why), metrics in missing.items():
        lines.append(f"No interval for {label} on {task} ({', '.join(metrics)}): {why}.")
    return "\n".join(lines)


def published_table(model: str, run: Run) -> str:
    """``run`` beside the published numbers of a stock model (lmms_eval_plugins/recipes/published_baselines.yaml)
    on the same tasks and metrics: no interval (a published number has no per-sample log)."""
    from ..recipes import published, published_model

    key = published_model(model)
    models, cells = published()
    if key is None:
        raise SystemExit(f"no published baselines for {model!r}; models: {', '.join(models)}")
    ours = metric_rows(run.results)
    head = ["task", "metric", "n", f"{key} (published)", model_label(run.results), "delta", "source"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for cell in cells:
        values = [ours.get((cell.task, m)) for m in cell.metric]
        if cell.model != key or None in values:
            continue
        value = sum(values) * cell.scale
        n = run.results.get("n-samples", {}).get(cell.task, {}).get("effective", "")
        tier = f"[{cell.tier}{', check' if cell.check else ''}]"
        metric = " + ".join(cell.metric)
        lines.append(
            f"| {cell.task} | {metric} | {n} | {cell.value:g} | {value:.4g} | {value - cell.value:+.4g} | {tier} {cell.source} |"
        )
        if cell.setting:
            notes.append(f"- {cell.task} {metric}: published setting: {cell.setting}")
    if len(lines) == 2:
        raise SystemExit(
            f"no published number for {key} on the run's tasks and metrics ({', '.join(sorted({t for t, _ in ours}))})"
        )
    lines += [
        "",
        "Published, not re-run: no interval, and the published setting may differ from the run's (notes below). "
        "Values in the published unit (lmms-eval's value x the cell's scale). [P]: the model's own authors; "
        "[S]: another paper's baseline row, second-hand; check: value, metric or checkpoint uncertain.",
        *notes,
    ]
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


def baseline_run(model: str, model_args: str, device: str) -> tuple[str, str]:
    """The baseline's (model name, model_args) for ``compare --run model --model_args model_args``: the family's stock
    lmms-eval class (llava_hf, qwen2_5_vl, ...), unless ``model_args`` (directly or through its preset) preprocess
    images otherwise than the class does, or give it an argument it lacks (dtype on a bf16-only class); then
    ``model`` itself with ``baseline=true`` (no technique) and the resolved preprocessing, so that both runs see the
    same pixels. The family's own arguments in ``model_args`` (dtype, ...) go to the baseline too."""
    from ..base import COMMON_PARAMS
    from ..models import MODELS, arg_pairs, on_same_pixels, plugin_class, preprocessing
    from methods.params import parse_params

    lm = plugin_class(model)
    if lm is None:
        raise SystemExit(f"--run {model}: not a model of this package; models: {', '.join(MODELS)}")
    given = arg_pairs(model_args)
    class_args = {*lm.family_args, "dtype"}  # the class's arguments (dtype: Bfloat16ClassMixin's)
    family = {k: v for k, v in given.items() if k in class_args and k != "device"}  # run_pair passes device
    technique = {k: v for k, v in given.items() if k not in class_args and k != "pretrained"}
    parse_params((*lm.spec.params, *COMMON_PARAMS), technique, lm.spec.presets, owner=model)  # bad args fail here
    own = preprocessing(model, model_args)
    if not own and set(family) <= set(lm.family_args):  # the family's own class takes every argument given
        # (llava_hf's empty device_map default fails on transformers 5; the wrappers default it to the device)
        return lm.family, ",".join(f"{k}={v}" for k, v in {"device_map": device, **family}.items())
    base_model, base_args = on_same_pixels(lm.family, "", own, model)  # dtype on a bf16-only class: the wrapper
    return base_model, ",".join(a for a in [base_args, *(f"{k}={v}" for k, v in family.items())] if a)


def run_pair(model, model_args, tasks, pretrained, output, limit=None, include_path=None, device=None):
    import torch

    from ..base import resolve_pretrained
    from ..testing import run_lmms_eval

    check_or_exit()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = resolve_pretrained(pretrained)
    include_path = include_path or str(tasks_dir())
    extra = ["--limit", str(limit)] if limit else []
    runs = []
    base, base_args = baseline_run(model, model_args, device)
    for name, args, folder in (
        (base, base_args, "baseline" if base == model else base),
        (model, model_args, model),
    ):
        out = Path(output) / folder
        full_args = ",".join(a for a in (f"pretrained={ckpt}", f"device={device}", args) if a)
        print(f"running {name} ({full_args}) on {tasks} ...", flush=True)
        # run_lmms_eval passes --log_samples: the per-sample logs give the deltas their intervals
        results, log = run_lmms_eval(name, full_args, tasks, out, include_path=include_path, extra=extra, timeout=None)
        if results is None:
            raise SystemExit(
                f"lmms-eval run of {name} produced no results; its first error:\n  {first_error(log)}\n"
                f"(the run's last lines:)\n{log[-3000:]}"
            )
        runs.append(Run(results, results_file(out)))
    return runs


def main(args) -> int:
    if args.run:
        runs = run_pair(
            args.run, args.model_args, args.tasks, args.pretrained, args.output, args.limit, args.include_path
        )
    elif args.baseline:
        if not args.baseline.startswith("published:") or len(args.paths) != 1:
            raise SystemExit("--baseline published:MODEL takes one result path (e.g. llava-1.5-7b or a checkpoint id)")
        text = published_table(args.baseline.removeprefix("published:"), load_run(args.paths[0]))
        print(text)
        if args.markdown:
            Path(args.markdown).write_text(text + "\n")
        return 0
    else:
        if len(args.paths) < 2:
            raise SystemExit("give a baseline and at least one other result path, or --run MODEL")
        runs = [load_run(p) for p in args.paths]
    text = table(runs, args.include_path)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


def register(sub) -> None:
    p = sub.add_parser("compare", help="technique vs llava_hf table from lmms-eval results (or run both)")
    p.add_argument("paths", nargs="*", help="result files or output directories; the first is the baseline")
    p.add_argument(
        "--baseline",
        metavar="published:MODEL",
        help="the published numbers of a stock model (recipes/published_baselines.yaml) as the baseline of one result path",
    )
    p.add_argument("--run", metavar="MODEL", help="run llava_hf and MODEL through the lmms-eval CLI first")
    p.add_argument("--model_args", default="", help="extra model_args for MODEL (besides pretrained/device)")
    p.add_argument("--tasks", default="shapeworld_pope_adversarial")
    p.add_argument("--pretrained", default="shapeworld-tiny")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument(
        "--include_path",
        default=None,
        help="task directory (default: the package's task_configs); its aggregations re-score the per-sample logs",
    )
    p.add_argument("--output", default=os.path.join("results", "compare"))
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    p.set_defaults(func=main)
