"""End to end through lmms-eval: llava_knockout (CLI, and the knockout-sweep subcommand on the Python API)
and llava_reprompt (CLI: compressed on the chat path, prune on the simple path)."""

import csv
import json

from conftest import REPO
from PIL import Image

from lmms_eval_plugins.testing import read_samples, run_lmms_eval


def _run(model, args, tasks, out, extra=()):
    return run_lmms_eval(model, args, tasks, out, include_path="tests/tasks", extra=extra, cwd=REPO)


def _llava_hf_answers(ckpt, task):
    """Plain llava_hf (chat) through lmms-eval's Python API, in process."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models.chat.llava_hf import LlavaHf
    from lmms_eval.tasks import TaskManager

    lm = LlavaHf(pretrained=str(ckpt), device="cpu", device_map="cpu")
    res = simple_evaluate(
        model=lm,
        tasks=[task],
        task_manager=TaskManager("WARNING", include_path=str(REPO / "tests/tasks"), include_defaults=False),
        bootstrap_iters=0,
    )
    answers = [s["filtered_resps"] for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])]
    return [a[0] if isinstance(a, list) else a for a in answers]  # the samples file stores the filtered answer itself


def test_knockout_empty_window_through_the_cli_is_llava_hf(tiny_ckpt, tmp_path, monkeypatch):
    results, log = _run(
        "llava_knockout", f"pretrained={tiny_ckpt},mode=both,from_layer=2,to_layer=2", "tiny_yesno", tmp_path
    )
    assert results is not None, log[-3000:]
    assert results["config"]["model_backend"].endswith("LlavaKnockoutChat (chat)")
    assert '"layers": "none"' in log
    got = [s["filtered_resps"] for s in read_samples(tmp_path, "tiny_yesno")]
    monkeypatch.chdir(REPO)  # the task's data_files path is relative to the repository
    assert len(got) == 3 and got == _llava_hf_answers(tiny_ckpt, "tiny_yesno")


def test_knockout_sweep_writes_table_and_plot(tiny_ckpt, tmp_path, monkeypatch):
    from lmms_eval_plugins.cli import main

    monkeypatch.chdir(REPO)
    out = tmp_path / "sweep"
    code = main(
        [
            "knockout-sweep",
            "--model_args",
            f"pretrained={tiny_ckpt}",
            "--tasks",
            "tiny_yesno",
            "--windows",
            "0:2,2:4,after:1",
            "--modes",
            "query,generated",
            "--include_path",
            "tests/tasks",
            "--output_dir",
            str(out),
            "--limit",
            "2",
        ]
    )
    assert code == 0
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(r["mode"], r["window"]) for r in rows] == [
        ("query", "0:2"),
        ("query", "2:4"),
        ("query", "after:1"),
        ("generated", "0:2"),
        ("generated", "2:4"),
        ("generated", "after:1"),
    ]
    by = {(r["mode"], r["window"]): r["value"] for r in rows}
    # the official named window after:1 (layers > 1) is layers 2..3 of this 4-layer model
    assert all(by[(m, "after:1")] == by[(m, "2:4")] for m in ("query", "generated"))
    assert all(r["metric"] == "exact" and 0 <= float(r["value"]) <= 1 for r in rows)
    assert "| 0:2 |" in (out / "sweep.md").read_text()
    png = Image.open(out / "sweep_tiny_yesno_exact.png")
    assert png.size == (720, 440) and len(png.getcolors(10_000)) > 3  # lines were drawn
    assert (
        main(
            [
                "knockout-sweep",
                "--model_args",
                f"pretrained={tiny_ckpt}",
                "--tasks",
                "tiny_yesno",
                "--windows",
                "0:9",
                "--output_dir",
                str(out),
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "knockout-sweep",
                "--model_args",
                f"pretrained={tiny_ckpt}",
                "--tasks",
                "tiny_yesno",
                "--windows",
                "after:x",
                "--output_dir",
                str(out),
            ]
        )
        == 2
    )


def test_reprompt_compressed_reuses_image_contexts_through_the_cli(tiny_ckpt, tmp_path):
    results, log = _run(
        "llava_reprompt", f"pretrained={tiny_ckpt},mode=compressed,keep_ratio=0.25", "tiny_repeat", tmp_path
    )
    assert results is not None, log[-3000:]
    samples = read_samples(tmp_path, "tiny_repeat")
    assert len(samples) == 5 and all(s["filtered_resps"] for s in samples)
    stats = json.loads((tmp_path / "reprompt_stats.json").read_text())
    # the chat path answers in doc order: red (full), red, blue (full), blue, red -> 3 answers from compressed contexts
    assert stats["requests"] == 5 and stats["compressed_answers"] == 3
    assert stats["kv_entries_compressed"] < stats["kv_entries_full"]


def test_reprompt_prune_on_the_simple_path(tiny_ckpt, tmp_path):
    results, log = _run(
        "llava_reprompt",
        f"pretrained={tiny_ckpt},mode=prune,keep_ratio=0.1",
        "tiny_yesno_ll,tiny_yesno",
        tmp_path,
        ["--force_simple"],
    )
    assert results is not None, log[-3000:]
    assert results["config"]["model_backend"].endswith("LlavaReprompt (simple)")
    assert results["n-samples"]["tiny_yesno_ll"]["effective"] == 3
    assert 0.0 <= results["results"]["tiny_yesno_ll"]["acc,none"] <= 1.0
    assert all(s["filtered_resps"] for s in read_samples(tmp_path, "tiny_yesno"))


def test_knockout_sweep_outside_keeps_its_reference_unedited(tiny_ckpt, monkeypatch):
    """--outside inverts the swept windows, never the no-knockout reference (inverted, the empty
    window would block every layer and the deltas would be against a fully knocked-out model)."""
    import lmms_eval.evaluator

    from lmms_eval_plugins.commands import knockout_sweep

    blocked = []

    def fake_evaluate(model, tasks, **kwargs):  # records what each evaluation would block
        blocked.append(list(model.technique.layers))
        return {"results": {t: {"exact,none": 0.5} for t in tasks}}

    monkeypatch.setattr(lmms_eval.evaluator, "simple_evaluate", fake_evaluate)
    monkeypatch.chdir(REPO)
    rows = knockout_sweep.run_sweep(
        f"pretrained={tiny_ckpt}", ["tiny_yesno"], [(1, 3)], ["query"], outside=True, include_path="tests/tasks"
    )
    assert blocked == [[], [0, 3]]  # the reference: no layer; the window 1:3 inverted: layers 0 and 3
    assert rows[0]["outside"] is True and rows[0]["delta"] == 0.0
