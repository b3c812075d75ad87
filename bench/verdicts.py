"""Every claim in docs/shapeworld.md's "the paper's claim here" column, re-measured through the CLI, with a verdict.

    python bench/verdicts.py --pretrained shapeworld-llava --out results/verdicts            # everything, resumable
    python bench/verdicts.py --pretrained shapeworld-llava --out DIR --only pm,lochead_official_vs_all
    python bench/verdicts.py --pretrained shapeworld-llava --out DIR --table-only          # re-read DIR (same flags)

Each claim (``CLAIMS``, one row of that table) compares two lmms-eval runs (``RUNS``) on the same documents:
a technique at ``preset=official`` or the paper's setting, against the run the paper compares it with
(greedy ``llava_hf``, all heads, random heads, an equal-budget fine-tune without the alignment loss).
Every run goes through the real lmms-eval CLI with ``--log_samples``, full 300-document test splits
unless ``--limit``; a baseline run is shared by every claim that uses it, and a run whose results in
``--out`` already hold its tasks, model_args and limit is not run again (so a stopped run resumes).
Before the runs that need them: localization-head discovery (``lmms-plugins discover-heads`` on
``shapeworld_rec``'s train split, official and paper selections, as docs/lochead.md) and the VIRAL
fine-tunes (``lmms-plugins viral-train``).

Then, per claim, the paired delta (technique minus its baseline) of the task's own aggregation, its
95% percentile-bootstrap interval over documents (``lmms_eval_plugins.stats``, 2000 resamples,
seed 0; the tasks' aggregations found as ``lmms-plugins compare`` finds them) and the verdict
(``stats.verdict``): "reproduced" when the interval excludes 0 in the paper's direction, "opposite"
when it excludes 0 the other way, "no effect detected (+-half-width)" otherwise. A claim over the
three POPE splits pools them; the splits share their scenes and "yes" questions doc_id for doc_id,
so one doc_id's three records are resampled together. A "keeps ~96%" claim is tested as
``other - 0.96 x base`` (above 0: reproduced). Writes ``--out``/verdicts.md (the table, then every
run's exact command and time).

VIRAL budget (``--viral-steps``, ``--viral-batch``): ``viral-train --preset official`` scaled to the
testbed as bench/viral_shapeworld.py scales it (the ShapeWorld teacher for DINOv2, the middle layer,
LoRA r 32 / alpha 64, VRA projector 512 wide; data: the train splits of count, spatial and two POPE
tasks, 1,200 records in the checkpoint's answer formats, written once as PNGs + JSON under --out), with
``--viral-steps`` optimizer steps (default 60) of ``--viral-batch`` samples (default 16: 8 per forward
x 2 accumulation), i.e. 960 samples, 0.8 epoch; the same budget, data and seed with and without the
alignment loss. On shapeworld-llava (576 image tokens) one sample costs about 0.9 s of training on
the project's 2 shared cores, so each fine-tune takes about 15 min and the three 45 min;
bench/viral_shapeworld.py's budget (``--viral-steps 150 --viral-batch 32``) would take about 75 min
each. Heads and adapters are named after their budget (``heads/official_n300.json``,
``viral/official_s60_b16``), so runs at another budget never reuse them.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmms_eval_plugins import models  # noqa: E402
from lmms_eval_plugins.commands.compare import (  # noqa: E402
    Run,
    first_error,
    load_run,
    metric_rows,
    paired_records,
    task_aggregation,
)
from lmms_eval_plugins.paths import CHECKPOINTS, tasks_dir  # noqa: E402
from lmms_eval_plugins.stats import CONFIDENCE, N_RESAMPLES, SEED, paired_interval, verdict  # noqa: E402

POPE = ("shapeworld_pope_random", "shapeworld_pope_popular", "shapeworld_pope_adversarial")
POPE_FIRST_TOKEN = tuple(f"{t}_first_token" for t in POPE)  # task_configs/pm_official: the PM paper's scoring
CHAIR = ("shapeworld_chair",)
REC = ("shapeworld_rec",)
SPATIAL, COUNT = ("shapeworld_spatial",), ("shapeworld_count",)
SMALL_PRESENT = (("size_class", "small"), ("ground_truth", "yes"))  # POPE questions about a small object that is there
# the official describe pass's text in ShapeWorld's words and chat format (docs/reprompt.md); no "\n": the
# word-level tokenizer drops whitespace, and a literal backslash-n would become <unk>
DESCRIBE = "describe=Please describe this image in detail. ASSISTANT:"
VIRAL_TRAIN_TASKS = ("shapeworld_count", "shapeworld_spatial", "shapeworld_pope_random", "shapeworld_pope_adversarial")


@dataclasses.dataclass(frozen=True)
class EvalRun:
    """One lmms-eval run. ``model_args`` beyond pretrained/device, with ``{heads[KIND]}`` (a discovered heads
    file), ``{adapter[VARIANT]}`` (a viral-train output) and ``{mid}`` (the middle ~25% of the language
    model's layers, ``from_layer=A,to_layer=B``) filled in per checkpoint and budget."""

    model: str
    model_args: str = ""
    simple: bool = False  # --force_simple (loglikelihood tasks)
    needs: str = ""  # a preparation step (prep_steps: "heads", "viral:VARIANT") that must have run first


@dataclasses.dataclass(frozen=True)
class Claim:
    """One row of the claims table: ``other`` vs ``base`` (names in RUNS) on ``metric``, pooled over ``tasks``."""

    name: str
    technique: str
    base: str
    other: str
    tasks: tuple[str, ...]
    metric: str
    direction: int  # +1: the paper says the metric goes up (other - base > 0), -1: down
    claim: str  # the paper's claim, with its figure where lmms_eval_plugins/paper_figures.py has one
    subset: tuple[tuple[str, str], ...] = ()  # only documents whose metric record has these field values
    retain: float | None = None  # "keeps `retain` of the baseline": the delta is other - retain * base


# The runs, by name. pretrained and device are added to every model_args.
RUNS: dict[str, EvalRun] = {
    "llava_hf": EvalRun("llava_hf"),
    # PM: the official arithmetic (preset=official_pope) and the paper's settings (preset=pope, our defaults)
    "pm_official": EvalRun("llava_pm", "preset=official_pope"),
    "pm_paper": EvalRun("llava_pm", "preset=pope"),
    # first-token scoring (the paper's POPE): llava_hf cannot run loglikelihood tasks on transformers 5, and
    # llava_pm alpha=0,max_iter=0 is the plain model (a flat map resamples to the identity; docs/pm.md)
    "pm_plain_first_token": EvalRun("llava_pm", "alpha=0,max_iter=0", simple=True),
    "pm_official_first_token": EvalRun("llava_pm", "preset=official_pope", simple=True),
    "pai_official": EvalRun("llava_pai", "preset=official"),  # = preset=paper at greedy gamma 1.1 (docs/pai.md)
    "paint_official": EvalRun("llava_paint", "preset=official"),
    "paint_paper": EvalRun("llava_paint", "preset=paper"),
    # localization heads: discovered (official 8ce33b0 selection and prompt / the paper's), all, random (same k)
    "lochead_official": EvalRun("llava_lochead", "preset=official,heads={heads[official]}", needs="heads"),
    "lochead_official_all": EvalRun("llava_lochead", "preset=official,heads=all"),
    "lochead_official_random": EvalRun("llava_lochead", "preset=official,heads=random,random_seed=0"),
    "lochead_paper": EvalRun("llava_lochead", "preset=paper,heads={heads[paper]}", needs="heads"),
    "lochead_paper_all": EvalRun("llava_lochead", "preset=paper,heads=all"),
    "lochead_paper_random": EvalRun("llava_lochead", "preset=paper,heads=random,random_seed=0"),
    # knockout, rows split as the official code splits them (last prompt row = query)
    "knockout_middle_query": EvalRun("llava_knockout", "mode=query,last_row=query,{mid}"),
    "knockout_generated": EvalRun("llava_knockout", "preset=official"),  # image -> generated, every layer
    "knockout_query": EvalRun("llava_knockout", "preset=official_block_query_unidirection"),  # image -> query
    # pruning / compressed re-prompting at 5% of the image tokens
    "reprompt_prune_official": EvalRun("llava_reprompt", f"preset=official,{DESCRIBE}"),
    "reprompt_prune_5pct": EvalRun("llava_reprompt", "preset=prune_5pct"),
    "reprompt_compressed_official": EvalRun("llava_reprompt", f"preset=official_reprompt,{DESCRIBE}"),
    # VIRAL: the same fine-tuning budget without / with the alignment loss (PREP trains the adapters)
    "viral_official_lm": EvalRun("llava_viral", "adapter={adapter[official_lm]}", needs="viral:official_lm"),
    "viral_official": EvalRun("llava_viral", "adapter={adapter[official]}", needs="viral:official"),
    "viral_intended": EvalRun("llava_viral", "adapter={adapter[official_intended]}", needs="viral:official_intended"),
}

# One claim per entry, as the table's rows: name, technique, baseline run, technique run, tasks (pooled),
# metric, the paper's direction; then the claim, with the paper's figure where lmms_eval_plugins/paper_figures.py
# has it.
# fmt: off
CLAIMS: list[Claim] = [
    Claim("pm_pope_official", "llava_pm", "llava_hf", "pm_official", POPE, "pope_accuracy", +1,
          "PM raises POPE accuracy (paper: 86.70 average, first-token scoring)"),
    Claim("pm_pope_paper", "llava_pm", "llava_hf", "pm_paper", POPE, "pope_accuracy", +1,
          "same, the paper's settings (alpha 15, kernel 5, beta 0.4)"),
    Claim("pm_small_official", "llava_pm", "llava_hf", "pm_official", POPE, "pope_accuracy", +1,
          "PM helps small objects: more \"yes\" to small present objects (POPE, 3 splits)", subset=SMALL_PRESENT),
    Claim("pm_small_paper", "llava_pm", "llava_hf", "pm_paper", POPE, "pope_accuracy", +1,
          "same, the paper's settings", subset=SMALL_PRESENT),
    Claim("pm_first_token_official", "llava_pm", "pm_plain_first_token", "pm_official_first_token",
          POPE_FIRST_TOKEN, "pope_accuracy", +1,
          "PM raises POPE accuracy scored the paper's way (first token, yes vs no; paper: 86.70 average)"),

    Claim("pai_chair_s", "llava_pai", "llava_hf", "pai_official", CHAIR, "coco_cap_chair_s", -1,
          "PAI lowers CHAIR_S (46.2 -> 24.6 in PAINT's table)"),
    Claim("pai_chair_i", "llava_pai", "llava_hf", "pai_official", CHAIR, "coco_cap_chair_i", -1,
          "PAI lowers CHAIR_I (13.8 -> 6.8 in PAINT's table)"),
    Claim("pai_pope", "llava_pai", "llava_hf", "pai_official", POPE, "pope_accuracy", +1,
          "PAI raises POPE accuracy (3 splits)"),

    Claim("paint_official_chair_s", "llava_paint", "llava_hf", "paint_official", CHAIR, "coco_cap_chair_s", -1,
          "PAINT lowers CHAIR_S (46.2 -> 18.0 at alpha 0.7 / beta 0.3, PAINT's ablation)"),
    Claim("paint_official_chair_i", "llava_paint", "llava_hf", "paint_official", CHAIR, "coco_cap_chair_i", -1,
          "PAINT lowers CHAIR_I (13.8 -> 3.9, same row)"),
    Claim("paint_official_pope", "llava_paint", "llava_hf", "paint_official", POPE, "pope_accuracy", +1,
          "PAINT raises POPE accuracy (3 splits)"),
    Claim("paint_paper_chair_s", "llava_paint", "llava_hf", "paint_paper", CHAIR, "coco_cap_chair_s", -1,
          "PAINT lowers CHAIR_S (46.2 -> 17.6, PAINT's main table; alpha 0.7 / beta 0.4)"),
    Claim("paint_paper_chair_i", "llava_paint", "llava_hf", "paint_paper", CHAIR, "coco_cap_chair_i", -1,
          "PAINT lowers CHAIR_I (13.8 -> 4.0, same row)"),
    Claim("paint_paper_pope", "llava_paint", "llava_hf", "paint_paper", POPE, "pope_accuracy", +1,
          "same setting, POPE accuracy (3 splits)"),

    Claim("lochead_official_vs_all", "llava_lochead", "lochead_official_all", "lochead_official",
          REC, "refcoco_ACC@0.5", +1,
          "discovered heads ground better than all heads averaged (official selection, top 3)"),
    Claim("lochead_official_vs_random", "llava_lochead", "lochead_official_random", "lochead_official",
          REC, "refcoco_ACC@0.5", +1, "discovered heads beat 3 random heads (official selection)"),
    Claim("lochead_official_vs_generated", "llava_lochead", "llava_hf", "lochead_official", REC, "refcoco_ACC@0.5", +1,
          "discovered heads beat the model's own generated boxes (paper: RefCOCO val ACC@0.5 86.5)"),
    Claim("lochead_paper_vs_all", "llava_lochead", "lochead_paper_all", "lochead_paper", REC, "refcoco_ACC@0.5", +1,
          "same, the paper's selection (frequency over per-sample top 10)"),
    Claim("lochead_paper_vs_random", "llava_lochead", "lochead_paper_random", "lochead_paper",
          REC, "refcoco_ACC@0.5", +1, "same, vs 3 random heads"),
    Claim("lochead_paper_vs_generated", "llava_lochead", "llava_hf", "lochead_paper", REC, "refcoco_ACC@0.5", +1,
          "same, vs the generated boxes"),

    Claim("knockout_middle", "llava_knockout", "llava_hf", "knockout_middle_query", CHAIR, "coco_cap_recall", -1,
          "image -> query in the middle ~25% of layers carries the image: blocking it there costs caption recall"),
    Claim("knockout_generated_vs_query", "llava_knockout", "knockout_generated", "knockout_query",
          CHAIR, "coco_cap_recall", -1,
          "blocking image -> query costs more than image -> generated (every layer; caption recall)"),

    Claim("reprompt_prune_official", "llava_reprompt", "llava_hf", "reprompt_prune_official",
          CHAIR, "coco_cap_recall", +1,
          "pruning to 5% of the image keeps >= 96% (official selection, decode rows; caption recall)", retain=0.96),
    Claim("reprompt_prune_5pct", "llava_reprompt", "llava_hf", "reprompt_prune_5pct", POPE, "pope_accuracy", +1,
          "pruning every row to 5% keeps >= 96% of POPE accuracy", retain=0.96),
    Claim("reprompt_compressed_official", "llava_reprompt", "llava_hf", "reprompt_compressed_official",
          POPE, "pope_accuracy", +1,
          "re-prompting from a 5% compressed context keeps >= 96% of POPE accuracy (official qs context)", retain=0.96),

    Claim("viral_official_spatial", "llava_viral", "viral_official_lm", "viral_official", SPATIAL, "cv_bench_acc", +1,
          "VRA raises spatial accuracy over the same fine-tune without it (preset official)"),
    Claim("viral_official_count", "llava_viral", "viral_official_lm", "viral_official", COUNT, "acc", +1,
          "VRA raises count accuracy (preset official)"),
    Claim("viral_intended_spatial", "llava_viral", "viral_official_lm", "viral_intended", SPATIAL, "cv_bench_acc", +1,
          "same, as the paper describes it (VRA projector trained, teacher as trained)"),
    Claim("viral_intended_count", "llava_viral", "viral_official_lm", "viral_intended", COUNT, "acc", +1,
          "same, count accuracy"),
]
# fmt: on


def preset_values(run: EvalRun) -> dict:
    """What ``preset=`` in ``run`` sets today ({} without one): a run made before a preset changed is stale."""
    lm, preset = models.plugin_class(run.model), models.arg_pairs(run.model_args).get("preset")
    return {k: str(v) for k, v in lm.spec.presets[preset].items()} if lm and preset else {}


def preprocessing(run: EvalRun) -> dict:
    """How ``run`` preprocesses images beyond its class's own (models.preprocessing)."""
    return models.preprocessing(run.model, run.model_args)


def same_pixels(claim: Claim) -> Claim:
    """``claim`` with a baseline that sees the technique run's pixels: an ``official*`` preset pads to a square or
    resizes on the PIL backend as the official code does, and comparing it with a baseline that does neither
    would measure the preprocessing too. The baseline run then gets those arguments (stock llava_hf becomes
    ``llava_pai baseline=true``: no technique, bit-identical to llava_hf on the same pixels)."""
    base, other = RUNS[claim.base], RUNS[claim.other]
    like = models.baseline_like(claim.base, base.model, base.model_args, other.model, other.model_args, "llava_pai")
    if like is None:
        return claim
    name, model, args = like
    RUNS.setdefault(name, EvalRun(model, args, simple=base.simple, needs=base.needs))
    return dataclasses.replace(claim, base=name)


CLAIMS = [same_pixels(c) for c in CLAIMS]

# viral-train variants: --preset official scaled to the testbed (bench/viral_shapeworld.py's official variants)
VIRAL_VARIANTS = {
    "official_lm": ["--weight", "0", "--teacher", "none"],
    "official": ["--weight", "0.5", "--teacher", "shapeworld-teacher"],  # the official code's two behaviours kept
    "official_intended": [
        "--weight",
        "0.5",
        "--teacher",
        "shapeworld-teacher",
        "--train-vra-projector",
        "--no-teacher-reinit",
    ],
}


# ---------------------------------------------------------------------------------------
# Measuring a claim from two runs' per-sample logs
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Measured:
    base_value: float | None = None
    other_value: float | None = None
    delta: float | None = None
    interval: tuple[float, float] | None = None
    n: int = 0  # resampling units (doc_ids)
    records: int = 0  # per-document records (doc_ids x pooled tasks)
    why: str = ""  # why there is no interval

    def verdict(self, claim: Claim) -> str:
        if self.interval is None:
            return "not measured"
        return verdict(claim.direction, *self.interval)


@dataclasses.dataclass(frozen=True)
class Unit:
    """One resampling unit: a doc_id's records of every pooled task, for one run. ``scale`` multiplies the
    run's statistic (``retain`` for the baseline of a "keeps X%" claim), so the bootstrap's
    statistic(other) - statistic(base) is other - retain * base."""

    scale: float
    records: list


def _scaled(aggregate, units: list[Unit]) -> float:
    return units[0].scale * float(aggregate([r for u in units for r in u.records]))


def _record(value):
    # loglikelihood tasks' per-sample logs hold the metric record as its Python repr
    return ast.literal_eval(value) if isinstance(value, str) else value


def measure(claim: Claim, base: Run, other: Run, include_path=None, find_aggregation=task_aggregation) -> Measured:
    """The claim's paired delta and interval from both runs' per-sample logs: per task, the records
    paired by doc_id and the task's aggregation checked against the results file; a doc_id's records
    of every task are one resampling unit; the statistic is the first task's aggregation over all
    records of the chosen units (the pooled tasks share it). ``find_aggregation(task, metric, include_path)``:
    the task's aggregation (default: loaded from its YAML, as `compare` does)."""
    include_path = str(include_path or tasks_dir())
    units: dict[int, tuple[list, list]] = {}
    aggregate = None
    for task in claim.tasks:
        paired = paired_records(base, other, task, claim.metric)
        if isinstance(paired, str):
            return Measured(why=f"{task}: {paired}")
        agg = find_aggregation(task, claim.metric, include_path)
        if agg is None:
            return Measured(why=f"{task}: no aggregation of {claim.metric} found")
        if aggregate is not None and agg.__name__ != aggregate.__name__:
            return Measured(why=f"{task}: another aggregation than the other tasks' ({agg.__name__})")
        aggregate = aggregate or agg
        records = [[_record(r) for r in side] for side in paired]
        for run, side in zip((base, other), records):
            reported = metric_rows(run.results).get((task, claim.metric))
            if reported is None:
                return Measured(why=f"{task}: no reported {claim.metric}")
            if abs(float(agg(side)) - reported) > 1e-9 * max(1.0, abs(reported)):
                return Measured(
                    why=f"{task}: re-aggregating the logged records does not give the reported {claim.metric}"
                )
        for i, b, o in zip(sorted(base.samples(task)), *records):  # paired_records' order: doc_id
            if all(isinstance(b, dict) and b.get(k) == v for k, v in claim.subset):
                pair = units.setdefault(i, ([], []))
                pair[0].append(b)
                pair[1].append(o)
    if len(units) < 2:
        return Measured(n=len(units), why="fewer than 2 documents")
    ids = sorted(units)
    base_units = [Unit(claim.retain or 1.0, units[i][0]) for i in ids]
    other_units = [Unit(1.0, units[i][1]) for i in ids]
    low, high = paired_interval(functools.partial(_scaled, aggregate), base_units, other_units)
    b_value, o_value = (float(aggregate([r for u in side for r in u.records])) for side in (base_units, other_units))
    delta = o_value - (claim.retain or 1.0) * b_value
    return Measured(b_value, o_value, delta, (low, high), len(ids), sum(len(u.records) for u in base_units))


def _fmt(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"


def measured_cell(claim: Claim, m: Measured) -> str:
    if m.delta is None:
        return f"not measured: {m.why}"
    values = f"{_fmt(m.base_value)} -> {_fmt(m.other_value)}"
    if claim.retain is not None:
        kept = f"{m.other_value / m.base_value:.0%}" if m.base_value else "n/a"
        values += f" (kept {kept}); minus {claim.retain:g} x base"
    n = f"{m.records}" if m.records == m.n else f"{m.records} records, {m.n} doc_ids"
    return f"{values}: {m.delta:+.3f} [{m.interval[0]:+.3f}, {m.interval[1]:+.3f}] (n={n})"


def verdict_table(
    claims, runs: dict[str, Run | None], include_path=None, command=None, find_aggregation=task_aggregation
) -> str:
    """The markdown table: claim | measured delta [95% CI] | verdict | command. ``runs`` maps run names
    to loaded runs (None: not run; a ``compare.Run`` built in memory with its ``_samples`` works too);
    ``command(claim)`` gives a row's command (default: this script's)."""
    command = command or (lambda c: f"`python bench/verdicts.py --only {c.name}`")
    lines = [
        "| technique | the paper's claim | measured: base -> technique: delta [95% CI] | verdict | command |",
        "|---|---|---|---|---|",
    ]
    for c in claims:
        base, other = runs.get(c.base), runs.get(c.other)
        if base is None or other is None:
            missing = ", ".join(n for n, r in ((c.base, base), (c.other, other)) if r is None)
            m = Measured(why=f"no results of {missing}")
        else:
            m = measure(c, base, other, include_path, find_aggregation)
        what = c.metric + (" on " + "+".join(f"{k}={v}" for k, v in c.subset) if c.subset else "")
        tasks = c.tasks[0] if len(c.tasks) == 1 else f"{len(c.tasks)} tasks pooled"
        lines.append(
            f"| `{c.technique}` | {c.claim} ({what}, {tasks}; `{c.other}` vs `{c.base}`) | "
            f"{measured_cell(c, m)} | {m.verdict(c)} | {command(c)} |"
        )
    lines += [
        "",
        f"Paired {CONFIDENCE:.0%} percentile-bootstrap intervals over documents ({N_RESAMPLES} resamples, seed "
        f"{SEED}), each resample re-scored by the task's own aggregation; pooled POPE splits resample a doc_id's "
        "three records together. Verdict: reproduced / opposite when the interval excludes 0 in / against the "
        "paper's direction, else no effect detected (+-half-width).",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------


def run_tasks(name: str) -> tuple[str, ...]:
    """Every task any claim reads from this run (independent of --only, so a run serves every claim)."""
    tasks = [t for c in CLAIMS if name in (c.base, c.other) for t in c.tasks]
    return tuple(dict.fromkeys(tasks))


def select(only: str | None) -> list[Claim]:
    if not only:
        return list(CLAIMS)
    wanted = {w.strip() for w in only.split(",") if w.strip()}
    picked = [c for c in CLAIMS if any(c.name == w or c.name.startswith(w + "_") or c.technique == w for w in wanted)]
    unknown = {
        w for w in wanted if not any(c.name == w or c.name.startswith(w + "_") or c.technique == w for c in CLAIMS)
    }
    if unknown:
        raise SystemExit(f"--only: no claim {sorted(unknown)}; claims: {', '.join(c.name for c in CLAIMS)}")
    return picked


@dataclasses.dataclass
class Context:
    pretrained: str  # as given (a shipped name or a path)
    checkpoint: str  # its directory
    out: Path
    limit: int | None
    device: str
    depth: int
    viral_steps: int
    viral_batch: int
    heads_n: int

    def heads_file(self, kind: str) -> Path:
        return (self.out / "heads" / f"{kind}_n{self.heads_n}.json").resolve()

    def adapter_dir(self, variant: str) -> Path:
        # the budget in the name: a run at another budget trains (and evaluates) its own adapter
        return (self.out / "viral" / f"{variant}_s{self.viral_steps}_b{self.viral_batch}").resolve()

    def fill(self, args: str) -> str:
        width = max(1, round(self.depth / 4))
        start = (self.depth - width) // 2
        heads = {k: self.heads_file(k) for k in ("official", "paper")}
        adapter = {v: self.adapter_dir(v) for v in VIRAL_VARIANTS}
        return args.format(heads=heads, adapter=adapter, mid=f"from_layer={start},to_layer={start + width}")

    def model_args(self, run: EvalRun) -> str:
        device = f"device={self.device},device_map={self.device}"
        return ",".join(a for a in (f"pretrained={self.checkpoint}", device, self.fill(run.model_args)) if a)

    def shown(self, cmd: list[str]) -> str:
        """A command as a reader would type it: the shipped checkpoint and the task directory by their
        `lmms-plugins path` commands, --out as given."""
        paths = {str(tasks_dir()): "tasks", str(self.out.resolve()): None}
        if self.pretrained in CHECKPOINTS:
            paths[self.checkpoint] = self.pretrained
        words = []
        for arg in cmd:
            for k, path in enumerate(paths):
                arg = arg.replace(path, f"@{k}@")  # a token shlex leaves unquoted
            word = shlex.quote(arg)
            for k, name in enumerate(paths.values()):
                sub = str(self.out) if name is None else f'"$(lmms-plugins path {name})"'
                # inside single quotes, close them around the substitution so the shell still runs it
                word = word.replace(f"@{k}@", f"'{sub}'" if word.startswith("'") and name else sub)
            words.append(word)
        return " ".join(words)


def run_dir(ctx: Context, name: str) -> Path:
    return ctx.out / "runs" / name


def eval_command(ctx: Context, name: str) -> list[str]:
    run = RUNS[name]
    cmd = ["lmms-eval", "--model", run.model, "--model_args", ctx.model_args(run), "--tasks", ",".join(run_tasks(name))]
    cmd += [
        "--include_path",
        str(tasks_dir()),
        "--batch_size",
        "1",
        "--log_samples",
        "--output_path",
        str(run_dir(ctx, name)),
    ]
    cmd += (["--limit", str(ctx.limit)] if ctx.limit else []) + (["--force_simple"] if run.simple else [])
    return cmd


def finished(ctx: Context, name: str) -> Run | None:
    """The run's results when they hold every task it needs, at these model_args, this limit and what its preset
    sets today (``preset.json``, written beside the results)."""
    try:
        run = load_run(run_dir(ctx, name))
        preset = json.loads((run_dir(ctx, name) / "preset.json").read_text())
    except (SystemExit, OSError, ValueError):
        return None
    cfg = run.results.get("config", {})
    same = cfg.get("model_args") == ctx.model_args(RUNS[name]) and cfg.get("limit") == ctx.limit
    same = same and preset == preset_values(RUNS[name])
    return run if same and set(run_tasks(name)) <= set(run.results.get("results", {})) else None


def prep_steps(ctx: Context, names) -> list[tuple[str, Path, list[str]]]:
    """(step, file it writes, command) for the preparation the runs need: head discovery, VIRAL fine-tunes."""
    steps = []
    needs = {RUNS[n].needs for n in names if RUNS[n].needs}
    if "heads" in needs:
        for kind, flags in (("official", ["--selection", "official", "--prompt", "official"]), ("paper", [])):
            out = ctx.heads_file(kind)
            cmd = ["lmms-plugins", "discover-heads", "--pretrained", ctx.pretrained, "--task", "shapeworld_rec"]
            cmd += ["--include-path", str(tasks_dir()), "--n", str(ctx.heads_n), "--repeats", "1", *flags]
            steps.append((f"heads:{kind}", out, cmd + ["--no-cache", "--output", str(out)]))
    data = ctx.out / "viral" / "data" / "records.json"
    for variant, flags in VIRAL_VARIANTS.items():
        if f"viral:{variant}" not in needs:
            continue
        out = ctx.adapter_dir(variant)
        cmd = ["lmms-plugins", "viral-train", "--preset", "official", "--pretrained", ctx.pretrained, *flags]
        cmd += ["--data", str(data), "--image-folder", str(data.parent), "--output-dir", str(out)]
        cmd += ["--layer", str(max(1, ctx.depth // 2)), "--lora-r", "32", "--lora-alpha", "64", "--proj-hidden", "512"]
        cmd += ["--max-steps", str(ctx.viral_steps), "--batch-size", str(max(1, ctx.viral_batch // 2))]
        cmd += ["--effective-batch", str(ctx.viral_batch), "--seed", "0", "--no-progress"]
        steps.append((f"viral:{variant}", out / "adapter" / "adapter_config.json", cmd))
    return steps


def write_viral_data(path: Path) -> None:
    """The ShapeWorld train-split records bench/viral_shapeworld.py trains on, as LLaVA-format JSON + PNGs."""
    if path.exists():
        return
    sys.path.insert(0, str(REPO / "bench"))
    from viral_shapeworld import shapeworld_records

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, rec in enumerate(shapeworld_records(list(VIRAL_TRAIN_TASKS), None)):
        name = f"{i:05d}.png"
        rec["image"].save(path.parent / name)
        rows.append({"id": str(i), "image": name, "conversations": rec["conversations"]})
    path.write_text(json.dumps(rows))


def _executable(cmd: list[str]) -> list[str]:
    # the console scripts of this environment, by module, so a venv that is not on PATH works too
    head = {"lmms-eval": ["-m", "lmms_eval"], "lmms-plugins": ["-m", "lmms_eval_plugins.cli"]}[cmd[0]]
    return [sys.executable, *head, *cmd[1:]]


def execute(ctx: Context, names, timings: dict) -> None:
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    logs = ctx.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for step, output, cmd in prep_steps(ctx, names):
        if output.exists():
            continue
        if step.startswith("viral:"):
            write_viral_data(ctx.out / "viral" / "data" / "records.json")
        print(f"[{time.strftime('%H:%M:%S')}] {step}: {ctx.shown(cmd)}", flush=True)
        t0 = time.time()
        proc = subprocess.run(_executable(cmd), capture_output=True, text=True, env=env, cwd=REPO)
        (logs / f"{step.replace(':', '_')}.log").write_text(proc.stdout + proc.stderr)
        timings[step] = {"seconds": round(time.time() - t0, 1), "command": ctx.shown(cmd)}
        if not output.exists():
            raise SystemExit(
                f"{step} failed: {first_error(proc.stdout + proc.stderr)}\n{(proc.stdout + proc.stderr)[-3000:]}"
            )
    pending = [n for n in names if finished(ctx, n) is None]
    for k, name in enumerate(pending, 1):
        cmd = eval_command(ctx, name)
        print(f"[{time.strftime('%H:%M:%S')}] run {k}/{len(pending)} {name}: {ctx.shown(cmd)}", flush=True)
        t0 = time.time()
        proc = subprocess.run(_executable(cmd), capture_output=True, text=True, env=env, cwd=REPO)
        (run_dir(ctx, name) / "preset.json").write_text(json.dumps(preset_values(RUNS[name]), sort_keys=True))
        (logs / f"{name}.log").write_text(proc.stdout + proc.stderr)
        timings[name] = {
            "seconds": round(time.time() - t0, 1),
            "limit": ctx.limit,
            "command": ctx.shown(cmd),
        }
        (ctx.out / "timings.json").write_text(json.dumps(timings, indent=1))
        if finished(ctx, name) is None:  # the CLI exits 0 even when evaluation fails
            print(f"  {name} produced no results: {first_error(proc.stdout + proc.stderr)}", flush=True)


def report(ctx: Context, claims, timings: dict) -> str:
    names = list(dict.fromkeys(n for c in claims for n in (c.base, c.other)))
    runs = {n: finished(ctx, n) for n in names}
    here = f"python bench/verdicts.py --pretrained {ctx.pretrained} --out {ctx.out}" + (
        f" --limit {ctx.limit}" if ctx.limit else ""
    )
    table = verdict_table(claims, runs, command=lambda c: f"`{here} --only {c.name}`")
    lines = [table, "", "What the claims ran (every lmms-eval run with --log_samples), and what each took here:", ""]
    lines += ["| step | command | wall time (s) | of it, lmms-eval's evaluation time (s) |", "|---|---|---|---|"]
    for step, _, cmd in prep_steps(ctx, names):
        lines.append(f"| {step} | `{ctx.shown(cmd)}` | {timings.get(step, {}).get('seconds', '')} | |")
    for n in names:
        seconds = runs[n] and runs[n].results.get("total_evaluation_time_seconds")
        evaluated = f"{float(seconds):.1f}" if seconds else ""
        wall = timings.get(n, {}).get("seconds", "")
        lines.append(f"| {n} | `{ctx.shown(eval_command(ctx, n))}` | {wall} | {evaluated} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrained", default="shapeworld-llava", help="shipped checkpoint name or directory")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--limit", type=int, default=None, help="documents per task (default: the full 300)")
    ap.add_argument("--only", default=None, help="comma-separated claim names, name prefixes or model names")
    ap.add_argument("--table-only", action="store_true", help="run nothing; the table from what --out holds")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--viral-steps", type=int, default=60, help="VIRAL fine-tuning optimizer steps")
    ap.add_argument("--viral-batch", type=int, default=16, help="VIRAL samples per optimizer step")
    ap.add_argument(
        "--heads-n", type=int, default=300, help="head-discovery samples of shapeworld_rec's train split (300: all)"
    )
    args = ap.parse_args(argv)
    from transformers import AutoConfig

    from lmms_eval_plugins.base import resolve_pretrained

    checkpoint = str(resolve_pretrained(args.pretrained))
    depth = AutoConfig.from_pretrained(checkpoint).text_config.num_hidden_layers
    ctx = Context(
        args.pretrained,
        checkpoint,
        args.out,
        args.limit,
        args.device,
        depth,
        args.viral_steps,
        args.viral_batch,
        args.heads_n,
    )
    claims = select(args.only)
    args.out.mkdir(parents=True, exist_ok=True)
    timings_file = args.out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    if not args.table_only:
        t0 = time.time()
        execute(ctx, list(dict.fromkeys(n for c in claims for n in (c.base, c.other))), timings)
        timings_file.write_text(json.dumps(timings, indent=1))
        print(f"all runs done in {time.time() - t0:.0f} s", flush=True)
    text = report(ctx, claims, timings)
    print(text)
    (args.out / "verdicts.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
