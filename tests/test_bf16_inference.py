"""Every registered model name in dtype=bfloat16 through the real lmms-eval CLI (bf16 runs on CPU).

Tiny random checkpoints of each family (LLaVA-1.5, Qwen2.5-VL, LLaVA-NeXT, LLaVA-OneVision, Gemma 3, Qwen3-VL,
InternVL) answer two docs of a ShapeWorld task; the viral names merge a LoRA adapter with non-zero B (so the merge
itself runs in bf16). One lmms-eval process evaluates the whole list (``--config``). A run passes
when its results file has the task's metrics and generation ran for every doc; lmms-eval turns an
exception inside generation into an empty answer and an "Error ... in generating" log line, which
no run may have written.
Names that refuse a family refuse it with their reason, whatever the dtype (tested here too).
"""

import pytest
from conftest import REPO

from lmms_eval_plugins import testing
from lmms_eval_plugins.models import MODELS

POPE, REC = "shapeworld_pope_random", "shapeworld_rec"
METRIC = {POPE: "pope_accuracy,none", REC: "refcoco_IoU,none"}
QWEN_PIXELS = ",min_pixels=12544,max_pixels=20000"
QWEN3_PIXELS = ",min_pixels=4096,max_pixels=25600"  # testing.build_tiny_qwen3_vl's defaults
INTERNVL_TILES = ",max_patches=6"  # as tests/test_internvl.py's CLI test
TECHNIQUES = ("pai", "pm", "paint", "knockout", "reprompt", "viral")

# (run id, model name, checkpoint, extra model_args, task, refusal reason or None)
CASES = [
    *[(f"llava-{t}", f"llava_{t}", "llava", "", POPE, None) for t in TECHNIQUES],
    ("llava-lochead", "llava_lochead", "llava_byte", ",heads=all", REC, None),  # a box needs a byte-level tokenizer
    *[
        (f"qwen-{t}", f"qwen2_5_vl_{t}", "qwen", QWEN_PIXELS, POPE, "no CLS token" if t == "paint" else None)
        for t in TECHNIQUES
    ],
    ("qwen-lochead", "qwen2_5_vl_lochead", "qwen", QWEN_PIXELS + ",heads=all", REC, None),
    *[(f"next-{t}", f"llava_{t}", "next", "", POPE, None) for t in TECHNIQUES],
    *[
        (
            f"onevision-{t}",
            f"llava_{t}",
            "onevision",
            "",
            POPE,
            "SigLIP vision tower has no CLS token" if t == "paint" else None,
        )
        for t in TECHNIQUES
    ],
    *[
        (
            f"gemma3-{t}",
            f"gemma3_{t}",
            "gemma3",
            "",
            POPE,
            {"paint": "SigLIP vision tower has no CLS token", "pm": "both directions"}.get(t),
        )
        for t in TECHNIQUES
    ],
    ("gemma3-lochead", "gemma3_lochead", "gemma3", ",heads=all", REC, None),  # its tokenizer is byte-level
    *[
        (f"qwen3-{t}", f"qwen3_vl_{t}", "qwen3", QWEN3_PIXELS, POPE, "no CLS token" if t == "paint" else None)
        for t in TECHNIQUES
    ],
    ("qwen3-lochead", "qwen3_vl_lochead", "qwen3", QWEN3_PIXELS + ",heads=all", REC, None),
    *[
        (
            f"internvl-{t}",
            f"internvl_hf_{t}",
            "internvl",
            INTERNVL_TILES,
            POPE,
            "merge 4 patches" if t == "paint" else None,
        )
        for t in TECHNIQUES
    ],
    ("internvl-lochead", "internvl_hf_lochead", "internvl", INTERNVL_TILES + ",heads=all", REC, None),
]


def test_every_registered_name_is_covered():
    assert {c[1] for c in CASES} == set(MODELS)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from _lochead_tiny import build_byte_level_llava
    from peft import LoraConfig, get_peft_model
    from test_qwen import build_tiny_qwen
    from transformers import AutoModelForImageTextToText

    from methods.viral_setup import LM_TARGETS

    root = tmp_path_factory.mktemp("bf16")
    paths = {
        "llava": testing.build_tiny_llava(root / "llava"),
        "llava_byte": build_byte_level_llava(root / "llava_byte"),
        "qwen": build_tiny_qwen(root / "qwen"),
        "next": testing.build_tiny_llava_next(root / "next"),
        "onevision": testing.build_tiny_llava_onevision(root / "onevision"),
        "gemma3": testing.build_tiny_gemma3(root / "gemma3"),
        "qwen3": testing.build_tiny_qwen3_vl(root / "qwen3"),
        "internvl": testing.build_tiny_internvl(root / "internvl"),
    }
    # random B: the merged adapter changes the weights
    for family in ("llava", "qwen", "next", "onevision", "gemma3", "qwen3", "internvl"):
        model = AutoModelForImageTextToText.from_pretrained(paths[family])
        lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=LM_TARGETS)
        get_peft_model(model, lora).save_pretrained(root / f"{family}_adapter")
    return root, paths


@pytest.fixture(scope="module")
def evaluated(checkpoints):
    root, paths = checkpoints
    runs = []
    for run_id, name, ckpt, extra, task, _ in CASES:
        if name.endswith("_viral"):
            extra += f",adapter={root / (ckpt + '_adapter')}"
        runs.append(
            {
                "model": name,
                "model_args": f"pretrained={paths[ckpt]},dtype=bfloat16,device=cpu,device_map=cpu{extra}",
                "tasks": task,
                "limit": 2,
                "gen_kwargs": "max_new_tokens=8",
                "output_path": str(root / "out" / run_id),
                "include_path": str(REPO / "task_configs"),
            }
        )
    log = testing.run_lmms_eval_many(runs, root / "runs.yaml", cwd=REPO, timeout=1800)
    return root / "out", log


@pytest.mark.parametrize("run_id,name,ckpt,extra,task,refusal", CASES, ids=[c[0] for c in CASES])
def test_bfloat16_answers(evaluated, run_id, name, ckpt, extra, task, refusal):
    out, log = evaluated
    results = testing.results_of(out / run_id)
    if refusal:
        assert results is None and f"{name} does not support" in log and refusal in log
        return
    assert results is not None, log[-3000:]
    assert "dtype=bfloat16" in results["config"]["model_args"]
    assert 0.0 <= results["results"][task][METRIC[task]] <= 1.0
    # generation ran for every doc (a random tiny model may decode to special tokens only, so an
    # empty answer alone proves nothing; an exception is caught by the log test below)
    samples = testing.read_samples(out / run_id, task)
    assert len(samples) == 2, samples
    # lmms-eval's gemma3 records no token counts; it also catches no generation error, so its results exist
    # only when every doc generated
    assert all(s["token_counts"][0]["output_tokens"] >= 1 for s in samples if (s["token_counts"] or [None])[0]), samples


def test_no_generation_error_in_the_log(evaluated):
    """llava_hf turns an exception inside generation into an empty answer and logs "Error ... in
    generating": no run may have logged one."""
    _, log = evaluated
    errors = [line for line in log.splitlines() if "in generating" in line]
    assert not errors, errors[:5]
