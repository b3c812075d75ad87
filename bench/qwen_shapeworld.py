"""The ShapeWorld table of the qwen2_5_vl_* techniques against stock lmms-eval `qwen2_5_vl` on
`shapeworld-tiny-qwen`, every run through the real lmms-eval CLI (one torch thread each).

    python bench/qwen_shapeworld.py --out results/qwen_shapeworld [--pretrained PATH] [--limit N]

Prints one markdown row per run and writes table.md and runs.json under --out. The rows
mirror the LLaVA table in docs/shapeworld.md (PAI alpha 0.2 without CFG, and preset=paper with CFG;
knockout of the image keys for the generated / query rows in every layer; lochead boxes from
all heads and from each request's own heads; re-prompting: pruning at 5% / 25% and compressed
follow-ups at 25%).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmms_eval_plugins.paths import CHECKPOINTS, tasks_dir  # noqa: E402
from lmms_eval_plugins.testing import run_lmms_eval  # noqa: E402

POPE = "shapeworld_pope_random,shapeworld_pope_popular,shapeworld_pope_adversarial"
RUNS = [
    ("baseline", "qwen2_5_vl", "", "shapeworld"),
    ("pai alpha=0.2", "qwen2_5_vl_pai", ",alpha=0.2,use_cfg=false", POPE + ",shapeworld_chair"),
    ("pai preset=paper (alpha 0.2, CFG gamma 1.1)", "qwen2_5_vl_pai", ",preset=paper", POPE + ",shapeworld_chair"),
    ("knockout generated, all layers", "qwen2_5_vl_knockout", ",mode=generated", "shapeworld_pope_adversarial"),
    ("knockout query, all layers", "qwen2_5_vl_knockout", ",mode=query", "shapeworld_pope_adversarial"),
    (
        "knockout query, layer 0",
        "qwen2_5_vl_knockout",
        ",mode=query,from_layer=0,to_layer=1",
        "shapeworld_pope_adversarial",
    ),
    ("knockout both, all layers (captions)", "qwen2_5_vl_knockout", ",mode=both", "shapeworld_chair"),
    ("lochead heads=all", "qwen2_5_vl_lochead", ",heads=all", "shapeworld_rec"),
    ("lochead heads=self (top 3)", "qwen2_5_vl_lochead", ",heads=self", "shapeworld_rec"),
    ("pm preset=pope", "qwen2_5_vl_pm", ",preset=pope", "shapeworld_pope_adversarial,shapeworld_chair"),
    ("reprompt prune 5%", "qwen2_5_vl_reprompt", ",mode=prune,keep_ratio=0.05", "shapeworld_pope_adversarial"),
    ("reprompt prune 25%", "qwen2_5_vl_reprompt", ",mode=prune,keep_ratio=0.25", "shapeworld_pope_adversarial"),
    # lmms-eval's qwen2_5_vl chat class answers in prompt-text order, so a scene's two POPE questions are far apart:
    # keep every image's context (cache_size) or most follow-ups find theirs evicted (12 of 150 with the default 32)
    (
        "reprompt compressed 25% (follow-ups)",
        "qwen2_5_vl_reprompt",
        ",mode=compressed,keep_ratio=0.25,cache_size=300",
        "shapeworld_pope_adversarial",
    ),
]
METRICS = {
    "shapeworld_pope_random": ["pope_accuracy"],
    "shapeworld_pope_popular": ["pope_accuracy"],
    "shapeworld_pope_adversarial": ["pope_accuracy", "pope_yes_ratio"],
    "shapeworld_chair": ["coco_cap_chair_s", "coco_cap_chair_i", "coco_cap_recall"],
    "shapeworld_rec": ["refcoco_ACC@0.5", "refcoco_IoU", "refcoco_Center_ACC"],
    "shapeworld_count": ["acc"],
    "shapeworld_spatial": ["cv_bench_acc"],
}


def summary(results: dict) -> str:
    parts = []
    for task, names in METRICS.items():
        r = results.get(task)
        if not r:
            continue
        vals = [r.get(f"{m},none") for m in names]
        parts.append(
            f"{task.removeprefix('shapeworld_')} " + " / ".join("n/a" if v is None else f"{v:.3f}" for v in vals)
        )
    return "; ".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--pretrained", default=str(CHECKPOINTS["shapeworld-tiny-qwen"]))
    ap.add_argument("--pixels", type=int, default=12544, help="min_pixels = max_pixels (the checkpoint's own)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--only", default="", help="semicolon-separated run labels (default: all)")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    base = f"pretrained={args.pretrained},device=cpu,device_map=cpu,min_pixels={args.pixels},max_pixels={args.pixels}"
    extra = ("--limit", str(args.limit)) if args.limit else ()
    rows, table = {}, ["| run | model | results |", "|---|---|---|"]
    for label, model, margs, tasks in RUNS:
        if args.only and label not in args.only.split(";"):
            continue
        out = args.out / label.replace(" ", "_").replace("=", "-").replace(",", "")
        res, log = run_lmms_eval(
            model, base + margs, tasks, out, include_path=tasks_dir(), extra=extra, cwd=REPO, timeout=7200
        )
        if res is None:
            print(f"{label}: FAILED\n{log[-2000:]}", flush=True)
            continue
        rows[label] = {"model": model, "model_args": base + margs, "tasks": tasks, "results": res["results"]}
        line = f"| {label} | `{model}{margs and ' ' + margs.lstrip(',')}` | {summary(res['results'])} |"
        table.append(line)
        print(line, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runs.json").write_text(json.dumps(rows, indent=1))
    (args.out / "table.md").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
