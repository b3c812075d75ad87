"""End to end: the real lmms-eval CLI runs every ShapeWorld task on the shipped checkpoint
offline (one invocation for all tasks; the CLI exits 0 even on failure, so the results
file is what is checked)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmms_eval_plugins.shapeworld import checkpoint_path

ROOT = Path(__file__).resolve().parents[1]
TASKS = {
    "shapeworld_pope_random": ["pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio"],
    "shapeworld_pope_popular": ["pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio"],
    "shapeworld_pope_adversarial": [
        "pope_accuracy",
        "pope_precision",
        "pope_recall",
        "pope_f1_score",
        "pope_yes_ratio",
    ],
    "shapeworld_chair": ["coco_cap_chair_i", "coco_cap_chair_s", "coco_cap_recall"],
    "shapeworld_rec": [
        "refcoco_IoU",
        "refcoco_ACC@0.1",
        "refcoco_ACC@0.3",
        "refcoco_ACC@0.5",
        "refcoco_ACC@0.7",
        "refcoco_ACC@0.9",
        "refcoco_Center_ACC",
    ],
    "shapeworld_count": ["acc"],
    "shapeworld_spatial": ["cv_bench_acc"],
}
PERCENT = {"coco_cap_chair_i", "coco_cap_chair_s", "coco_cap_recall"}


def run_cli(tasks, out, extra=()):
    # one torch thread: on a shared 2-core machine two threads are several times slower
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    cmd = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "llava_hf",
        "--model_args",
        f"pretrained={checkpoint_path()},device_map=cpu,device=cpu",
        "--tasks",
        ",".join(tasks),
        "--include_path",
        str(ROOT / "task_configs"),
        "--limit",
        "4",
        "--batch_size",
        "1",
        "--output_path",
        str(out),
        "--log_samples",
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=1200)
    files = sorted(Path(out).rglob("*_results.json"))
    assert files, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(files[-1].read_text()), sorted(Path(out).rglob("*_samples_*.jsonl")), proc


@pytest.mark.skipif(not (checkpoint_path() / "model.safetensors").exists(), reason="checkpoint not built")
def test_cli_runs_every_shapeworld_task(tmp_path):
    results, samples, proc = run_cli(list(TASKS), tmp_path)
    for task, names in TASKS.items():
        assert task in results["results"], (task, proc.stderr[-3000:])
        got = results["results"][task]
        for name in names:
            value = got[f"{name},none"]
            hi = 100.0 if name in PERCENT else 1.0
            assert 0.0 <= value <= hi, (task, name, value)
    # the model answers in the parsed formats: every REC answer is a box, every POPE answer yes/no
    rows = [json.loads(line) for f in samples for line in f.read_text().splitlines()]
    by_task = {}
    for f in samples:
        task = next(t for t in TASKS if f"_{t}.jsonl" in f.name)
        by_task[task] = [json.loads(line) for line in f.read_text().splitlines()]
    assert rows
    for row in by_task["shapeworld_rec"]:
        assert row["refcoco_IoU"]["pred"] != [0, 0, 0, 0] or "[" in row["filtered_resps"][0]
    for row in by_task["shapeworld_pope_adversarial"]:
        assert row["pope_accuracy"]["prediction"] in ("yes", "no")


@pytest.mark.skipif(not (checkpoint_path() / "model.safetensors").exists(), reason="checkpoint not built")
def test_cli_simple_llava_hf_pope(tmp_path):
    """The simple llava_hf path (tokenizer chat template on a string with "<image>\\n")."""
    results, _, _ = run_cli(["shapeworld_pope_adversarial"], tmp_path, extra=("--force_simple",))
    assert 0.0 <= results["results"]["shapeworld_pope_adversarial"]["pope_accuracy,none"] <= 1.0
