"""`llava_lochead`: grounding from localization heads (methods/lochead.py) inside lmms-eval's llava_hf.

The answer of a REC request is the box ``[x1, y1, x2, y2]`` (0..1 of the original image)
computed from one prefill; ``generate`` returns prompt ids + the box's token ids, which
llava_hf decodes like any generated answer (see docs/lochead.md for why this path).
Presets ``official`` (seilk/LocalizationHeads @ 8ce33b0: its prompt and selection) and
``official_v2`` (the 9ffe219 rewrite: each request's own top-5 heads and its box) reproduce the
official code on golden fixtures (tests/test_parity_lochead.py; through this wrapper:
tests/test_parity_wrappers.py).
"""

from __future__ import annotations

from pathlib import Path

from methods import lochead, lochead_heads, lochead_maps, lochead_official
from methods.lochead import DEFAULTS, LocHead

from ..base import TechniqueSpec, wrapper_classes
from methods.params import ModelArgsError, Param

PARAMS = (
    Param(
        "heads",
        str,
        "shipped",
        "shipped (heads/<model>.json) | auto (discover on discover_task) | self (each request's own best heads, as 9ffe219's pipeline) | all (mean of all heads) | random | <path.json>",
    ),
    Param("top_k", int, DEFAULTS["top_k"], "how many of the ranked heads are summed", low=1),
    Param("sigma", float, DEFAULTS["sigma"], "Gaussian smoothing of each head map (grid cells)", low=0.0),
    Param(
        "box_mode",
        str,
        DEFAULTS["box_mode"],
        "box of the largest component, or min/max box of all cells above the mean",
        choices=lochead_maps.BOX_MODES,
    ),
    Param("connectivity", int, DEFAULTS["connectivity"], "connected components: 4- or 8-neighbourhood", choices=(4, 8)),
    Param("decimals", int, DEFAULTS["decimals"], "decimals of the box coordinates in the answer", low=1, high=6),
    Param(
        "selection",
        str,
        DEFAULTS["selection"],
        "head selection: ours | official (8ce33b0) | official_v2 (9ffe219); see docs/lochead.md",
        choices=lochead_official.SELECTIONS,
    ),
    Param(
        "precision",
        str,
        DEFAULTS["precision"],
        "official selections' arithmetic: fp32, or official (maps, head sums and entropies in fp16 as the official "
        "fp16 runs; fp16 sums tie and numpy's unstable argsort picks HEAD's elbow among them); docs/lochead.md 'Precision'",
        choices=lochead.PRECISIONS,
    ),
    Param(
        "box_scaling",
        str,
        DEFAULTS["box_scaling"],
        "geometry: undo the processor's pad/crop | stretch: 9ffe219's grid box stretched onto the image",
        choices=lochead.BOX_SCALINGS,
    ),
    Param(
        "prompt",
        str,
        DEFAULTS["prompt"],
        "task: the lmms-eval task's prompt | official: the official referseg prompt (query row = the expression's last token)",
        choices=lochead.PROMPTS,
    ),
    Param(
        "block",
        str,
        "base",
        "LLaVA-NeXT/OneVision: read maps and box from the base crop's grid or the high-res (tiled) grid",
        choices=lochead.BLOCKS,
    ),
    Param("check_model_id", bool, True, "refuse a heads file made for another model id"),
    Param("random_seed", int, 0, "seed of heads=random"),
    Param("discover_task", str, "", "heads=auto: lmms-eval task whose split is searched (e.g. shapeworld_rec)"),
    Param("discover_split", str, "", "heads=auto: split (default: the task's training split)"),
    Param("discover_n", int, 1000, "heads=auto: samples per repeat (the paper: 1000)", low=1),
    Param("discover_repeats", int, 5, "heads=auto: repeats with seeds seed..seed+repeats-1 (the paper: 5)", low=1),
    Param("discover_seed", int, 0, "heads=auto: sampling seed"),
    Param("include_path", str, "", "heads=auto: extra lmms-eval task directory (default: the project's task_configs)"),
    Param(
        "sam",
        str,
        "",
        "optional local SAM checkpoint directory (transformers SamModel): mask from the box + peak point",
    ),
    Param("sam_box", bool, False, "answer with the SAM mask's box instead of the attention box (needs sam)"),
)


def discover(p: dict, model, processor) -> list[tuple[int, int]]:
    """heads=auto: the heads discovered (or cached) on discover_task with ``processor``, validated against the model."""
    from ..heads import discover_for_task

    path, _, _ = discover_for_task(
        model,
        processor,
        p["discover_task"],
        split=p["discover_split"] or None,
        n=p["discover_n"],
        repeats=p["discover_repeats"],
        seed=p["discover_seed"],
        selection=p["selection"],
        prompt=p["prompt"],
        include_path=[p["include_path"]] if p["include_path"] else None,
        save_visuals=Path(p["save_visuals"]) / "discovery" if p["save_visuals"] else None,
        max_visuals=p["max_visuals"],
        block=p["block"],
        precision=p["precision"],
    )
    return lochead_heads.load_heads(path, model)


