"""llava_pm on ShapeWorld through the real lmms-eval CLI, against greedy llava_hf on the same checkpoint.

    python bench/pm_shapeworld.py --out results/pm [--limit N] [--every_limit N] [--extra_args preset=mme]

Runs, one after the other: llava_hf and llava_pm (refresh=once) on the three POPE splits and on
CHAIR, and llava_pm with refresh=every_token on CHAIR. Writes <out>/table.md with
- the metric table (lmms-plugins compare);
- POPE accuracy by the size of the object asked about (from the logged samples), so small
  objects (what magnification should fix) are shown apart;
- PM's search statistics (refinement passes per sample) from the saved traces.
Perception maps of the first samples, and every sample's search trace, are saved under
<out>/llava_pm*/visuals.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmms_eval_plugins.commands.compare import table  # noqa: E402
from lmms_eval_plugins.testing import read_samples, run_lmms_eval  # noqa: E402

POPE = ("shapeworld_pope_random", "shapeworld_pope_popular", "shapeworld_pope_adversarial")


def run(model, args, tasks, out, limit, include_path):
    extra = ["--limit", str(limit)] if limit else []
    results, log = run_lmms_eval(
        model, args, tasks, out, include_path=include_path, extra=extra, cwd=REPO, timeout=4 * 3600
    )
    if results is None:
        raise SystemExit(f"{model} {args} failed:\n{log[-3000:]}")
    return results


def by_size(out: Path, task: str, key: str) -> dict:
    """POPE accuracy per object size: {size: (correct, n)}, from the per-sample metric records
    (the ShapeWorld POPE tasks put the queried object's ``size_class`` and the ``score`` there)."""
    acc = defaultdict(lambda: [0, 0])
    for s in read_samples(out, task):
        record = next((v for v in s.values() if isinstance(v, dict) and key in v and "score" in v), None)
        if record is None:
            continue
        acc[record[key]][0] += float(record["score"])
        acc[record[key]][1] += 1
    return dict(acc)


def search_stats(out: Path) -> dict:
    """Refinement passes per sample, from the per-sample trace PM writes next to its visuals."""
    traces = [
        json.loads(line) for p in sorted(out.rglob("*pm_trace.jsonl")) for line in p.read_text().splitlines() if line
    ]
    if not traces:
        return {}
    its = [t["iterations"] for t in traces]
    hist = {k: its.count(k) for k in sorted(set(its))}
    return {
        "samples": len(its),
        "mean_passes": round(sum(its) / len(its), 2),
        "passes_histogram": hist,
        "mean_first_sum": round(sum(t["sums"][0] for t in traces) / len(traces), 3),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--pretrained", default="shapeworld-tiny")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument(
        "--every_limit", type=int, default=0, help="--limit for the (slow) every_token CHAIR run (default: --limit)"
    )
    ap.add_argument("--extra_args", default="", help="appended to every llava_pm model_args")
    ap.add_argument("--size_key", default="size_class", help="document field with the queried object's size")
    ap.add_argument(
        "--visuals",
        type=int,
        default=12,
        help="saved perception maps per run (every sample's search goes to pm_trace.jsonl)",
    )
    ap.add_argument("--include_path", default=str(REPO / "task_configs"))
    a = ap.parse_args()
    from lmms_eval_plugins.base import resolve_pretrained

    out = Path(a.out)
    ckpt = resolve_pretrained(a.pretrained)
    extra = f",{a.extra_args}" if a.extra_args else ""
    tasks = ",".join(POPE + ("shapeworld_chair",))
    runs = {
        "llava_hf": run(
            "llava_hf", f"pretrained={ckpt},device=cpu,device_map=cpu", tasks, out / "llava_hf", a.limit, a.include_path
        ),
        "llava_pm": run(
            "llava_pm",
            f"pretrained={ckpt},save_visuals={out / 'llava_pm' / 'visuals'},max_visuals={a.visuals}{extra}",
            tasks,
            out / "llava_pm",
            a.limit,
            a.include_path,
        ),
        "llava_pm every_token": run(
            "llava_pm",
            f"pretrained={ckpt},refresh=every_token,save_visuals={out / 'llava_pm_every' / 'visuals'},max_visuals={a.visuals}{extra}",
            "shapeworld_chair",
            out / "llava_pm_every",
            a.every_limit or a.limit,
            a.include_path,
        ),
    }
    every_runs = list(runs.values())
    if a.every_limit and a.every_limit != a.limit:  # every_token saw fewer captions: compare it on those alone
        hf_few = run(
            "llava_hf",
            f"pretrained={ckpt},device=cpu,device_map=cpu",
            "shapeworld_chair",
            out / "llava_hf_every",
            a.every_limit,
            a.include_path,
        )
        every_runs = [hf_few, runs.pop("llava_pm every_token")]
    lines = [table(list(runs.values())), ""]
    if len(every_runs) == 2:
        lines += [f"refresh=every_token on the first {a.every_limit} CHAIR captions:", "", table(every_runs), ""]
    lines += [
        "POPE accuracy by the size of the object asked about:",
        "",
        "| task | size | n | llava_hf | llava_pm | delta |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for task in POPE:
        base, mag = by_size(out / "llava_hf", task, a.size_key), by_size(out / "llava_pm", task, a.size_key)
        for size in sorted(base, key=str):
            (bc, n), (mc, _) = base[size], mag.get(size, (0, 0))
            lines.append(f"| {task} | {size} | {n} | {bc / n:.3f} | {mc / n:.3f} | {(mc - bc) / n:+.3f} |")
    lines += [
        "",
        "PM search (from the saved traces): "
        + json.dumps(
            {k: search_stats(out / k.replace(" every_token", "_every")) for k in ("llava_pm", "llava_pm every_token")}
        ),
    ]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
