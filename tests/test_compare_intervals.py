"""Paired intervals and McNemar p-values in `lmms-plugins compare`, checked against independent
calculations, and the table on made-up lmms-eval output directories (the layout `--log_samples`
writes: <out>/<model>/<date>_results.json beside <date>_samples_<task>.jsonl)."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from lmms_eval_plugins import cli
from lmms_eval_plugins.shapeworld.metrics import (
    pope_aggregate_accuracy,
    pope_aggregate_f1_score,
    pope_scores,
)
from lmms_eval_plugins.stats import mcnemar_p, paired_interval, verdict

REPO = Path(__file__).resolve().parents[1]
POPE = "shapeworld_pope_random"
POPE_METRICS = ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio")


def pope_records(truth: str, answers: str) -> list[dict]:
    """Per-document POPE records as the task logs them; ``truth``/``answers``: 'y'/'n' per document."""
    word = {"y": "yes", "n": "no"}
    return [
        {"question_id": f"q{i}", "score": float(a == t), "prediction": word[a], "ground_truth": word[t]}
        for i, (t, a) in enumerate(zip(truth, answers))
    ]


def flip(answers: str, docs) -> str:
    return "".join(("n" if a == "y" else "y") if i in docs else a for i, a in enumerate(answers))


TRUTH = "yn" * 30  # 60 documents
BASE = flip(TRUTH, range(0, 60, 4))  # 15 wrong


# --------------------------------------------------------------------------- McNemar


def mcnemar_by_hand(b: int, c: int) -> float:
    """Exact two-sided McNemar: twice the smaller binomial tail of Binomial(b + c, 1/2), at most 1."""
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n)


@pytest.mark.parametrize("b, c", [(7, 2), (2, 7), (10, 10), (0, 6), (1, 0), (25, 12)])
def test_mcnemar_p_is_the_exact_binomial_test_on_discordant_documents(b, c):
    # a 2x2 table: 30 right in both, b right only in base, c right only in other, 5 wrong in both
    base = [1] * 30 + [1] * b + [0] * c + [0] * 5
    other = [1] * 30 + [0] * b + [1] * c + [0] * 5
    assert mcnemar_p(base, other) == pytest.approx(mcnemar_by_hand(b, c), rel=1e-12)


def test_mcnemar_p_is_1_without_discordant_documents():
    assert mcnemar_p([1, 0, 1], [1, 0, 1]) == 1.0


# --------------------------------------------------------------------------- bootstrap


def test_paired_interval_is_the_percentile_of_paired_document_resamples():
    # F1 is no mean of per-document values: every resample is re-scored as a whole
    base, other = pope_records(TRUTH, BASE), pope_records(TRUTH, flip(BASE, range(0, 40, 4)))
    low, high = paired_interval(pope_aggregate_f1_score, base, other, n_resamples=500, seed=3)

    # by hand: the same seeded draws of document indices, one index set for both runs
    rows = np.random.default_rng(3).integers(0, len(base), (500, len(base)))
    deltas = [
        pope_aggregate_f1_score([other[i] for i in r]) - pope_aggregate_f1_score([base[i] for i in r]) for r in rows
    ]
    assert (low, high) == pytest.approx(tuple(np.quantile(deltas, [0.025, 0.975])), abs=1e-12)
    assert low < pope_aggregate_f1_score(other) - pope_aggregate_f1_score(base) < high


def test_paired_interval_of_a_mean_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    base = rng.normal(0.0, 1.0, 400)
    other = base + rng.normal(0.3, 0.5, 400)  # paired: the shared per-document spread cancels
    low, high = paired_interval(np.mean, base, other)
    d = other - base
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    assert low == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert high == pytest.approx(d.mean() + half, abs=0.15 * half)
    # unpaired, the interval would be about as wide as the per-document spread of 1 allows
    assert high - low < 0.15


def test_paired_interval_is_reproducible_with_its_seed():
    base, other = pope_records(TRUTH, BASE), pope_records(TRUTH, flip(BASE, [0, 4, 1]))
    assert paired_interval(pope_aggregate_accuracy, base, other) == paired_interval(
        pope_aggregate_accuracy, base, other
    )


# --------------------------------------------------------------------------- verdict


def test_verdict_rule_on_made_up_per_sample_logs():
    base = pope_records(TRUTH, BASE)
    better = pope_records(TRUTH, flip(BASE, range(0, 48, 4)))  # 12 of the 15 errors fixed
    worse = pope_records(TRUTH, flip(BASE, range(1, 36, 2)))  # 18 new errors
    same = pope_records(TRUTH, flip(BASE, [0, 1, 4, 5]))  # 2 fixed, 2 broken

    assert verdict(+1, *paired_interval(pope_aggregate_accuracy, base, better)) == "reproduced"
    assert verdict(+1, *paired_interval(pope_aggregate_accuracy, base, worse)) == "opposite"
    low, high = paired_interval(pope_aggregate_accuracy, base, same)
    assert low < 0 < high
    assert verdict(+1, low, high) == f"no effect detected (+-{(high - low) / 2:.3g})"
    # a metric the paper wants lower (e.g. CHAIR): the same intervals read the other way
    assert verdict(-1, *paired_interval(pope_aggregate_accuracy, base, better)) == "opposite"
    assert verdict(-1, *paired_interval(pope_aggregate_accuracy, base, worse)) == "reproduced"


def test_verdict_needs_a_direction():
    with pytest.raises(ValueError):
        verdict(0, 0.1, 0.2)


# --------------------------------------------------------------------------- compare, end to end


def write_run(out, model, answers, *, samples=True, tamper=None, date="20261204_120000"):
    """An lmms-eval output directory for one POPE task, scored by the task's own aggregation."""
    records = pope_records(TRUTH, answers)
    scores = pope_scores([(r["prediction"], r["ground_truth"]) for r in records])
    scores.update(tamper or {})
    d = out / model / "checkpoints__shapeworld-tiny"
    d.mkdir(parents=True)
    results = {
        "results": {
            POPE: {
                "alias": POPE,
                **{f"{m},none": scores[m] for m in POPE_METRICS},
                **{f"{m}_stderr,none": "N/A" for m in POPE_METRICS},
            }
        },
        "n-samples": {POPE: {"original": 300, "effective": len(records)}},
        "config": {
            "model": model,
            "model_args": "pretrained=/x,device=cpu" + (",alpha=0.5" if model != "llava_hf" else ""),
        },
    }
    (d / f"{date}_results.json").write_text(json.dumps(results))
    if samples:
        # lmms-eval writes the samples in its own order, not necessarily by doc_id: pairing must use doc_id
        order = list(range(len(records)))[::-1] if model != "llava_hf" else range(len(records))
        lines = [
            {
                "doc_id": i,
                "target": records[i]["ground_truth"],
                "filtered_resps": records[i]["prediction"],
                **{m: records[i] for m in POPE_METRICS},
            }
            for i in order
        ]
        (d / f"{date}_samples_{POPE}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return out / model


def rows_of(text: str) -> dict[str, list[str]]:
    return {
        cells[1]: cells
        for cells in (
            [c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines()
            if line.startswith(f"| {POPE}")
        )
    }


def test_compare_prints_intervals_and_mcnemar_from_per_sample_logs(tmp_path, capsys):
    fixed = list(range(0, 48, 4))  # 12 base errors fixed, 1 new error
    other_answers = flip(BASE, fixed + [1])
    base = write_run(tmp_path, "llava_hf", BASE)
    other = write_run(tmp_path, "llava_pai", other_answers)
    md = tmp_path / "table.md"
    assert cli.main(["compare", str(base), str(other), "--markdown", str(md)]) == 0
    text = capsys.readouterr().out
    assert md.read_text().strip() == text.strip()
    rows = rows_of(text)

    acc = rows["pope_accuracy"]  # task, metric, n, base, other, delta, CI, p, paper
    assert acc[5] == f"{11 / 60:+.4f}*"  # 45 -> 56 of 60 right
    low, high = paired_interval(pope_aggregate_accuracy, pope_records(TRUTH, BASE), pope_records(TRUTH, other_answers))
    assert acc[6] == f"[{low:+.4f}, {high:+.4f}]" and low > 0
    assert float(acc[7]) == pytest.approx(mcnemar_by_hand(1, 12), rel=1e-3)  # base right only: 1, other only: 12
    f1 = rows["pope_f1_score"]
    assert (
        re.fullmatch(r"\[[-+]\d\.\d{4}, [-+]\d\.\d{4}\]", f1[6]) and f1[7] == ""
    )  # interval, no McNemar (not an accuracy)
    assert "No interval" not in text


def test_compare_without_per_sample_logs_says_so_and_prints_no_interval(tmp_path, capsys):
    base = write_run(tmp_path, "llava_hf", BASE)
    other = write_run(tmp_path, "llava_pai", flip(BASE, range(0, 48, 4)), samples=False)
    assert cli.main(["compare", str(base), str(other)]) == 0
    text = capsys.readouterr().out
    assert all(r[6] == "" and r[7] == "" and not r[5].endswith("*") for r in rows_of(text).values())
    assert (
        f"No interval for llava_pai(alpha=0.5) on {POPE} ({', '.join(sorted(POPE_METRICS))}): no per-sample log (run lmms-eval with --log_samples)."
        in text
    )


def test_compare_gives_no_interval_when_the_logs_do_not_give_the_reported_number(tmp_path, capsys):
    base = write_run(tmp_path, "llava_hf", BASE)
    other = write_run(tmp_path, "llava_pai", flip(BASE, [0]), tamper={"pope_f1_score": 0.5})
    assert cli.main(["compare", str(base), str(other)]) == 0
    text = capsys.readouterr().out
    rows = rows_of(text)
    assert rows["pope_f1_score"][6] == "" and rows["pope_accuracy"][6] != ""
    assert "(pope_f1_score): its aggregation of the logged records gives" in text


def test_compare_on_real_lmms_eval_output(capsys):
    """tests/fixtures/compare_run: the output directories of `lmms-plugins compare --run llava_pai
    --model_args alpha=0.5 --tasks shapeworld_pope_random,shapeworld_chair,shapeworld_rec --limit 12`
    (lmms-eval 0.7.3, shapeworld-tiny, CPU). Every metric of POPE, CHAIR and REC is re-scored exactly
    from the logged records, so every delta gets its interval."""
    runs = REPO / "tests" / "fixtures" / "compare_run"
    assert cli.main(["compare", str(runs / "llava_hf"), str(runs / "llava_pai")]) == 0
    text = capsys.readouterr().out
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| shapeworld_")
    ]
    assert len(rows) == 5 + 3 + 7 and "No interval" not in text
    assert all(re.fullmatch(r"\[[-+]\d+\.\d{4}, [-+]\d+\.\d{4}\]", r[6]) for r in rows)
    assert {r[1] for r in rows if r[7]} == {
        "pope_accuracy",
        *(f"refcoco_ACC@{t}" for t in (0.1, 0.3, 0.5, 0.7, 0.9)),
        "refcoco_Center_ACC",
    }

    # CHAIR_S by hand: the same seeded paired resamples of the logged captions, scored by the task's function
    from lmms_eval_plugins.shapeworld.metrics import chair_scores

    def logged(name):  # doc_id -> the record lmms-eval logged for CHAIR_S
        path = next((runs / name).rglob("*_samples_shapeworld_chair.jsonl"))
        return {r["doc_id"]: r["coco_cap_chair_s"] for r in map(json.loads, path.read_text().splitlines())}

    base, other = logged("llava_hf"), logged("llava_pai")

    def chair_s(records):
        return chair_scores([(" ".join(r["pred"]), r["answer"]) for r in records])["coco_cap_chair_s"]

    draws = np.random.default_rng(0).integers(0, 12, (2000, 12))
    deltas = [chair_s([other[i] for i in d]) - chair_s([base[i] for i in d]) for d in draws]
    low, high = np.quantile(deltas, [0.025, 0.975])
    assert next(r for r in rows if r[1] == "coco_cap_chair_s")[6] == f"[{low:+.4f}, {high:+.4f}]"


@pytest.mark.parametrize(
    "model,model_args,baseline",
    [
        # the technique preprocesses as the class does: stock llava_hf, the class's own args carried over
        ("llava_pai", "alpha=0.5,dtype=float32", ("llava_hf", "device_map=cpu,dtype=float32")),
        ("llava_pai", "preset=official,image_backend=default", ("llava_hf", "device_map=cpu")),
        # preprocessing through a preset or given directly: the wrapper itself with baseline=true and that alone
        ("llava_pm", "preset=official_pope,precision=fp32", ("llava_pm", "baseline=true,image_backend=pil")),
        ("llava_fia", "preset=official", ("llava_fia", "baseline=true,image_backend=pil")),
        (
            "llava_knockout",
            "preset=official,device=cpu",
            ("llava_knockout", "baseline=true,image_backend=pil,pad_to_square=true"),
        ),
        (
            "llava_lochead",
            "preset=official_v2,image_backend=default",
            ("llava_lochead", "baseline=true,pad_to_square=true"),
        ),
        ("llava_pai", "alpha=0.5,pad_to_square=true", ("llava_pai", "baseline=true,pad_to_square=true")),
        # another family: its own stock class; an argument that class lacks (dtype: ours) makes it the wrapper
        ("qwen2_5_vl_pai", "alpha=0.5,max_pixels=20000", ("qwen2_5_vl", "device_map=cpu,max_pixels=20000")),
        ("qwen2_5_vl_pai", "alpha=0.5,dtype=float32", ("qwen2_5_vl_pai", "baseline=true,dtype=float32")),
    ],
)
def test_compare_run_picks_a_baseline_with_the_techniques_preprocessing(model, model_args, baseline):
    """compare --run's baseline sees the technique's pixels: stock llava_hf when the technique's resolved
    pad_to_square / image_backend are the class's own, else the wrapper with baseline=true and them."""
    from lmms_eval_plugins.commands.compare import baseline_run, model_label

    assert baseline_run(model, model_args, "cpu") == baseline
    label = model_label({"config": {"model": baseline[0], "model_args": f"pretrained=/x,device=cpu,{baseline[1]}"}})
    assert ("baseline (no technique" in label) is ("baseline=true" in baseline[1])
    with pytest.raises(ValueError, match="unknown model_args alhpa"):
        baseline_run(model, model_args + ",alhpa=1", "cpu")