def resolve_heads(p: dict, model):
    """The ranked (layer, head) list (or "all") named by the heads parameter, validated against the model;
    heads=auto off LLaVA-1.5: a callback(processor) run at the first request (LocHead.pending)."""
    from ..heads import shipped_heads, shipped_heads_path

    choice = p["heads"]
    geo = lochead_heads.model_geometry(model)
    if choice in ("all", "self"):
        return choice
    if choice == "random":
        return lochead_heads.random_heads(geo["num_layers"], geo["num_heads"], p["top_k"], p["random_seed"])
    if choice == "auto":
        if not p["discover_task"]:
            raise ModelArgsError(
                "heads=auto needs discover_task=<an lmms-eval task with a grounding train split>, e.g. discover_task=shapeworld_rec"
            )
        if (
            getattr(model.config, "model_type", "llava") != "llava"
        ):  # discover with evaluation's processor (Qwen: its min/max pixels)
            return lambda processor: discover(p, model, processor)
        from transformers import AutoProcessor

        return discover(p, model, AutoProcessor.from_pretrained(lochead_heads.model_id(model)))
    if choice == "shipped":
        path = shipped_heads_path(lochead_heads.model_id(model))
        if not path.is_file():
            raise ModelArgsError(
                f"no shipped heads file for {lochead_heads.model_id(model)!r} (shipped: {', '.join(shipped_heads())}); "
                "use heads=auto with discover_task=..., heads=<path.json> from `lmms-plugins discover-heads`, or heads=all"
            )
        if lochead_heads.read_heads_file(path).get("provenance", {}).get("official") is False:
            from loguru import logger

            logger.warning(
                f"heads=shipped: {path.name} holds a third-party fork's hand-set heads, not the paper's (see its 'source')"
            )
        return lochead_heads.load_heads(path, model, check_model_id=p["check_model_id"])
    return lochead_heads.load_heads(choice, model, check_model_id=p["check_model_id"])


def build(p: dict, model) -> LocHead:
    if p["sam_box"] and not p["sam"]:
        raise ModelArgsError("sam_box=true needs sam=<local SAM checkpoint directory>")
    heads = resolve_heads(p, model)
    technique = LocHead("all" if callable(heads) else heads, **{k: p[k] for k in DEFAULTS})
    technique.pending = heads if callable(heads) else None
    sam = lochead.SamRefiner(p["sam"], use_box=p["sam_box"]) if p["sam"] else None
    technique.refiner = sam
    if p["save_visuals"]:
        technique.on_located = visual_saver(Path(p["save_visuals"]), p["max_visuals"])
    return technique


def visual_saver(directory: Path, max_visuals: int):
    from methods.lochead_visuals import render_located

    count = {"n": 0}

    def save(req, located):
        if count["n"] >= max_visuals:
            return
        directory.mkdir(parents=True, exist_ok=True)
        render_located(located.image or req.images[0], located, mask=located.mask).save(
            directory / f"lochead_{count['n']:04d}.png"
        )
        count["n"] += 1

    return save


SPEC = TechniqueSpec(
    name="llava_lochead",
    params=PARAMS,
    build=build,
    presets={
        "paper": {"top_k": 3, "sigma": 1.0, "box_mode": "minmax"},
        # 8ce33b0 (HEAD): its prompt and head selection (discovery only; HEAD has no box code: the paper's box).
        # Both official versions run LLaVA-1.5's process_images (image_aspect_ratio=pad: expand2square).
        "official": {
            "prompt": "official",
            "selection": "official",
            "top_k": 3,
            "sigma": 1.0,
            "box_mode": "minmax",
            "pad_to_square": True,
            "image_backend": "pil",  # LLaVA-1.5's CLIPImageProcessor from transformers 4.x: PIL resampling
            "precision": "official",  # the official runs are fp16 (docs/lochead.md "Precision")
        },
        # 9ffe219: each request's own top-5 heads, its selection, its min/max box stretched onto the image
        "official_v2": {
            "pad_to_square": True,
            "image_backend": "pil",  # LLaVA-1.5's CLIPImageProcessor from transformers 4.x: PIL resampling
            "precision": "official",  # the official runs are fp16 (docs/lochead.md "Precision")
            "prompt": "official",
            "selection": "official_v2",
            "heads": "self",
            "top_k": 5,
            "sigma": 1.0,
            "box_mode": "minmax",
            "box_scaling": "stretch",
        },
        "all_heads": {"heads": "all"},
        "random_head": {"heads": "random", "top_k": 1},
    },
    doc="Localization heads: a REC box from a few attention heads' maps in one prefill (no decoding).",
)

LlavaLochead, LlavaLocheadChat = wrapper_classes(SPEC, __name__)


def bench_cases(ctx) -> dict:
    """One REC sample: the prefill up to the deepest head + the box (all of generate but tokenizing the box text).

    Compare with ``--new-tokens 25``: "[0.12, 0.34, 0.56, 0.78]" is about 25 LLaMA tokens.
    """
    geo = lochead_heads.model_geometry(ctx.model)
    n_layers, n_heads = geo["num_layers"], geo["num_heads"]
    like_7b = min(n_layers - 1, round(14 * n_layers / 32))  # the 7B heads sit in layer 14 of 32
    cases = {
        "rec_3_heads_at_0.44_depth": LocHead([(like_7b, h % n_heads) for h in (24, 13, 26)]),
        "rec_head_in_last_layer": LocHead([(n_layers - 1, 0)], top_k=1),
        "rec_all_heads": LocHead("all"),
    }
    return {name: (lambda t=t: t.locate(ctx.model, ctx.request, **ctx.inputs)) for name, t in cases.items()}
