"""`lmms-plugins knockout-sweep`: a task's metric under attention knockout, per layer window and query set.

The model is loaded once (lmms-eval's Python API, the same class the CLI uses: the checkpoint family's
`<family>_knockout`, e.g. `llava_knockout`, `qwen2_5_vl_knockout`, `qwen3_vl_knockout`); for every (window, mode) its technique is swapped and the tasks are evaluated again.
The empty window (no edit: exactly `llava_hf`) is always evaluated first as the reference.
Writes sweep.csv, sweep.md, sweep.json and one PNG line plot per (task, metric) into --output_dir.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

MODES = ("generated", "query", "both", "all")
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]


def register(subparsers):
    p = subparsers.add_parser("knockout-sweep", help="metric vs knockout layer window, one line per query set")
    p.add_argument(
        "--model_args",
        required=True,
        help="<family>_knockout model_args (the checkpoint's family picks the class), e.g. pretrained=shapeworld-tiny",
    )
    p.add_argument("--tasks", required=True, help="comma-separated lmms-eval tasks")
    p.add_argument("--modes", default="generated,query,both", help=f"comma-separated query sets ({'|'.join(MODES)})")
    p.add_argument(
        "--windows",
        default="",
        help="comma-separated layer windows start:stop (stop exclusive), e.g. 0:2,2:4, "
        "or the official named windows after:L (layers > L) and not_4_to_20",
    )
    p.add_argument(
        "--window_size", type=int, default=0, help="instead of --windows: sliding windows of this many layers"
    )
    p.add_argument("--stride", type=int, default=1, help="stride of the sliding windows")
    p.add_argument("--outside", action="store_true", help="block every layer outside each window instead")
    p.add_argument("--metric", default="", help="metric to plot (default: every numeric metric of each task)")
    p.add_argument("--limit", type=float, default=None, help="documents per task (as lmms-eval's --limit)")
    p.add_argument("--include_path", default=None, help="extra task directory (e.g. task_configs)")
    p.add_argument("--force_simple", action="store_true", help="use the simple model class (loglikelihood tasks)")
    p.add_argument("--output_dir", required=True, help="where the table and plots go")
    p.set_defaults(func=main)


def parse_windows(spec: str, n_layers: int, window_size: int = 0, stride: int = 1) -> list[tuple[int, int] | str]:
    """'0:2,2:4' -> [(0, 2), (2, 4)]; the official named windows ('after:15', 'not_4_to_20') stay names;
    or sliding windows of window_size layers over the model's depth."""
    from methods.knockout import named_window

    if window_size:
        if not 1 <= window_size <= n_layers or stride < 1:
            raise ValueError(f"--window_size must be in 1..{n_layers} and --stride >= 1")
        return [(s, s + window_size) for s in range(0, n_layers - window_size + 1, stride)]
    windows = []
    for part in filter(None, (s.strip() for s in spec.split(","))):
        if part == "not_4_to_20" or part.startswith("after:"):
            named_window(part, n_layers)  # a clear error for a malformed name
            windows.append(part)
            continue
        try:
            a, b = (int(x) for x in part.split(":"))
        except ValueError:
            raise ValueError(f"window {part!r}: write start:stop, e.g. 0:2 (layers 0 and 1)") from None
        if not 0 <= a < b <= n_layers:
            raise ValueError(
                f"window {part!r} is outside the model's {n_layers} layers (0 <= start < stop <= {n_layers})"
            )
        windows.append((a, b))
    if not windows:
        raise ValueError("give --windows start:stop,... or --window_size N")
    return windows


def numeric_metrics(task_results: dict) -> dict[str, float]:
    """lmms-eval's per-task results without aliases, stderrs and non-numbers ('acc,none' -> 'acc')."""
    out = {}
    for key, value in task_results.items():
        name = key.split(",")[0]
        if name == "alias" or "_stderr" in name or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[name] = float(value)
    return out


def window_label(window) -> str:
    return window if isinstance(window, str) else f"{window[0]}:{window[1]}"


def _pretrained(model_args: str) -> str:
    return dict(kv.split("=", 1) for kv in model_args.split(",") if "=" in kv).get(
        "pretrained", "llava-hf/llava-1.5-7b-hf"
    )


