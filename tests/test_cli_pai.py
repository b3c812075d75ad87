"""End to end through the real lmms-eval CLI: llava_pai and llava_hf, chat and simple paths."""

import pytest
from conftest import REPO

from lmms_eval_plugins.testing import read_samples, run_lmms_eval


def _run(model, args, tasks, out, extra=()):
    return run_lmms_eval(model, args, tasks, out, include_path="tests/tasks", extra=extra, cwd=REPO)


@pytest.fixture(scope="module")
def baseline(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("llava_hf")
    results, log = _run("llava_hf", f"pretrained={tiny_ckpt},device=cpu,device_map=cpu", "tiny_yesno", out)
    assert results is not None, log[-3000:]
    return out


def test_idle_llava_pai_answers_exactly_like_llava_hf(tiny_ckpt, baseline, tmp_path):
    results, log = _run("llava_pai", f"pretrained={tiny_ckpt},alpha=0,use_cfg=false", "tiny_yesno", tmp_path)
    assert results is not None, log[-3000:]
    assert results["config"]["model_backend"].endswith("LlavaPaiChat (chat)")
    got = [s["filtered_resps"] for s in read_samples(tmp_path, "tiny_yesno")]
    want = [s["filtered_resps"] for s in read_samples(baseline, "tiny_yesno")]
    assert len(got) == 3 and got == want


def test_llava_pai_chat_and_simple_paths(tiny_ckpt, baseline, tmp_path):
    results, log = _run("llava_pai", f"pretrained={tiny_ckpt},alpha=2.0,start_layer=0", "tiny_yesno", tmp_path / "chat")
    assert results is not None, log[-3000:]
    assert 0.0 <= results["results"]["tiny_yesno"]["exact,none"] <= 1.0
    assert all(s["filtered_resps"] for s in read_samples(tmp_path / "chat", "tiny_yesno"))
    assert '"alpha": 2.0' in log and '"layers": "0..3"' in log  # the parsed recipe was logged and used

    results, log = _run(
        "llava_pai",
        f"pretrained={tiny_ckpt},alpha=0.5,use_cfg=true",
        "tiny_yesno_ll,tiny_yesno",
        tmp_path / "simple",
        ["--force_simple"],
    )
    assert results is not None, log[-3000:]
    assert results["config"]["model_backend"].endswith("LlavaPai (simple)")
    assert 0.0 <= results["results"]["tiny_yesno_ll"]["acc,none"] <= 1.0
    assert results["n-samples"]["tiny_yesno_ll"]["effective"] == 3


def test_llava_pai_preset_official(tiny_ckpt, tmp_path):
    """preset=official (CFG gamma 1.1, unboosted first token, the official quirks) through the real CLI,
    with beam search (the official code repeats the image-free prompt per beam)."""
    results, log = _run(
        "llava_pai", f"pretrained={tiny_ckpt},preset=official", "tiny_yesno", tmp_path, ["--gen_kwargs", "num_beams=2"]
    )
    assert results is not None, log[-3000:]
    assert '"official_quirks": true' in log and '"gamma": 1.1' in log and '"use_cfg": true' in log
    assert all(s["filtered_resps"] for s in read_samples(tmp_path, "tiny_yesno"))


def test_no_image_task_fails_loudly(tiny_ckpt, tmp_path):
    results, log = _run("llava_pai", f"pretrained={tiny_ckpt}", "tiny_noimage", tmp_path)
    assert results is None
    assert "needs exactly one image per request, but this request has 0" in log


def test_unknown_model_arg_fails_loudly(tiny_ckpt, tmp_path):
    results, log = _run("llava_pai", f"pretrained={tiny_ckpt},alhpa=0.3", "tiny_yesno", tmp_path)
    assert results is None
    assert "unknown model_args alhpa" in log
