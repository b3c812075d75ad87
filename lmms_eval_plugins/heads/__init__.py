"""Localization-heads files shipped with the package, and head discovery over an lmms-eval task.

Heads files are JSON (``methods.lochead_heads.write_heads_file``): model id, the model's
layers x heads, where the heads came from, and the ranked heads (layer, head, 0-based,
with their selection frequency). ``<model basename>.json`` in this directory is what
``heads=shipped`` loads. Discovery reads any lmms-eval task's split through lmms-eval's
own TaskManager (``doc_to_visual`` / ``doc_to_text``), so the same command runs on
``shapeworld_rec`` here and on a RefCOCO split on a GPU machine; results are cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

from methods import lochead_heads
from methods.geometry import processor_geometry
from methods.lochead import Located
from methods.lochead_maps import box_from_grid, combine_head_maps, knee_index
from methods.lochead_visuals import render_curve, render_located

HEADS_DIR = Path(__file__).resolve().parent


def shipped_heads_path(model_id: str) -> Path:
    return HEADS_DIR / f"{Path(str(model_id).rstrip('/')).name}.json"


def shipped_heads() -> list[str]:
    return sorted(p.stem for p in HEADS_DIR.glob("*.json"))


def default_include_path() -> list[str]:
    """The package's task configs (ShapeWorld tasks), installed or in a source checkout."""
    from ..paths import tasks_dir

    return [str(tasks_dir())]


def cache_dir() -> Path:
    root = os.environ.get("LMMS_PLUGINS_CACHE") or Path.home() / ".cache" / "lmms_eval_plugins"
    return Path(root) / "heads"


class DiscoveryError(ValueError):
    pass


def load_task(task: str, include_path=None):
    """An lmms-eval task object by name (its dataset loaded), via lmms-eval's TaskManager."""
    from lmms_eval.tasks import TaskManager

    paths = [p for p in (include_path or []) if p] or None
    manager = TaskManager(include_path=paths)
    if task not in manager.all_tasks:
        raise DiscoveryError(
            f"unknown lmms-eval task {task!r}; add its directory with include_path (searched: {paths or 'lmms-eval defaults'})"
        )
    loaded = manager.load_task_or_group([task])
    obj = loaded.get(task)
    if obj is None or isinstance(obj, dict):
        raise DiscoveryError(f"{task!r} is a group; name one task with a grounding split (e.g. shapeworld_rec)")
    return obj


def resolve_split(task_obj, split: str | None) -> str:
    available = list(task_obj.dataset.keys()) if task_obj.dataset is not None else []
    if not split:
        split = getattr(task_obj.config, "training_split", None)
        if not split:
            raise DiscoveryError(
                f"task {task_obj.config.task!r} declares no training split; pass a split explicitly "
                f"(available: {', '.join(available)}) and do not evaluate on the split you discover on"
            )
    if split not in available:
        raise DiscoveryError(f"task {task_obj.config.task!r} has no split {split!r}; available: {', '.join(available)}")
    return split


def task_samples(task_obj, split: str, n: int, seed: int, repeats: int = 1) -> list[tuple]:
    """(image, prompt text) pairs: ``repeats`` seeded draws of ``n`` documents of the split."""
    docs = task_obj.dataset[split]
    samples = []
    for r in range(repeats):
        rng = random.Random(seed + r)
        for i in sorted(rng.sample(range(len(docs)), min(n, len(docs)))):
            doc = docs[i]
            visuals = task_obj.doc_to_visual(doc)
            if not visuals:
                raise DiscoveryError(f"document {i} of {task_obj.config.task}/{split} has no image")
            samples.append((visuals[0].convert("RGB"), task_obj.doc_to_text(doc)))
    return samples


