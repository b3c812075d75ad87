"""llava_reprompt on ShapeWorld through the real lmms-eval CLI: pruning and compressed re-prompting at
several keep ratios against llava_hf (full context) on the same checkpoint.

    python bench/reprompt_shapeworld.py --out results/reprompt [--ratios 0.02,0.05,0.10,0.25] [--limit N]
        [--tasks shapeworld_pope_adversarial,shapeworld_count] [--modes prune,compressed] [--extra_args preset=...]
        [--baseline results/reprompt/llava_hf]

Writes <out>/table.md: per task and metric, the full-context value and each run's value with its
ratio to full, plus the KV entries the compressed answers attended to vs the full context and
their time to first token vs the full prefills of the same run (from reprompt_stats.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmms_eval_plugins.commands.compare import metric_rows  # noqa: E402
from lmms_eval_plugins.testing import read_samples, run_lmms_eval  # noqa: E402


def sample_score(sample: dict, metric: str) -> float | None:
    """A sample's score for one metric (POPE stores a record dict with its 'score')."""
    v = sample.get(metric)
    if isinstance(v, str):
        try:
            v = json.loads(v.replace("'", '"'))
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return None
    if isinstance(v, dict):
        return float(v["score"]) if "score" in v else None
    return None if v is None else float(v)


def followup_accuracy(run_dir: Path, base_dir: Path, task: str, metric: str):
    """Mean score of the answers given from a compressed context, and llava_hf's on the same documents.

    Matches the report's lines (processing order) to the documents (doc order, which is the chat
    path's order for a one-task run); gives up (None) if the question texts do not line up."""
    lines = [json.loads(x) for x in (run_dir / "reprompt_stats.jsonl").read_text().splitlines()]
    samples, base = read_samples(run_dir, task), {s["doc_id"]: s for s in read_samples(base_dir, task)}
    if len(lines) != len(samples) or any(s["input"].strip() not in r.get("query", "") for s, r in zip(samples, lines)):
        return None
    pairs = [
        (sample_score(s, metric), sample_score(base[s["doc_id"]], metric))
        for s, r in zip(samples, lines)
        if r["compressed"]
    ]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if not pairs:
        return None
    return len(pairs), sum(a for a, _ in pairs) / len(pairs), sum(b for _, b in pairs) / len(pairs)


def run(model, args, tasks, out, limit, include_path):
    extra = ["--limit", str(limit)] if limit else []
    results, log = run_lmms_eval(
        model, args, tasks, out, include_path=include_path, extra=extra, cwd=REPO, timeout=7200
    )
    if results is None:
        raise SystemExit(f"{model} {args} failed:\n{log[-3000:]}")
    stats = out / "reprompt_stats.json"
    return results, (json.loads(stats.read_text()) if stats.exists() else {})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--pretrained", default="shapeworld-tiny")
    ap.add_argument("--tasks", default="shapeworld_pope_adversarial,shapeworld_count")
    ap.add_argument("--ratios", default="0.02,0.05,0.10,0.25")
    ap.add_argument("--modes", default="prune,compressed")
    ap.add_argument("--extra_args", default="", help="appended to every llava_reprompt model_args")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--baseline", default="", help="directory of an earlier llava_hf run to reuse")
    ap.add_argument(
        "--followup_metric", default="pope_accuracy", help="per-sample metric for the follow-up-only comparison"
    )
    ap.add_argument("--include_path", default=str(REPO / "task_configs"))
    a = ap.parse_args()
    from lmms_eval_plugins.base import resolve_pretrained

    out = Path(a.out)
    a.pretrained = resolve_pretrained(a.pretrained)  # plain llava_hf does not know the bundled checkpoint's name
    from lmms_eval_plugins.commands.compare import latest_results

    if a.baseline:  # reuse an earlier llava_hf run on the same tasks and limit
        base = latest_results(a.baseline)
    else:
        base, _ = run(
            "llava_hf",
            f"pretrained={a.pretrained},device=cpu,device_map=cpu",
            a.tasks,
            out / "llava_hf",
            a.limit,
            a.include_path,
        )
    base_dir = Path(a.baseline) if a.baseline else out / "llava_hf"
    runs, run_dirs = [], []
    for mode in a.modes.split(","):
        for r in a.ratios.split(","):
            args = f"pretrained={a.pretrained},mode={mode},keep_ratio={r}" + (
                f",{a.extra_args}" if a.extra_args else ""
            )
            res, stats = run("llava_reprompt", args, a.tasks, out / f"{mode}_{r}", a.limit, a.include_path)
            runs.append((f"{mode} {float(r):.0%}", res, stats))
            run_dirs.append(out / f"{mode}_{r}")
            print(f"{mode} {r}: {metric_rows(res)} {stats}", flush=True)
    base_rows = metric_rows(base)
    head = ["task", "metric", "full (llava_hf)"] + [name for name, _, _ in runs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (task, metric), b in sorted(base_rows.items()):
        cells = [task, metric, f"{b:.4g}"]
        for _, res, _ in runs:
            v = metric_rows(res).get((task, metric))
            cells.append("-" if v is None else f"{v:.4g} ({v / b:.0%})" if b else f"{v:.4g}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| run | answers from a compressed context | KV entries: compressed / full | time to first token vs full prefill |",
        "|---|---|---|---|",
    ]
    for name, _, s in runs:
        kv = (
            f"{s.get('kv_entries_compressed', 0):.1f} / {s.get('kv_entries_full', 0):.1f} ({s.get('kv_reduction', 0):.1f}x fewer)"
            if s.get("kv_entries_compressed")
            else "-"
        )
        ttft = f"{s['ttft_ratio']:.2f}x" if s.get("ttft_ratio") else "-"
        lines.append(f"| {name} | {s.get('compressed_answers', '-')} of {s.get('requests', '-')} | {kv} | {ttft} |")
    tasks = a.tasks.split(",")
    if len(tasks) == 1:
        lines += [
            "",
            f"Answers given from a compressed context only ({a.followup_metric}), vs llava_hf on the same documents:",
            "",
            "| run | answers | compressed | llava_hf |",
            "|---|---|---|---|",
        ]
        for (name, _, _s), d in zip(runs, run_dirs):
            fa = (
                followup_accuracy(d, base_dir, tasks[0], a.followup_metric)
                if (d / "reprompt_stats.jsonl").exists()
                else None
            )
            if fa:
                lines.append(f"| {name} | {fa[0]} | {fa[1]:.4f} | {fa[2]:.4f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
