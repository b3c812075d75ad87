"""A paper's evaluation as data: one YAML file per paper here, run by ``lmms-plugins reproduce PAPER``.

A recipe names the checkpoint (``pretrained``), the runs (each one lmms-eval process: a model name,
its model_args, whether it needs ``--force_simple``) and the rows of the paper's table (a run, the
run it is compared with, the real lmms-eval task and metric, the paper's value with its source and
how our evaluation differs). ``--testbed`` maps every row to its ShapeWorld twin (task, metric and
checkpoint), so the same path runs on a CPU. The papers' figures that ``compare`` shows
(``lmms_eval_plugins.paper_figures``) are read from these files too: one place per number.

Schema (every key but the marked ones optional)::

    paper: pm                      # the file's name: `reproduce pm`
    title: ...                     # required: the paper
    source: ...                    # required: the default source of every value below
    pretrained: llava-hf/...       # required: the checkpoint the paper evaluates
    testbed: shapeworld-llava      # its ShapeWorld stand-in (a shipped checkpoint)
    inputs: {adapter: "what to pass and how to make it"}   # `--set adapter=PATH` fills {adapter}
    runs:
      NAME: {model: llava_pm, model_args: "preset=official_pope", force_simple: true,
             testbed_model_args: "...", note: "..."}          # testbed args override same-named ones
    rows:
      - name: pope_adv             # required, unique
        run: NAME                  # the run measured (whose figure it is, for a not_run row)
        baseline: NAME             # the run it is compared with (null: the published baseline, if any)
        task: pope_adv             # the real lmms-eval task
        metric: pope_accuracy      # its metric, or a list of metrics summed (MME's total)
        mean_of: [row, row]        # instead of task/metric: the mean of earlier rows
        scale: 100                 # the paper's unit = lmms-eval's value x scale
        relative: true             # the paper's value is a percentage of the baseline's
        paper: {value: 86.7, row: "PM", source: ..., differs: ..., primary: true}
        claim: "..."               # the paper's claim where it gives no number
        testbed_task: ...          # the ShapeWorld twin, when TWINS does not know it
        testbed_metric: ...
        not_run: "..."             # a figure we show but cannot run: why (no such lmms-eval metric)
"""

from __future__ import annotations

import dataclasses
import re
from functools import cache
from pathlib import Path

import yaml

RECIPES_DIR = Path(__file__).resolve().parent

# The ShapeWorld twin of each real task the recipes use (the tasks in task_configs/).
TWINS = {
    **{
        f"pope_{s}": f"shapeworld_pope_{t}"
        for s, t in (("random", "random"), ("pop", "popular"), ("adv", "adversarial"))
    },
    **{
        f"pope_{s}_first_token": f"shapeworld_pope_{t}_first_token"
        for s, t in (("random", "random"), ("pop", "popular"), ("adv", "adversarial"))
    },
    "mme_official8_first_token": "shapeworld_mme_first_token",
    "coco_cap_chair": "shapeworld_chair",
    **{
        f"{ds}_bbox_rec_{split}": "shapeworld_rec"
        for ds, splits in (("refcoco", ("val", "testA", "testB")), ("refcoco+", ("val", "testA", "testB")))
        for split in splits
    },
    "refcocog_bbox_rec_val": "shapeworld_rec",
    "refcocog_bbox_rec_test": "shapeworld_rec",
    "cv_bench": "shapeworld_spatial",
}
STOCK_MODELS = ("llava_hf", "qwen2_5_vl", "gemma3")  # lmms-eval's own names a recipe may use as a baseline
PLACEHOLDER = re.compile(r"\{(\w+)\}")


class RecipeError(ValueError):
    """A recipe file that does not validate: which file, which entry, what to fix."""


@dataclasses.dataclass(frozen=True)
class PaperValue:
    value: float
    row: str  # the paper's row label
    source: str
    differs: str = ""  # how the paper's evaluation differs from the lmms-eval task
    primary: bool = True  # the one `compare` shows for (model, task, metric)
    decimals: int = 0  # as the file writes it (86.70: 2): the paper's reported precision

    def within(self, ours: float) -> bool:
        """``ours`` rounds to the paper's value at the paper's precision."""
        return abs(ours - self.value) <= 0.5 * 10.0**-self.decimals + 1e-9