def _fingerprint(model) -> str:
    """Model id, config and a few weights: a retrained checkpoint under the same name gets a new cache entry."""
    h = hashlib.sha256()
    h.update(lochead_heads.model_id(model).encode())
    h.update(model.config.to_json_string(use_diff=False).encode())
    for name, p in sorted(model.named_parameters())[:: max(1, len(list(model.parameters())) // 16)]:
        h.update(name.encode())
        h.update(p.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def image_settings(model, processor, block: str = "base") -> dict:
    """What decides the grid beyond the model (part of the cache key, recorded in the heads file): none for
    LLaVA-1.5; the block for the others (LLaVA-NeXT/OneVision, Gemma 3); also the processor's min/max pixels (its
    ``size``) for Qwen2.5-VL / Qwen3-VL, whose grid follows them, and InternVL's min/max_patches (its tiling)."""
    from methods import families

    family = families.adapter(getattr(model.config, "model_type", "llava"))
    if family.square_grid:
        return {}
    image_processor = getattr(processor, "image_processor", processor)
    if family.highres_block and hasattr(image_processor, "max_patches"):  # InternVL: the tiling sets the highres grid
        return {"block": block, "min_patches": image_processor.min_patches, "max_patches": image_processor.max_patches}
    if "image_grid_thw" not in family.request_inputs:  # the grid does not depend on the processor's pixel bounds
        return {"block": block}
    size = getattr(getattr(processor, "image_processor", processor), "size", None)
    size = (
        dict(size) if isinstance(size, dict) else {k: getattr(size, k, None) for k in ("shortest_edge", "longest_edge")}
    )
    return {"block": block, "image_processor_size": size}


def cache_path(
    model,
    task: str,
    split: str,
    n: int,
    seed: int,
    repeats: int,
    per_sample: int,
    connectivity: int,
    selection: str = "ours",
    prompt: str = "task",
    image: dict | None = None,
    precision: str = "fp32",
) -> Path:
    settings = [_fingerprint(model), task, split, n, seed, repeats, per_sample, connectivity]
    key = json.dumps(settings if (selection, prompt) == ("ours", "task") else [*settings, selection, prompt])
    if precision != "fp32":  # fp32 keys stay as they were
        key = json.dumps([json.loads(key), precision])
    if image:  # non-LLaVA-1.5 families only: LLaVA-1.5's keys stay as they were
        key = json.dumps([json.loads(key), image], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    name = Path(lochead_heads.model_id(model).rstrip("/")).name
    return cache_dir() / f"{name}-{task}-{split}-n{n}-s{seed}-{digest}.json"


def discover_for_task(
    model,
    processor,
    task: str,
    *,
    split: str | None = None,
    n: int = 1000,
    seed: int = 0,
    repeats: int = 5,
    selection: str = "ours",
    prompt: str = "task",
    checkpoint_every: int = 50,
    include_path=None,
    per_sample: int = 10,
    connectivity: int = 8,
    use_cache: bool = True,
    output: str | Path | None = None,
    save_visuals: str | Path | None = None,
    max_visuals: int = 8,
    progress: bool = True,
    model_name: str | None = None,
    block: str = "base",
    precision: str = "fp32",
) -> tuple[Path, dict, lochead_heads.DiscoveryResult | None]:
    """Discover the localization heads of ``model`` on ``task``; returns (heads file, its contents, result).

    A cached result for the same model, task, split, n, seed and settings is reused
    (result None) unless ``use_cache`` is false; ``output`` also receives a copy. ``model_name``
    is the id written to the file (default: the model's name_or_path). Defaults are the paper's scale
    (1000 samples x 5 repeats); the counts are saved every ``checkpoint_every`` samples next to the
    cache entry (``*.partial.json``) and a rerun with the same settings resumes from them.
    ``selection``/``prompt``: ours | official | official_v2, task | official (docs/lochead.md).
    ``block``: LLaVA-NeXT/OneVision, the block discovered on (base | highres, as lochead's ``block``).
    ``precision``: fp32 | official (the official selections in fp16, docs/lochead.md "Precision").
    ``processor``: the one evaluation uses (Qwen2.5-VL: at the same min/max pixels, which are part of the key).
    """
    include_path = list(include_path or []) or default_include_path()
    task_obj = load_task(task, include_path)
    split = resolve_split(task_obj, split)
    n_docs = len(task_obj.dataset[split])
    if n >= n_docs:  # every repeat would draw the whole split: one pass over it
        n, repeats = n_docs, 1
    image = image_settings(model, processor, block)
    cached = cache_path(
        model, task, split, n, seed, repeats, per_sample, connectivity, selection, prompt, image, precision
    )
    partial = cached.with_name(cached.stem + ".partial.json")
    result = None
    if use_cache and cached.is_file():
        doc = lochead_heads.read_heads_file(cached)
    else:
        samples = task_samples(task_obj, split, n, seed, repeats)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(samples), desc=f"discover-heads {task}/{split}")
        visuals = _visual_writer(save_visuals, max_visuals, processor, not image) if save_visuals else None
        resumed = (
            lochead_heads.DiscoveryResult.from_state(json.loads(partial.read_text()))
            if use_cache and partial.is_file()
            else None
        )
        if bar is not None and resumed is not None:
            bar.update(resumed.n_samples)

        def on_sample(i, *rest):
            if visuals is not None:
                visuals(i, *rest)
            if (i + 1) % checkpoint_every == 0:
                _write_partial(partial, state_of["result"])

        state_of = {}
        try:
            state_of["result"] = resumed or lochead_heads.DiscoveryResult(**lochead_heads.model_geometry(model))
            result = lochead_heads.discover_heads(
                model,
                processor,
                samples,
                per_sample=per_sample,
                connectivity=connectivity,
                selection=selection,
                prompt=prompt,
                progress=bar,
                on_sample=on_sample,
                result=state_of["result"],
                block=block,
                precision=precision,
            )
        finally:
            if bar is not None:
                bar.close()
        if save_visuals:
            _save_mean_curve(result, save_visuals)
        rule = {
            "ours": f"lowest-entropy top-{per_sample} per sample among the heads above the S_img knee, {connectivity}-connected components",
            "official": f"top-{per_sample} per sample of seilk/LocalizationHeads@8ce33b0's per-sample ranking (selection=official)",
            "official_v2": f"top-{per_sample} per sample of the 9ffe219 rewrite's analyze_heads (selection=official_v2)",
        }[selection]
        source = (
            f"discovered by `lmms-plugins discover-heads` on {task}/{split}: {result.n_samples} samples "
            f"(n={n} x repeats={repeats}, seeds {seed}..{seed + repeats - 1}), {rule}, prompt={prompt}, ranked by selection frequency"
        )
        doc = lochead_heads.write_heads_file(
            cached,
            result.ranked(),
            model_id=model_name or lochead_heads.model_id(model),
            num_layers=result.num_layers,
            num_heads=result.num_heads,
            source=source,
            extra={
                "task": task,
                "split": split,
                "n_samples": result.n_samples,
                "n": n,
                "repeats": repeats,
                "seed": seed,
                "selection": selection,
                "prompt": prompt,
                "per_sample": per_sample,
                "mean_knee_size": sum(result.knee_sizes) / max(1, len(result.knee_sizes)),
                **image,
            },
        )
        partial.unlink(missing_ok=True)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(doc, indent=1) + "\n")
    return cached, doc, result


def _write_partial(path: Path, result: lochead_heads.DiscoveryResult) -> None:
    """Atomically save the counts so far (a killed discovery resumes from them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result.state()))
    os.replace(tmp, path)


def _visual_writer(directory, max_visuals: int, processor, head_boxes: bool = True):
    """Per sample: the S_img curve with its knee; LLaVA-1.5 (``head_boxes``) also the selected heads' maps and box."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)

    def write(i, image, maps, s_img, candidates, selected, grid):
        if i >= max_visuals:
            return
        flat = s_img.flatten()
        values = flat.sort(descending=True).values.tolist()
        render_curve(values, knee_index(values), title=f"sample {i}: S_img").save(out / f"sample{i:03d}_s_img.png")
        if selected and head_boxes:  # the square grid's box drawn through the processor's geometry (LLaVA-1.5)
            head_maps = maps[[l for l, _ in selected], [h for _, h in selected]].reshape(-1, *grid)
            combined = combine_head_maps(head_maps[:3])
            box = box_from_grid(combined)
            geometry = processor_geometry(getattr(processor, "image_processor", processor), image.size)
            located = Located(geometry.to_original(box), box, list(selected), head_maps, combined, geometry)
            render_located(image, located).save(out / f"sample{i:03d}_heads.png")

    return write


def _save_mean_curve(result: lochead_heads.DiscoveryResult, directory) -> None:
    mean = (result.s_img_sum / max(result.n_samples, 1)).flatten()
    values = mean.sort(descending=True).values.tolist()
    render_curve(values, knee_index(values), title="mean S_img over samples").save(Path(directory) / "s_img_curve.png")
