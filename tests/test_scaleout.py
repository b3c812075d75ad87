"""Scale-out and resume: accelerate multi-process, response-cache resume after a kill, split devices."""

import contextlib
import glob
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from conftest import REPO, make_inputs

from lmms_eval_plugins.testing import read_samples, run_lmms_eval
from methods import hooks

TASK_ARGS = ["--include_path", "tests/tasks", "--batch_size", "1", "--log_samples"]


def _answers(out, task="tiny_yesno"):
    return [s["filtered_resps"] for s in read_samples(out, task)]


@pytest.mark.parametrize(
    "model,extra_args,task,include",
    [
        ("llava_pai", "alpha=0.5", "tiny_yesno", "tests/tasks"),  # an attention edit, on a random model
        ("llava_pm", "preset=pope", "shapeworld_pope_adversarial", "task_configs"),  # decoding-time, ShapeWorld
        (
            "llava_knockout",
            "mode=query,from_layer=0,to_layer=2",
            "shapeworld_pope_adversarial",
            "task_configs",
        ),  # analysis
    ],
)
def test_two_processes_equal_one(tiny_ckpt, tmp_path, model, extra_args, task, include):
    pretrained = tiny_ckpt if task == "tiny_yesno" else "shapeworld-tiny"
    args = f"pretrained={pretrained},{extra_args}"
    limit = [] if task == "tiny_yesno" else ["--limit", "6"]
    one, log1 = run_lmms_eval(model, args, task, tmp_path / "one", include_path=include, extra=limit, cwd=REPO)
    assert one is not None, log1[-2000:]
    # on a CPU machine, accelerate's multi-process launcher runs gloo ranks (`--cpu` alone is one process)
    # the launcher of this interpreter's environment, whether or not it is activated (PATH may have none)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "lmms_eval",
        "--model",
        model,
        "--model_args",
        args,
        "--tasks",
        task,
        "--output_path",
        str(tmp_path / "two"),
        "--include_path",
        include,
        "--batch_size",
        "1",
        "--log_samples",
        *limit,
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600
    )
    log2 = proc.stdout + proc.stderr
    assert "Running on rank 1" in log2, log2[-3000:]
    assert f"Building contexts for {task} on rank 1" in log2  # the second rank got its own share
    two = glob.glob(str(tmp_path / "two" / "**" / "*_results.json"), recursive=True)
    assert two, log2[-3000:]
    assert _answers(tmp_path / "two", task) == _answers(tmp_path / "one", task)
    assert len(_answers(tmp_path / "two", task)) == (3 if task == "tiny_yesno" else 6)
    two_results = json.load(open(two[-1]))["results"][task]
    assert {k: v for k, v in two_results.items() if "stderr" not in k} == {
        k: v for k, v in one["results"][task].items() if "stderr" not in k
    }


def _published_answers(cache_dir) -> int:
    """Answers in <cache>/cache.db, the merged database a new run reads (the wrappers publish each chunk
    there; the run's own shard and jsonl are written a moment before, so a kill in between loses it)."""
    db = os.path.join(cache_dir, "cache.db")
    if not os.path.exists(db):
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as con:
            return con.execute("SELECT count(*) FROM responses").fetchone()[0]
    except sqlite3.Error:  # created but not yet initialised, or locked by the writer: try again
        return 0


def test_killed_run_resumes_from_the_cache(tiny_ckpt, tmp_path):
    args = f"pretrained={tiny_ckpt},alpha=0.5,cache_chunk=1"
    full, log = run_lmms_eval("llava_pai", args, "tiny_yesno", tmp_path / "full", include_path="tests/tasks", cwd=REPO)
    assert full is not None, log[-2000:]
    cache = tmp_path / "cache"
    cmd = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "llava_pai",
        "--model_args",
        args,
        "--tasks",
        "tiny_yesno",
        "--output_path",
        str(tmp_path / "killed"),
        "--use_cache",
        str(cache),
        *TASK_ARGS,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TINY_SLOW_DOC": "2"}
    with tempfile.TemporaryFile("w+") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.time() + 300
        while _published_answers(cache) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log_file.seek(0)
        killed_log = log_file.read()
    assert _published_answers(cache) >= 2, killed_log[-3000:]  # docs 0 and 1 were durable before the kill
    assert not glob.glob(str(tmp_path / "killed" / "**" / "*_results.json"), recursive=True)

    resumed, log = run_lmms_eval(
        "llava_pai",
        args,
        "tiny_yesno",
        tmp_path / "resumed",
        include_path="tests/tasks",
        extra=["--use_cache", str(cache)],
        cwd=REPO,
    )
    assert resumed is not None, log[-3000:]
    assert "2/3 cache hits" in log, [line for line in log.splitlines() if "cache" in line.lower()][-10:]
    assert _answers(tmp_path / "resumed") == _answers(tmp_path / "full")

    # another technique parameter is another cache identity: nothing is reused
    other, log = run_lmms_eval(
        "llava_pai",
        f"pretrained={tiny_ckpt},alpha=0.6,cache_chunk=1",
        "tiny_yesno",
        tmp_path / "other",
        include_path="tests/tasks",
        extra=["--use_cache", str(cache)],
        cwd=REPO,
    )
    assert other is not None and "cache hits" not in log


def test_layers_split_over_devices_give_the_same_edits(tiny_ckpt, tmp_path):
    """Layers 2-3 offloaded (accelerate dispatch hooks move them in and out): same captures, same edited logits."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_ckpt)
    inputs, _, _ = make_inputs(processor)
    one = LlavaForConditionalGeneration.from_pretrained(tiny_ckpt).eval()
    lm = "model.language_model."
    device_map = {
        "model.vision_tower": "cpu",
        "model.multi_modal_projector": "cpu",
        lm + "embed_tokens": "cpu",
        lm + "layers.0": "cpu",
        lm + "layers.1": "cpu",
        lm + "layers.2": "disk",
        lm + "layers.3": "disk",
        lm + "norm": "cpu",
        lm + "rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    split = LlavaForConditionalGeneration.from_pretrained(
        tiny_ckpt, device_map=device_map, offload_folder=str(tmp_path)
    ).eval()
    assert hasattr(split.model.language_model.layers[2], "_hf_hook")
    pos = hooks.image_positions(inputs["input_ids"], one.config.image_token_id)
    results = []
    for model in (one, split):
        cap = hooks.Capture(layers=range(4), keys=pos)
        with torch.no_grad(), hooks.edited(model, cap, hooks.Boost(layers=[1, 3], keys=pos, alpha=0.5)):
            logits = model(**inputs).logits
        results.append((logits, cap.stacked()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
