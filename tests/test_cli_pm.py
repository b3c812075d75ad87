"""llava_pm end to end through the real lmms-eval CLI (offline): chat and simple paths, saved
visuals under --output_path, an image-free task, and the ShapeWorld checkpoint."""

from pathlib import Path

import pytest
from conftest import REPO

from lmms_eval_plugins.testing import read_samples, run_lmms_eval


def _run(model, args, tasks, out, extra=(), include_path="tests/tasks"):
    return run_lmms_eval(model, args, tasks, out, include_path=include_path, extra=extra, cwd=REPO)


def test_llava_pm_off_answers_like_llava_hf(tiny_ckpt, tmp_path):
    """alpha=0 gives a uniform map, i.e. the identity resampling; view=crop is what the tiny
    checkpoint's centre-cropping processor shows, so the answers must be llava_hf's."""
    base, log = _run("llava_hf", f"pretrained={tiny_ckpt},device=cpu,device_map=cpu", "tiny_yesno", tmp_path / "hf")
    assert base is not None, log[-3000:]
    results, log = _run("llava_pm", f"pretrained={tiny_ckpt},alpha=0,view=crop", "tiny_yesno", tmp_path / "pm")
    assert results is not None, log[-3000:]
    assert results["config"]["model_backend"].endswith("LlavaPmChat (chat)")
    got = [s["filtered_resps"] for s in read_samples(tmp_path / "pm", "tiny_yesno")]
    want = [s["filtered_resps"] for s in read_samples(tmp_path / "hf", "tiny_yesno")]
    assert len(got) == 3 and got == want


def test_llava_pm_chat_simple_visuals_and_no_image(tiny_ckpt, tmp_path):
    out = tmp_path / "chat"
    results, log = _run(
        "llava_pm", f"pretrained={tiny_ckpt},preset=mme,save_visuals=auto,max_visuals=2", "tiny_yesno,tiny_noimage", out
    )
    assert results is not None, log[-3000:]
    assert 0.0 <= results["results"]["tiny_yesno"]["exact,none"] <= 1.0
    assert '"alpha": 10.0' in log and '"kernel": 3' in log  # the preset was resolved and logged
    for task in ("tiny_yesno", "tiny_noimage"):
        samples = read_samples(out, task)
        assert len(samples) == 3 and all(s["filtered_resps"][0].strip() for s in samples), task
    visuals = out / "visuals" / "llava_pm"
    assert sorted(p.name for p in visuals.glob("*.png")) == [
        f"{i:04d}_{k}.png" for i in range(2) for k in ("magnified", "original", "perception_map")
    ]

    results, log = _run(
        "llava_pm",
        f"pretrained={tiny_ckpt},refresh=every_token",
        "tiny_yesno_ll,tiny_yesno",
        tmp_path / "simple",
        ["--force_simple"],
    )
    assert results is not None, log[-3000:]
    assert results["config"]["model_backend"].endswith("LlavaPm (simple)")
    assert results["n-samples"]["tiny_yesno_ll"]["effective"] == 3
    assert 0.0 <= results["results"]["tiny_yesno_ll"]["acc,none"] <= 1.0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"kernel": 4}, "kernel=4 must be a positive odd number"),
        ({"refresh": "sometimes"}, "one of once, every_token, every_n"),
        ({"deep_layer": 9}, r"deep_layer=9 is outside the model's layers 1..4"),
        ({"preset": "chair"}, "unknown preset 'chair'; valid: pope, mme"),
    ],
)
def test_bad_model_args_fail_at_construction(tiny_ckpt, kwargs, message):
    from lmms_eval_plugins.models.pm import LlavaPmChat

    with pytest.raises(ValueError, match=message):
        LlavaPmChat(pretrained=str(tiny_ckpt), **kwargs)


def _shapeworld_ready() -> str | None:
    """Why the ShapeWorld run cannot happen yet (None when it can)."""
    try:
        from lmms_eval_plugins.shapeworld import resolve_pretrained

        ckpt = Path(resolve_pretrained("shapeworld-tiny"))
    except Exception as e:  # the testbed (issue 3) has not landed
        return f"shapeworld-tiny is not available: {e}"
    if not (ckpt / "config.json").exists():
        return f"shapeworld-tiny has no checkpoint at {ckpt}"
    if not list((REPO / "task_configs").rglob("shapeworld_pope_adversarial*.yaml")):
        return "task_configs has no shapeworld_pope_adversarial task"
    return None