def knockout_classes(pretrained: str):
    """The (simple, chat) classes of the checkpoint family's ``<name_prefix>_knockout`` name (its adapter says
    which); a family whose lmms-eval class has no chat variant gives its simple class twice."""
    import importlib

    from methods import families

    from ..base import read_config, resolve_pretrained
    from ..models import MODELS, SIMPLE_ONLY

    prefix = families.adapter(read_config(resolve_pretrained(pretrained)), "knockout-sweep").name_prefix
    module, name, _ = MODELS[f"{prefix}_knockout"]
    found = importlib.import_module(f"lmms_eval_plugins.models.{module}")
    return getattr(found, name), getattr(found, name if module in SIMPLE_ONLY else name + "Chat")


def run_sweep(
    model_args, tasks, windows, modes, *, outside=False, limit=None, include_path=None, force_simple=False, log=print
):
    """Evaluate the empty window, then every (mode, window). Returns one row per (task, metric, mode, window)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from methods.hooks import num_layers
    from methods.knockout import Knockout

    simple, chat = knockout_classes(_pretrained(model_args))
    lm = (simple if force_simple else chat).create_from_arg_string(model_args, {"batch_size": 1})
    n_layers = num_layers(lm._model)
    last_row = lm.technique_params["last_row"]
    injection = lm.technique.injection  # e.g. qwen3_vl_knockout's deepstack=keep|drop, kept for every window
    manager = _task_manager(TaskManager, tasks, include_path)
    model = lm._model  # lmms-eval's evaluate() ends with lm.clean(), which deletes it from the instance

    def evaluate(mode, window, invert=outside):
        lm._model = model
        if isinstance(window, str):  # an official named window: its own layer set, never inverted
            lm.technique = Knockout(n_layers, injection, mode=mode, window=window, last_row=last_row)
        else:
            lm.technique = Knockout(
                n_layers,
                injection,
                mode=mode,
                from_layer=window[0],
                to_layer=window[1],
                outside=invert,
                last_row=last_row,
            )
        t0 = time.time()
        res = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=0,
            verbosity="WARNING",
        )
        metrics = {task: numeric_metrics(res["results"][task]) for task in tasks}
        log(
            f"knockout-sweep: mode={mode} window={window_label(window)}{' (outside)' if invert else ''}: {metrics} ({time.time() - t0:.0f}s)"
        )
        return metrics

    # the reference: the empty window, never inverted (inverted, it would block every layer)
    baseline = evaluate("both", (0, 0), invert=False)
    rows = []
    for mode in modes:
        for window in windows:
            metrics = evaluate(mode, window)
            for task in tasks:
                for metric, value in metrics[task].items():
                    base = baseline[task].get(metric)
                    rows.append(
                        {
                            "task": task,
                            "metric": metric,
                            "mode": mode,
                            "window": window_label(window),
                            "outside": outside,
                            "value": value,
                            "baseline": base,
                            "delta": None if base is None else value - base,
                        }
                    )
    return rows


def _task_manager(TaskManager, tasks, include_path):
    """Index only --include_path when it holds every task (indexing lmms-eval's own tasks takes seconds)."""
    if include_path:
        manager = TaskManager("WARNING", include_path=include_path, include_defaults=False)
        if all(t in manager.all_tasks for t in tasks):
            return manager
    return TaskManager("WARNING", include_path=include_path)


def write_table(rows, out_dir: Path) -> tuple[Path, Path]:
    """sweep.csv (one row per measurement) and sweep.md (one table per task and metric: windows x modes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "sweep.csv", out_dir / "sweep.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = []
    for (task, metric), group in _groups(rows).items():
        modes = list(dict.fromkeys(r["mode"] for r in group))
        windows = list(dict.fromkeys(r["window"] for r in group))
        value = {(r["mode"], r["window"]): r["value"] for r in group}
        outside = " (blocked outside the window)" if group[0]["outside"] else ""
        lines += [f"### {task}: {metric}{outside}; no knockout: {group[0]['baseline']:.4f}", ""]
        lines.append("| window | " + " | ".join(modes) + " |")
        lines.append("|---|" + "---:|" * len(modes))
        for w in windows:
            lines.append(f"| {w} | " + " | ".join(f"{value[(m, w)]:.4f}" for m in modes) + " |")
        lines.append("")
    md_path.write_text("\n".join(lines))
    return csv_path, md_path


def _groups(rows):
    groups = {}
    for r in rows:
        groups.setdefault((r["task"], r["metric"]), []).append(r)
    return groups


def plot(rows, out_dir: Path, metric: str = "") -> list[Path]:
    """One PNG per (task, metric): metric vs window, one line per mode, the no-knockout level dashed."""
    paths = []
    for (task, name), group in _groups(rows).items():
        if metric and name != metric:
            continue
        windows = list(dict.fromkeys(r["window"] for r in group))
        series = {}
        for r in group:
            series.setdefault(r["mode"], [None] * len(windows))[windows.index(r["window"])] = r["value"]
        path = out_dir / f"sweep_{task}_{name}.png".replace("/", "_")
        title = f"{task}: {name} under knockout" + (" outside the window" if group[0]["outside"] else "")
        line_plot(path, windows, series, group[0]["baseline"], title, xlabel="blocked layers [start:stop)", ylabel=name)
        paths.append(path)
    return paths


def line_plot(path, x_labels, series: dict, baseline, title, xlabel="", ylabel="", size=(720, 440)):
    """A small line chart with Pillow (no plotting dependency): one coloured line per series."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    w, h = size
    left, right, top, bottom = 70, 150, 40, 60
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    values = [v for vs in series.values() for v in vs if v is not None] + ([baseline] if baseline is not None else [])
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad

    def xy(i, v):
        x = left + (i + 0.5) * (w - left - right) / max(len(x_labels), 1)
        y = top + (hi - v) / (hi - lo) * (h - top - bottom)
        return x, y

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(5):  # y ticks
        v = lo + k * (hi - lo) / 4
        _, y = xy(0, v)
        d.line([left - 4, y, left, y], fill="black")
        d.text((6, y - 6), f"{v:.3f}", fill="black", font=font)
    for i, label in enumerate(x_labels):
        x, _ = xy(i, lo)
        d.line([x, h - bottom, x, h - bottom + 4], fill="black")
        d.text((x - 3 * len(label), h - bottom + 8), label, fill="black", font=font)
    if baseline is not None:
        _, y = xy(0, baseline)
        for x in range(left, w - right, 12):
            d.line([x, y, min(x + 6, w - right), y], fill=(120, 120, 120), width=2)
    for n, (name, vs) in enumerate(series.items()):
        color = COLORS[n % len(COLORS)]
        pts = [xy(i, v) for i, v in enumerate(vs) if v is not None]
        if len(pts) > 1:
            d.line(pts, fill=color, width=3)
        for x, y in pts:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
        ly = top + 10 + 18 * n
        d.line([w - right + 12, ly + 6, w - right + 36, ly + 6], fill=color, width=3)
        d.text((w - right + 42, ly), name, fill="black", font=font)
    if baseline is not None:
        ly = top + 10 + 18 * len(series)
        d.line([w - right + 12, ly + 6, w - right + 36, ly + 6], fill=(120, 120, 120), width=2)
        d.text((w - right + 42, ly), "no knockout", fill="black", font=font)
    d.text((left, 12), title, fill="black", font=font)
    d.text((left + (w - left - right) // 2 - 3 * len(xlabel), h - 24), xlabel, fill="black", font=font)
    d.text((6, top - 18), ylabel, fill="black", font=font)
    img.save(path)
    return path


def main(args) -> int:
    from methods.knockout import QUERY_SETS

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in QUERY_SETS]
    if bad:
        print(f"knockout-sweep: unknown mode(s) {', '.join(bad)}; choose from {', '.join(QUERY_SETS)}")
        return 2
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    from ..base import resolve_pretrained  # noqa: F401  (checkpoint names are resolved by the model class)
    from transformers import AutoConfig

    pretrained = _pretrained(args.model_args)
    n_layers = AutoConfig.from_pretrained(resolve_pretrained(pretrained)).text_config.num_hidden_layers
    try:
        windows = parse_windows(args.windows, n_layers, args.window_size, args.stride)
    except ValueError as e:
        print(f"knockout-sweep: {e}")
        return 2
    limit = (
        int(args.limit) if args.limit is not None and float(args.limit).is_integer() and args.limit >= 1 else args.limit
    )
    rows = run_sweep(
        args.model_args,
        tasks,
        windows,
        modes,
        outside=args.outside,
        limit=limit,
        include_path=args.include_path,
        force_simple=args.force_simple,
    )
    out = Path(args.output_dir)
    csv_path, md_path = write_table(rows, out)
    (out / "sweep.json").write_text(json.dumps({"model_args": args.model_args, "tasks": tasks, "rows": rows}, indent=1))
    pngs = plot(rows, out, args.metric)
    print(md_path.read_text())
    print(f"knockout-sweep: wrote {csv_path}, {md_path}, " + ", ".join(map(str, pngs)))
    return 0
