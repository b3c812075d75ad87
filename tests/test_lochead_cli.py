"""llava_lochead and `lmms-plugins discover-heads` end to end: the real lmms-eval CLI on a
tiny REC task scored by lmms-eval's own refcoco_bbox_rec parser and metrics."""

import json

import pytest
from conftest import REPO

from lmms_eval_plugins.testing import read_samples, run_lmms_eval

REC_METRICS = ("refcoco_IoU,none", "refcoco_ACC@0.5,none", "refcoco_Center_ACC,none")


@pytest.fixture(scope="module")
def byte_ckpt(tmp_path_factory):
    from _lochead_tiny import build_byte_level_llava

    return build_byte_level_llava(tmp_path_factory.mktemp("lochead_cli_byte"))


def _check_rec_results(results, out):
    from lmms_eval.tasks.refcoco.utils_rec import parse_float_sequence_within

    assert results is not None
    for key in REC_METRICS:
        assert 0.0 <= results["results"]["tiny_rec"][key] <= 1.0
    samples = read_samples(out, "tiny_rec")
    assert len(samples) == 4
    for s in samples:
        answer = s["filtered_resps"] if isinstance(s["filtered_resps"], str) else s["filtered_resps"][0]
        box = parse_float_sequence_within(answer)
        assert box != [0, 0, 0, 0] and answer.strip() == "[" + ", ".join(f"{v:.2f}" for v in box) + "]"
        assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
        assert s["refcoco_IoU"]["pred"] == box  # lmms-eval's parser read exactly our box


def test_heads_auto_discovers_caches_and_answers_through_the_chat_path(byte_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("LMMS_PLUGINS_CACHE", str(tmp_path / "cache"))
    args = f"pretrained={byte_ckpt},heads=auto,discover_task=tiny_rec,discover_n=3,discover_repeats=1,include_path=tests/tasks,save_visuals={tmp_path / 'vis'},max_visuals=2"
    results, log = run_lmms_eval(
        "llava_lochead", args, "tiny_rec", tmp_path / "out", include_path="tests/tasks", cwd=REPO
    )
    assert results is not None, log[-3000:]
    assert results["config"]["model_backend"].endswith("LlavaLocheadChat (chat)")
    _check_rec_results(results, tmp_path / "out")
    cached = list((tmp_path / "cache" / "heads").glob("*tiny_rec-train-n3-s0-*.json"))
    assert len(cached) == 1
    doc = json.loads(cached[0].read_text())
    assert doc["task"] == "tiny_rec" and doc["split"] == "train" and doc["n_samples"] == 3
    assert (
        '"heads_used": ["L%dH%d"' % (doc["heads"][0]["layer"], doc["heads"][0]["head"]) in log
    )  # top heads from the file
    assert sorted(p.name for p in (tmp_path / "vis").iterdir()) == ["discovery", "lochead_0000.png", "lochead_0001.png"]
    assert (tmp_path / "vis" / "discovery" / "s_img_curve.png").is_file()  # the S_img curve with its knee


def test_heads_file_through_the_simple_path(byte_ckpt, tmp_path):
    from methods.lochead_heads import write_heads_file

    heads = tmp_path / "heads.json"
    write_heads_file(
        heads,
        [{"layer": 2, "head": 1}, {"layer": 0, "head": 3}],
        model_id=str(byte_ckpt),
        num_layers=4,
        num_heads=4,
        source="test",
    )
    args = f"pretrained={byte_ckpt},heads={heads},top_k=2,box_mode=minmax"
    results, log = run_lmms_eval(
        "llava_lochead",
        args,
        "tiny_rec",
        tmp_path / "out",
        include_path="tests/tasks",
        extra=["--force_simple"],
        cwd=REPO,
    )
    assert results is not None, log[-3000:]
    assert results["config"]["model_backend"].endswith("LlavaLochead (simple)")
    _check_rec_results(results, tmp_path / "out")
    assert '"heads_used": ["L2H1", "L0H3"]' in log and '"box_mode": "minmax"' in log


def test_discover_heads_command(byte_ckpt, tmp_path, monkeypatch, capsys):
    from lmms_eval_plugins.cli import main

    monkeypatch.setenv("LMMS_PLUGINS_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(REPO)  # the tiny task's data_files are relative to the repository
    argv = [
        "discover-heads",
        "--pretrained",
        str(byte_ckpt),
        "--task",
        "tiny_rec",
        "--include-path",
        "tests/tasks",
        "--n",
        "4",
        "--repeats",
        "1",
    ]
    out_file = tmp_path / "heads.json"
    assert main([*argv, "--output", str(out_file), "--save-visuals", str(tmp_path / "vis"), "--max-visuals", "1"]) == 0
    printed = capsys.readouterr().out
    assert "heads file:" in printed and "rank  layer  head  frequency" in printed
    doc = json.loads(out_file.read_text())
    assert doc["n_samples"] == 4 and doc["num_layers"] == 4 and doc["num_heads"] == 4 and doc["heads"]
    assert all(0 < h["frequency"] <= 1 for h in doc["heads"])
    names = sorted(p.name for p in (tmp_path / "vis").iterdir())
    assert names == ["s_img_curve.png", "sample000_heads.png", "sample000_s_img.png"]
    # the same request again is served from the cache, identical
    assert main([*argv, "--output", str(tmp_path / "again.json")]) == 0
    assert "cached result:" in capsys.readouterr().out
    assert json.loads((tmp_path / "again.json").read_text()) == doc
    # a task without a training split needs an explicit split
    assert (
        main(
            ["discover-heads", "--pretrained", str(byte_ckpt), "--task", "tiny_yesno", "--include-path", "tests/tasks"]
        )
        == 2
    )
    assert "declares no training split" in capsys.readouterr().out


def test_preset_official_v2_through_the_chat_path(byte_ckpt, tmp_path):
    """preset=official_v2: the official prompt, each request's own top heads (9ffe219's selection), its stretched box."""
    args = f"pretrained={byte_ckpt},preset=official_v2"
    results, log = run_lmms_eval(
        "llava_lochead", args, "tiny_rec", tmp_path / "out", include_path="tests/tasks", cwd=REPO
    )
    assert results is not None, log[-3000:]
    assert '"heads_used": "self"' in log and '"selection": "official_v2"' in log and '"prompt": "official"' in log
    _check_rec_results(results, tmp_path / "out")


def test_pad_to_square_through_the_cli(byte_ckpt, tmp_path):
    """pad_to_square=true (the base wrapper's option): the processor gets squares, the box comes back in original fractions."""
    from methods.lochead_heads import write_heads_file

    heads = tmp_path / "heads.json"
    write_heads_file(
        heads, [{"layer": 2, "head": 1}], model_id=str(byte_ckpt), num_layers=4, num_heads=4, source="test"
    )
    args = f"pretrained={byte_ckpt},heads={heads},top_k=1,pad_to_square=true"
    results, log = run_lmms_eval(
        "llava_lochead", args, "tiny_rec", tmp_path / "out", include_path="tests/tasks", cwd=REPO
    )
    assert results is not None, log[-3000:]
    _check_rec_results(results, tmp_path / "out")