@pytest.mark.skipif(_shapeworld_ready() is not None, reason=str(_shapeworld_ready()))
def test_llava_pm_on_shapeworld_tiny(tmp_path):
    results, log = _run(
        "llava_pm",
        "pretrained=shapeworld-tiny,save_visuals=auto,max_visuals=1",
        "shapeworld_pope_adversarial",
        tmp_path,
        extra=["--limit", "8"],
        include_path="task_configs",
    )
    assert results is not None, log[-3000:]
    metrics = results["results"]["shapeworld_pope_adversarial"]
    numeric = {k: v for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k}
    assert numeric and all(0.0 <= v <= 100.0 for v in numeric.values()), metrics
    assert all(s["filtered_resps"] for s in read_samples(tmp_path, "shapeworld_pope_adversarial"))
    assert (tmp_path / "visuals" / "llava_pm" / "0000_magnified.png").exists()


def _pm_official_utils():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "pm_official_utils", REPO / "task_configs" / "pm_official" / "utils.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_paper_scoring_helpers():
    """first-token answer from (loss, greedy) pairs (ties answer "no"), the 8 official MME subsets."""
    u = _pm_official_utils()
    assert u.first_token_answer([(0.1, True), (0.7, False)]) == "yes"
    assert u.first_token_answer([(0.7, False), (0.1, True)]) == "no"
    assert u.first_token_answer([0.5, 0.5]) == "no"
    assert len(u.MME_SUBSETS) == 8 and "artwork" not in u.MME_SUBSETS
    assert (
        u.pope_doc_to_text({"question": "Is there a dog in the image? "})
        == "Is there a dog in the image? Please answer this question with one word."
    )


@pytest.mark.skipif(_shapeworld_ready() is not None, reason=str(_shapeworld_ready()))
def test_paper_evaluation_tasks_on_shapeworld_twins(tmp_path):
    """First-token POPE and the 8-subset MME task (their ShapeWorld twins) through the real CLI,
    with preset=official_pope on the simple (loglikelihood) path."""
    tasks = "shapeworld_pope_adversarial_first_token,shapeworld_mme_first_token"
    results, log = _run(
        "llava_pm",
        "pretrained=shapeworld-tiny,preset=official_pope",
        tasks,
        tmp_path,
        extra=["--limit", "4", "--force_simple"],
        include_path="task_configs/pm_official",
    )
    assert results is not None, log[-3000:]
    pope = results["results"]["shapeworld_pope_adversarial_first_token"]
    assert 0.0 <= pope["pope_accuracy,none"] <= 1.0 and "pope_f1_score,none" in pope
    assert 0.0 <= results["results"]["shapeworld_mme_first_token"]["mme_perception_score,none"] <= 200.0
    import ast

    def parsed(v):  # the sample log stores these as their Python repr
        return ast.literal_eval(v) if isinstance(v, str) else v

    samples = read_samples(tmp_path, "shapeworld_pope_adversarial_first_token")
    assert len(samples) == 4
    for s in samples:
        (loss_yes, _), (loss_no, _) = parsed(s["filtered_resps"])
        assert parsed(s["pope_accuracy"])["prediction"] == ("yes" if float(loss_yes) < float(loss_no) else "no")


@pytest.mark.skipif(_shapeworld_ready() is not None, reason=str(_shapeworld_ready()))
@pytest.mark.parametrize("model", ["llava_pai", "llava_paint", "llava_knockout", "llava_reprompt"])
def test_first_token_pope_twin_runs_on_the_other_wrappers(model, tmp_path):
    """The paper's first-token scoring is a task, not a PM feature: every wrapper with a
    loglikelihood path runs it (llava_lochead answers with boxes and refuses, llava_viral needs
    an adapter; stock llava_hf's loglikelihood is broken on transformers 5, see docs/architecture.md's quirks)."""
    task = "shapeworld_pope_adversarial_first_token"
    results, log = _run(
        model,
        "pretrained=shapeworld-tiny",
        task,
        tmp_path,
        extra=["--limit", "2", "--force_simple"],
        include_path="task_configs/pm_official",
    )
    assert results is not None, log[-3000:]
    assert 0.0 <= results["results"][task]["pope_accuracy,none"] <= 1.0
    assert len(read_samples(tmp_path, task)) == 2
