"""--batch_size 3 through the real lmms-eval CLI answers every document exactly as --batch_size 1 does.

tiny_batch: seven questions of different lengths on images of different sizes (tests/tasks/tiny_batch.yaml), so
every batch is left-padded differently (on Gemma 3 to a multiple of 8); on Qwen2.5-VL and Qwen3-VL the images also
give different numbers of image tokens, on InternVL different numbers of tiles, on LLaVA-NeXT different numbers of
vision-tower crops (PAINT's captures sit on each request's own crops).
One lmms-eval process runs every configuration (``run_lmms_eval_many``); each run's per-sample answers are read
from its own output path. A technique that cannot batch exactly fails with its reason and writes no results."""

import pytest
from conftest import REPO, TASKS

from lmms_eval_plugins.testing import build_tiny_llava_next, read_samples, results_of, run_lmms_eval_many

LLAVA_RUNS = {
    "pai_cfg": ("llava_pai", "alpha=2.0,start_layer=0,use_cfg=true,gamma=1.5", False),
    "knockout": ("llava_knockout", "mode=query", False),
    "knockout_simple": ("llava_knockout", "mode=both,from_layer=1", True),
    "paint": ("llava_paint", "alpha=2.0,beta=1.0,start_layer=0", False),
    "prune": ("llava_reprompt", "mode=prune,keep_ratio=0.25", False),  # alone: its cut cache; batched: masks
    "fastv": ("llava_reprompt", "mode=fastv,fastv_layer=2,fastv_ratio=0.75", False),
    "pai_idle_simple": ("llava_pai", "alpha=0,use_cfg=false", True),
    "pm": ("llava_pm", "max_iter=2", False),  # each request's search alone, then one batched generate
}
QWEN_RUNS = {
    "qwen_pai_cfg": ("qwen2_5_vl_pai", "alpha=2.0,start_layer=0,use_cfg=true,gamma=1.5", False),
    "qwen_lochead": ("qwen2_5_vl_lochead", "heads=all", False),  # its tokenizer writes boxes (the tiny LLaVA's cannot)
}
QWEN_ARGS = "dtype=float32,min_pixels=12544,max_pixels=20000"
# a tiny LLaVA-NeXT: the documents' images get different tilings, so different numbers of vision-tower crops
NEXT_RUNS = {"next_paint": ("llava_paint", "alpha=10.0,beta=5.0,start_layer=0", False)}
QWEN3_RUNS = {  # the simple class, which prepares each batch (one processor call) while the last one generates
    "qwen3_pai_cfg_simple": ("qwen3_vl_pai", "alpha=2.0,start_layer=0,use_cfg=true,gamma=1.5", True),
}
QWEN3_ARGS = "dtype=float32,min_pixels=4096,max_pixels=25600"
INTERNVL_RUNS = {  # lmms-eval's internvl_hf asserts batch size 1: batching.py batches (chat, and the simple twin)
    "internvl_pai_cfg": ("internvl_hf_pai", "alpha=2.0,start_layer=0,use_cfg=true,gamma=1.5", False),
    "internvl_knockout_simple": ("internvl_hf_knockout", "mode=both,from_layer=1", True),
}
GEMMA3_RUNS = {  # the class pads every prompt to a multiple of 8 on the tokenizer's side: left, as Gemma's own
    "gemma3_pai_cfg": ("gemma3_pai", "alpha=2.0,start_layer=0,use_cfg=true,gamma=1.5", False),
}
ALL_RUNS = {**LLAVA_RUNS, **QWEN_RUNS, **NEXT_RUNS, **QWEN3_RUNS, **GEMMA3_RUNS, **INTERNVL_RUNS}


@pytest.fixture(scope="module")
def runs(tiny_ckpt, tmp_path_factory):
    from test_qwen import build_tiny_qwen

    from lmms_eval_plugins.testing import build_tiny_gemma3, build_tiny_internvl, build_tiny_qwen3_vl

    root = tmp_path_factory.mktemp("cli_batch")
    qwen = build_tiny_qwen(root / "tiny_qwen")
    qwen3 = build_tiny_qwen3_vl(root / "tiny_qwen3", min_pixels=4096, max_pixels=25600)
    gemma3 = build_tiny_gemma3(root / "tiny_gemma3", padding_side="left")
    internvl = build_tiny_internvl(root / "tiny_internvl")
    ckpts = {k: f"pretrained={qwen},{QWEN_ARGS}" for k in QWEN_RUNS}
    ckpts.update({k: f"pretrained={build_tiny_llava_next(root / 'next')}" for k in NEXT_RUNS})
    ckpts.update({k: f"pretrained={qwen3},{QWEN3_ARGS}" for k in QWEN3_RUNS})
    ckpts.update({k: f"pretrained={gemma3},dtype=float32" for k in GEMMA3_RUNS})
    ckpts.update({k: f"pretrained={internvl},dtype=float32,max_patches=6" for k in INTERNVL_RUNS})
    configs = []
    for key, (model, args, simple) in ALL_RUNS.items():
        ckpt = ckpts.get(key, f"pretrained={tiny_ckpt}")
        for bs in (1, 3):
            run = {"model": model, "model_args": f"{ckpt},{args}", "tasks": "tiny_batch", "batch_size": bs}
            run.update(include_path=str(TASKS), output_path=str(root / f"{key}_bs{bs}"))
            if simple:
                run["force_simple"] = True
            configs.append(run)
    configs.append(
        {
            "model": "llava_pm",
            "model_args": f"pretrained={tiny_ckpt},refresh=every_token",
            "tasks": "tiny_batch",
            "batch_size": 2,
            "include_path": str(TASKS),
            "output_path": str(root / "pm_bs2"),
        }
    )
    log = run_lmms_eval_many(configs, root / "runs.yaml", cwd=REPO, timeout=1500)
    return root, log


@pytest.mark.parametrize("key", list(ALL_RUNS))
def test_batch_of_three_answers_like_batch_one(runs, key):
    root, log = runs
    answers = {}
    for bs in (1, 3):
        assert results_of(root / f"{key}_bs{bs}") is not None, log[-3000:]
        answers[bs] = [s["filtered_resps"] for s in read_samples(root / f"{key}_bs{bs}", "tiny_batch")]
    assert len(answers[1]) == 7 and all(a[0] for a in answers[1])
    assert answers[3] == answers[1]


def test_batched_runs_really_batched_and_pm_refuses(runs):
    root, log = runs
    assert "Model Responding (batched)" in log  # the llava_* and internvl_hf_* names went through batching.py
    assert results_of(root / "pm_bs2") is None
    assert "llava_pm: batch_size=2 is not supported" in log and "refresh=every_token decodes token by token" in log