@dataclasses.dataclass(frozen=True)
class RunSpec:
    name: str
    model: str
    model_args: str = ""
    force_simple: bool = False
    testbed_model_args: str = ""
    note: str = ""

    def args(self, testbed: bool) -> str:
        """model_args beyond pretrained/device; on the testbed, testbed_model_args override same-named ones."""
        pairs = dict(_pairs(self.model_args))
        if testbed:
            pairs.update(_pairs(self.testbed_model_args))
        return ",".join(f"{k}={v}" for k, v in pairs.items())

    @property
    def preset(self) -> str | None:
        """The preset that alone gives this run's configuration (None: none, or more model_args beside it)."""
        pairs = dict(_pairs(self.model_args))
        return pairs["preset"] if list(pairs) == ["preset"] else None


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    run: str | None = None
    baseline: str | None = None
    task: str | None = None
    metric: tuple[str, ...] = ()  # summed when several
    mean_of: tuple[str, ...] = ()
    scale: float = 1.0
    relative: bool = False  # the value is 100 x run / baseline
    paper: PaperValue | None = None
    claim: str = ""
    testbed_task: str | None = None
    testbed_metric: tuple[str, ...] = ()
    not_run: str = ""

    @property
    def runs(self) -> bool:
        return self.run is not None and not self.not_run

    def task_on(self, testbed: bool) -> str | None:
        if not testbed or self.task is None:
            return self.task
        return self.testbed_task or TWINS.get(self.task)

    def metric_on(self, testbed: bool) -> tuple[str, ...]:
        return (self.testbed_metric or self.metric) if testbed else self.metric


@dataclasses.dataclass(frozen=True)
class Recipe:
    paper: str
    title: str
    source: str
    pretrained: str
    runs: dict[str, RunSpec]
    rows: tuple[Row, ...]
    testbed: str = "shapeworld-llava"
    inputs: dict[str, str] = dataclasses.field(default_factory=dict)
    file: Path | None = None

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def select(self, names: list[str] | None) -> tuple[Row, ...]:
        """The rows named (and the rows a named mean_of row averages), in file order; all when None."""
        if not names:
            return self.rows
        known = {r.name for r in self.rows}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise RecipeError(f"{self.paper}: no row {', '.join(unknown)}; rows: {', '.join(sorted(known))}")
        wanted = set(names)
        for r in self.rows:
            if r.name in wanted:
                wanted.update(r.mean_of)
        return tuple(r for r in self.rows if r.name in wanted)


