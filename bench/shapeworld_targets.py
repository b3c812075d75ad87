"""A ShapeWorld checkpoint's baseline against the testbed's targets (issue 24), through the real CLI.

    python bench/shapeworld_targets.py --pretrained shapeworld-llava --out results/targets/shapeworld-llava
    python bench/shapeworld_targets.py --out results/targets/shapeworld-llava --table-only   # re-read a run

Runs stock ``llava_hf`` greedily on every ShapeWorld task (full 300-doc test splits unless
``--limit``, ``--log_samples``), then prints, for each target, the measured value and whether it
is met. Each target makes sure a phenomenon exists for a technique to act on: localisation (REC),
counting and relations (VIRAL), a co-occurrence prior (POPE adversarial below random) and
small-object misses (PM), captions that hallucinate but not always (CHAIR).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

from lmms_eval_plugins.base import resolve_pretrained
from lmms_eval_plugins.paths import tasks_dir
from lmms_eval_plugins.testing import read_samples, run_lmms_eval

TASKS = (
    "shapeworld_pope_random",
    "shapeworld_pope_popular",
    "shapeworld_pope_adversarial",
    "shapeworld_chair",
    "shapeworld_rec",
    "shapeworld_count",
    "shapeworld_spatial",
)


def yes_rate(rows, size_class: str):
    """Share of "yes" answers among present-object POPE questions of one size class, and their number."""
    picked = [
        r["pope_accuracy"]
        for r in rows
        if r["pope_accuracy"]["ground_truth"] == "yes" and r["pope_accuracy"]["size_class"] == size_class
    ]
    return (sum(p["prediction"] == "yes" for p in picked) / len(picked) if picked else float("nan")), len(picked)


def targets(results: dict, samples: dict) -> list[tuple[str, str, str, bool]]:
    """(measure, target, measured, met) rows from the results file and the per-sample logs."""
    res = {task: {k.split(",")[0]: v for k, v in m.items() if "," in k} for task, m in results["results"].items()}
    rows = []
    rec = res["shapeworld_rec"]["refcoco_ACC@0.5"]
    rows.append(
        (
            "REC ACC@0.5 (generated boxes)",
            ">= 0.30",
            f"{rec:.3f} (IoU {res['shapeworld_rec']['refcoco_IoU']:.3f})",
            rec >= 0.30,
        )
    )

    count = res["shapeworld_count"]["acc"]
    answers = collections.Counter(str(r["filtered_resps"]).strip() for r in samples["shapeworld_count"])
    truths = collections.Counter(str(r["target"]).strip() for r in samples["shapeworld_count"])
    majority = truths.most_common(1)[0][1] / max(
        1, sum(truths.values())
    )  # accuracy of always giving the commonest true count
    top, n_top = answers.most_common(1)[0]
    rows.append(
        (
            "count accuracy",
            ">= 0.55, above the best constant answer",
            f"{count:.3f} (constant answer: {majority:.3f}; most frequent answer {top!r} {n_top / max(1, sum(answers.values())):.0%})",
            count >= 0.55 and count > majority,
        )
    )

    spatial = res["shapeworld_spatial"]["cv_bench_acc"]
    rows.append(("spatial accuracy", ">= 0.70", f"{spatial:.3f} (chance 0.5)", spatial >= 0.70))

    rnd, adv = res["shapeworld_pope_random"]["pope_accuracy"], res["shapeworld_pope_adversarial"]["pope_accuracy"]
    pop = res["shapeworld_pope_popular"]["pope_accuracy"]
    rows.append(("POPE random accuracy", ">= 0.85", f"{rnd:.3f}", rnd >= 0.85))
    rows.append(
        (
            "POPE adversarial vs random",
            ">= 0.08 below random",
            f"{adv:.3f} ({adv - rnd:+.3f}; popular {pop:.3f})",
            rnd - adv >= 0.08,
        )
    )

    small, n_small = yes_rate(samples["shapeworld_pope_random"], "small")
    large, n_large = yes_rate(samples["shapeworld_pope_random"], "large")
    rows.append(
        (
            'POPE "yes" on small vs large present objects',
            ">= 0.15 below large",
            f"{small:.3f} (n={n_small}) vs {large:.3f} (n={n_large}): {small - large:+.3f}",
            large - small >= 0.15,
        )
    )

    chair = res["shapeworld_chair"]["coco_cap_chair_s"]
    rows.append(
        (
            "CHAIR_S",
            "20 to 60",
            f"{chair:.1f} (CHAIR_I {res['shapeworld_chair']['coco_cap_chair_i']:.1f}, recall {res['shapeworld_chair']['coco_cap_recall']:.1f})",
            20 <= chair <= 60,
        )
    )
    return rows


def markdown(rows) -> str:
    lines = ["| measure | target | measured | met |", "|---|---|---|---|"]
    lines += [f"| {m} | {t} | {v} | {'yes' if ok else '**no**'} |" for m, t, v, ok in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pretrained", default="shapeworld-llava")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--table-only", action="store_true", help="only re-read the run in --out")
    args = ap.parse_args(argv)
    if not args.table_only:
        extra = ("--limit", str(args.limit)) if args.limit else ()
        results, log = run_lmms_eval(
            "llava_hf",
            f"pretrained={resolve_pretrained(args.pretrained)},device_map=cpu,device=cpu",
            ",".join(TASKS),
            args.out,
            include_path=tasks_dir(),
            extra=extra,
            timeout=6 * 3600,
        )
        if results is None:
            print(log[-5000:], file=sys.stderr)
            return 1
    files = sorted(args.out.rglob("*_results.json"))
    results = json.loads(files[-1].read_text())
    samples = {task: read_samples(args.out, task) for task in TASKS}
    table = markdown(targets(results, samples))
    print(table)
    (args.out / "targets.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
