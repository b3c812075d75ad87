"""bench/verdicts.py: each claim's delta, interval and verdict from two runs' per-sample logs, checked
against independent calculations on made-up runs (lmms-eval's results dict and per-sample records in
memory), and the claims and runs themselves checked against the tasks the plugin ships."""

import sys
from pathlib import Path

import pytest

from lmms_eval_plugins.commands.compare import Run
from lmms_eval_plugins.shapeworld.metrics import pope_aggregate_accuracy

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import verdicts as V  # noqa: E402

POPE3 = V.POPE


def pope_aggregation(task, metric, include_path):
    return pope_aggregate_accuracy if metric == "pope_accuracy" else None


def run(scores: dict[str, list[float]], sizes=None) -> Run:
    """A run whose per-sample POPE records have these scores per task (doc_id = index); every question
    is about a present object ("yes") of the size in ``sizes`` (default "large")."""
    samples, results = {}, {}
    for task, s in scores.items():
        records = [
            {
                "question_id": f"q{i}",
                "score": float(x),
                "prediction": "yes" if x else "no",
                "ground_truth": "yes",
                "size_class": (sizes or ["large"] * len(s))[i],
            }
            for i, x in enumerate(s)
        ]
        samples[task] = {i: {"doc_id": i, "pope_accuracy": r} for i, r in enumerate(records)}
        results[task] = {"pope_accuracy,none": pope_aggregate_accuracy(records)}
    return Run({"results": results}, None, samples)


def claim(**kw):
    base = dict(
        name="x",
        technique="llava_pm",
        base="b",
        other="o",
        tasks=POPE3,
        metric="pope_accuracy",
        direction=+1,
        claim="raises accuracy",
    )
    return V.Claim(**(base | kw))


def test_pooled_delta_is_the_difference_of_accuracies_over_every_record():
    n = 40
    base = {t: [i % 2 for i in range(n)] for t in POPE3}  # 50%
    other = {t: [1 if i % 4 else 0 for i in range(n)] for t in POPE3}  # 75%
    m = V.measure(claim(), run(base), run(other), find_aggregation=pope_aggregation)
    assert (m.base_value, m.other_value) == pytest.approx((0.5, 0.75))
    assert m.delta == pytest.approx(0.25)
    assert (m.n, m.records) == (n, 3 * n)  # a doc_id's three splits are one resampling unit
    assert m.interval[0] < 0.25 < m.interval[1]
    assert m.interval[0] > 0  # 10 of 40 docs better in all 3 splits, none worse: the interval excludes 0
    assert m.verdict(claim()) == "reproduced"
    assert m.verdict(claim(direction=-1)) == "opposite"


def test_no_difference_gives_no_effect_detected_and_a_zero_interval():
    scores = {t: [i % 3 == 0 for i in range(30)] for t in POPE3}
    m = V.measure(claim(), run(scores), run(scores), find_aggregation=pope_aggregation)
    assert m.delta == 0 and m.interval == (0.0, 0.0)
    assert m.verdict(claim()).startswith("no effect detected")


def test_subset_keeps_only_the_matching_documents():
    n = 20
    sizes = ["small" if i < 8 else "large" for i in range(n)]
    base = {t: [0] * 8 + [1] * 12 for t in POPE3}  # small: 0/8 right, large: 12/12
    other = {t: [1] * 8 + [0] * 12 for t in POPE3}  # small: 8/8, large: 0/12
    c = claim(subset=(("size_class", "small"),))
    m = V.measure(c, run(base, sizes), run(other, sizes), find_aggregation=pope_aggregation)
    assert (m.n, m.base_value, m.other_value) == (8, 0.0, 1.0)
    whole = V.measure(claim(), run(base, sizes), run(other, sizes), find_aggregation=pope_aggregation)
    assert whole.delta == pytest.approx(8 / 20 - 12 / 20)