def _pairs(model_args: str) -> list[tuple[str, str]]:
    out = []
    for item in filter(None, (s.strip() for s in model_args.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise RecipeError(f"model_args item {item!r} is not key=value")
        out.append((key.strip(), value.strip()))
    return out


def _metrics(value) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _fail(where: str, what: str):
    raise RecipeError(f"{where}: {what}")


def parse(data: dict, file: Path | None = None) -> Recipe:
    """A Recipe from a recipe file's YAML mapping, validated for what needs no lmms-eval task index
    (``check_tasks`` and ``check_model_args`` do the rest)."""
    where = str(file or data.get("paper", "recipe"))
    for key in ("paper", "title", "source", "pretrained", "runs", "rows"):
        if key not in data:
            _fail(where, f"missing {key!r}")
    known = {"paper", "title", "source", "pretrained", "testbed", "inputs", "runs", "rows"}
    unknown = {k for k in data if k not in known and not k.startswith("_")}  # _name: a YAML anchor's holder
    if unknown:
        _fail(where, f"unknown keys {sorted(unknown)}; known: {sorted(known)}")
    inputs = dict(data.get("inputs") or {})
    runs = {}
    for name, spec in data["runs"].items():
        fields = {f.name for f in dataclasses.fields(RunSpec)} - {"name"}
        if set(spec) - fields:
            _fail(f"{where} run {name}", f"unknown keys {sorted(set(spec) - fields)}")
        run = RunSpec(name=name, **spec)
        for text in (run.model_args, run.testbed_model_args):
            _pairs(text)
            for placeholder in PLACEHOLDER.findall(text):
                if placeholder not in inputs:
                    _fail(f"{where} run {name}", f"{{{placeholder}}} is not declared under inputs")
        runs[name] = run
    rows: list[Row] = []
    for i, raw in enumerate(data["rows"]):
        raw = dict(raw)
        row_where = f"{where} row {raw.get('name', i)}"
        paper = raw.pop("paper", None)
        if paper is not None:
            paper = dict(paper)
            paper.setdefault("source", data["source"])
            paper.setdefault("row", raw.get("name"))
            if not isinstance(paper.get("value"), (int, float)):
                _fail(row_where, "paper.value must be a number")
            text = getattr(paper["value"], "text", str(paper["value"]))
            paper["decimals"] = len(text.partition(".")[2])
            paper["value"] = float(paper["value"])
            paper = PaperValue(**paper)
        fields = {f.name for f in dataclasses.fields(Row)}
        if set(raw) - fields:
            _fail(row_where, f"unknown keys {sorted(set(raw) - fields)}")
        row = Row(
            **{
                **raw,
                "metric": _metrics(raw.get("metric")),
                "testbed_metric": _metrics(raw.get("testbed_metric")),
                "mean_of": tuple(raw.get("mean_of") or ()),
                "paper": paper,
            }
        )
        if "name" not in raw or any(r.name == row.name for r in rows):
            _fail(row_where, "every row needs a unique name")
        for ref in (row.run, row.baseline):
            if ref is not None and ref not in runs:
                _fail(row_where, f"no run {ref!r}; runs: {', '.join(runs)}")
        if row.run is None:
            _fail(row_where, "every row names its run (a not_run row: whose figure it is)")
        if row.relative and row.baseline is None:
            _fail(row_where, "a relative row needs a baseline")
        if row.mean_of:
            if row.task or row.metric:
                _fail(row_where, "a mean_of row has no task or metric of its own")
            earlier = {r.name: r for r in rows}
            for ref in row.mean_of:
                if ref not in earlier or earlier[ref].run != row.run or earlier[ref].baseline != row.baseline:
                    _fail(row_where, f"mean_of {ref!r}: not an earlier row with the same run and baseline")
        elif row.runs and not (row.task and row.metric):
            _fail(row_where, "a row that runs needs task and metric (or mean_of)")
        if row.scale <= 0:
            _fail(row_where, "scale must be positive")
        if row.paper is None and not row.claim and row.baseline is None:
            _fail(row_where, "a row with neither a paper value, a claim nor a baseline compares nothing")
        rows.append(row)
    rows = [_on_same_pixels(row, runs) for row in rows]
    return Recipe(
        paper=data["paper"],
        title=data["title"],
        source=data["source"],
        pretrained=data["pretrained"],
        testbed=data.get("testbed", "shapeworld-llava"),
        inputs=inputs,
        runs=runs,
        rows=tuple(rows),
        file=file,
    )


@dataclasses.dataclass(frozen=True)
class Published:
    """One published result of a stock model (published_baselines.yaml)."""

    model: str  # the file's model key (llava-1.5-7b)
    task: str
    metric: tuple[str, ...]  # summed when several
    value: float
    source: str
    tier: str  # P: the model's or benchmark's own authors; S: another paper's baseline row, second-hand
    check: bool = False  # value, metric or checkpoint uncertain
    scale: float = 1.0  # the published unit = lmms-eval's value x scale
    setting: str = ""
    lmms_eval: str | None = None  # the lmms-eval version that produced it, where known

    def label(self) -> str:
        return f"published [{self.tier}{', check' if self.check else ''}]: {self.source}"


@cache
def published() -> tuple[dict[str, tuple[str, ...]], tuple[Published, ...]]:
    """The published-baselines file: {model key: its checkpoint ids}, and every cell (validated)."""
    path = RECIPES_DIR / "published_baselines.yaml"
    data = yaml.safe_load(path.read_text())
    models = {k: tuple(v) for k, v in data["models"].items()}
    cells = []
    fields = {f.name for f in dataclasses.fields(Published)}
    for i, raw in enumerate(data["cells"]):
        where = f"{path} cell {i} ({raw.get('model')}, {raw.get('task')})"
        if set(raw) - fields:
            _fail(where, f"unknown keys {sorted(set(raw) - fields)}")
        cell = Published(**{**raw, "metric": _metrics(raw.get("metric"))})
        if cell.model not in models:
            _fail(where, f"model {cell.model!r} is not under models: {', '.join(models)}")
        if not cell.source or cell.tier not in ("P", "S") or not cell.metric:
            _fail(where, "every cell needs a source, tier P or S, and a metric")
        cells.append(cell)
    return models, tuple(cells)


def published_model(name: str) -> str | None:
    """The published-baselines key of a model key or checkpoint id (llava-hf/llava-1.5-7b-hf), or None."""
    models, _ = published()
    if name in models:
        return name
    return next((key for key, ids in models.items() if name in ids), None)


def published_value(model: str, task: str, metric: tuple[str, ...]) -> Published | None:
    key = published_model(model)
    _, cells = published()
    return next((c for c in cells if c.model == key and c.task == task and c.metric == tuple(metric)), None)


def papers() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if p.stem != "published_baselines")


class _Number(float):
    """A float that remembers how the file wrote it (its decimals are the paper's precision)."""

    text: str


class _Loader(yaml.SafeLoader):
    pass


def _float(loader, node):
    number = _Number(loader.construct_yaml_float(node))
    number.text = node.value
    return number


_Loader.add_constructor("tag:yaml.org,2002:float", _float)


def _on_same_pixels(row: Row, runs: dict) -> Row:
    """``row`` with a baseline that preprocesses images as its run does: an ``official*`` preset pads to a square
    or resizes on the PIL backend as the paper's code does, and a baseline that does neither would put the
    preprocessing into the delta. The derived baseline run (added to ``runs``) is the baseline with those
    arguments; stock llava_hf becomes the row's wrapper with ``baseline=true`` (no technique)."""
    from ..models import baseline_like

    if row.baseline is None or row.run is None:
        return row
    run, base = runs[row.run], runs[row.baseline]
    like = baseline_like(row.baseline, base.model, base.model_args, run.model, run.model_args)
    if like is None:
        return row
    name, model, args = like
    note = f"{row.baseline} on the pixels of {row.run} ({name.split('+', 1)[1].replace('+', ', ')})"
    runs.setdefault(name, dataclasses.replace(base, name=name, model=model, model_args=args, note=note))
    return dataclasses.replace(row, baseline=name)


@cache
def load(paper: str) -> Recipe:
    path = RECIPES_DIR / f"{paper}.yaml"
    if paper not in papers():
        raise RecipeError(f"no recipe {paper!r}; recipes: {', '.join(papers())}")
    data = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    if data.get("paper") != paper:
        _fail(str(path), f"paper: {data.get('paper')!r} differs from the file name {paper!r}")
    return parse(data, path)


def all_recipes() -> list[Recipe]:
    return [load(p) for p in papers()]


def model_class(model: str):
    """The lmms-eval class a plugin model name registers (the simple class), or None for lmms-eval's own."""
    import importlib

    from ..models import MODELS

    if model not in MODELS:
        return None
    module, cls, _ = MODELS[model]
    return getattr(importlib.import_module(f"lmms_eval_plugins.models.{module}"), cls)


def check_model_args(recipe: Recipe) -> None:
    """Every run names a registered model and model_args it accepts (presets included), on both paths."""
    from methods.params import ModelArgsError, parse_params

    from ..base import COMMON_PARAMS
    from ..models import MODELS

    for run in recipe.runs.values():
        where = f"{recipe.file or recipe.paper} run {run.name}"
        if run.model not in MODELS and run.model not in STOCK_MODELS:
            _fail(where, f"model {run.model!r} is not registered ({', '.join([*STOCK_MODELS, *MODELS])})")
        cls = model_class(run.model)
        if cls is None:
            continue
        for testbed in (False, True):
            given = {k: v for k, v in _pairs(run.args(testbed)) if k not in cls.family_args}
            given = {k: v for k, v in given.items() if not PLACEHOLDER.search(v)}
            try:
                parse_params((*cls.spec.params, *COMMON_PARAMS), given, cls.spec.presets, owner=cls.spec.name)
            except ModelArgsError as e:
                _fail(where, str(e))


def check_tasks(recipe: Recipe, task_index: dict) -> None:
    """Every row's task, and its testbed twin, is a task lmms-eval (with the package's task_configs) knows."""
    for row in recipe.rows:
        for testbed in (False, True):
            task = row.task_on(testbed)
            if row.task is not None and task is None:
                _fail(f"{recipe.file} row {row.name}", f"no ShapeWorld twin for {row.task}: set testbed_task")
            if task is not None and task not in task_index:
                _fail(f"{recipe.file} row {row.name}", f"lmms-eval knows no task {task!r}")