def test_retain_claim_measures_other_minus_the_kept_share_of_base():
    base = {t: [1] * 50 for t in POPE3}
    other = {t: [1] * 49 + [0] for t in POPE3}  # keeps 98%
    c = claim(retain=0.96)
    m = V.measure(c, run(base), run(other), find_aggregation=pope_aggregation)
    assert m.delta == pytest.approx(0.98 - 0.96)
    assert "(kept 98%)" in V.measured_cell(c, m)


def test_a_log_that_does_not_reaggregate_to_the_reported_value_is_not_measured():
    scores = {t: [1, 0, 1, 1] for t in POPE3}
    bad = run(scores)
    bad.results["results"][POPE3[1]]["pope_accuracy,none"] = 0.1
    m = V.measure(claim(), run(scores), bad, find_aggregation=pope_aggregation)
    assert m.interval is None and "does not give the reported" in m.why
    assert m.verdict(claim()) == "not measured"


def test_table_says_which_run_is_missing():
    scores = {t: [1, 0] * 5 for t in POPE3}
    table = V.verdict_table([claim()], {"b": run(scores), "o": None}, find_aggregation=pope_aggregation)
    row = table.splitlines()[2]
    assert "not measured: no results of o" in row and "| not measured |" in row


def test_every_claim_names_runs_and_tasks_that_exist():
    tasks = {p.stem for p in (REPO / "task_configs").glob("*/*.yaml")}
    tasks |= {
        line.split(":", 1)[1].strip()
        for p in (REPO / "task_configs").glob("*/*.yaml")
        for line in p.read_text().splitlines()
        if line.startswith("task:")
    }
    for c in V.CLAIMS:
        assert c.base in V.RUNS and c.other in V.RUNS, c.name
        assert set(c.tasks) <= tasks, c.name
    assert len({c.name for c in V.CLAIMS}) == len(V.CLAIMS)


def test_select_by_name_prefix_and_model_and_refuses_unknown():
    assert {c.name for c in V.select("pm")} == {c.name for c in V.CLAIMS if c.name.startswith("pm_")}
    assert {c.technique for c in V.select("llava_viral")} == {"llava_viral"}
    with pytest.raises(SystemExit, match="no claim"):
        V.select("pm,nonsense")


def test_commands_log_samples_and_fill_heads_adapters_and_the_middle_window(tmp_path):
    ctx = V.Context("shapeworld-llava", "/ckpt", tmp_path, None, "cpu", 8, 60, 16, 300)
    knock = " ".join(V.eval_command(ctx, "knockout_middle_query"))
    assert "--log_samples" in knock and "from_layer=3,to_layer=5" in knock  # middle quarter of 8 layers
    heads = " ".join(V.eval_command(ctx, "lochead_official"))
    assert f"heads={tmp_path.resolve()}/heads/official_n300.json" in heads
    viral = " ".join(V.eval_command(ctx, "viral_official"))
    assert f"adapter={tmp_path.resolve()}/viral/official_s60_b16" in viral
    assert "--force_simple" in V.eval_command(ctx, "pm_official_first_token")
    steps = {s for s, _, _ in V.prep_steps(ctx, ["lochead_official", "viral_official"])}
    assert steps == {"heads:official", "heads:paper", "viral:official"}


def test_every_claims_two_runs_see_the_same_pixels():
    """An official preset pads to a square or resizes on the PIL backend; its claim's baseline must do the same,
    else the delta measures the preprocessing too (stock llava_hf becomes a ``baseline=true`` run)."""
    for claim in V.CLAIMS:
        assert V.preprocessing(V.RUNS[claim.base]) == V.preprocessing(V.RUNS[claim.other]), claim.name
    by_name = {c.name: c for c in V.CLAIMS}
    base = V.RUNS[by_name["pai_chair_i"].base]
    assert (base.model, base.model_args) == ("llava_pai", "baseline=true,image_backend=pil")
    assert by_name["pm_pope_paper"].base == "llava_hf"  # the paper's settings keep the class's own pixels
    first_token = V.RUNS[by_name["pm_first_token_official"].base]
    assert first_token.simple and first_token.model_args == "alpha=0,max_iter=0,image_backend=pil"
