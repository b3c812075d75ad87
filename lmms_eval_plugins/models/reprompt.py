"""`llava_reprompt`: attention-based image-token pruning (mode=prune) and answers from a compressed
image context reused across questions on the same image (mode=compressed); methods/reprompt.py."""

import sys
from pathlib import Path

from loguru import logger

from methods.hooks import num_layers
from methods.reprompt import (
    CACHE_STRATEGIES,
    DEFAULTS,
    DESCRIBE_SCORES,
    MODES,
    PRUNE_ROWS,
    SCORE_ROWS,
    SELECTIONS,
    Reprompt,
)
from methods.reprompt_context import forward_from

from ..base import TechniqueSpec, wrapper_classes
from methods.params import Param

PARAMS = (
    Param(
        "mode",
        str,
        DEFAULTS["mode"],
        "prune: mask unkept image keys; compressed: answer later questions from a compressed cache; fastv: the FastV baseline",
        choices=MODES,
    ),
    Param(
        "keep_ratio", float, DEFAULTS["keep_ratio"], "fraction of image tokens kept (at least one)", low=1e-6, high=1.0
    ),
    Param(
        "score_from_layer",
        int,
        DEFAULTS["score_from_layer"],
        "first layer whose attention scores the image tokens (pooled)",
    ),
    Param("score_to_layer", int, None, "one past the last scoring layer (default: the model's depth)", optional=True),
    Param(
        "score_rows",
        str,
        DEFAULTS["score_rows"],
        "rows whose attention scores: query (all prompt rows after the image) | last",
        choices=SCORE_ROWS,
    ),
    Param(
        "selection",
        str,
        DEFAULTS["selection"],
        "pooled: one kept set from layer-averaged scores; per_layer (prune only); describe: the official per-layer top-k from a describe-the-image pass per image (prune only)",
        choices=SELECTIONS,
    ),
    Param(
        "describe_score",
        str,
        DEFAULTS["describe_score"],
        "selection=describe: the official k_selection_method",
        choices=DESCRIBE_SCORES,
    ),
    Param("describe", str, DEFAULTS["describe"], "selection=describe: text after the image in the describe pass"),
    Param(
        "describe_tokens",
        int,
        DEFAULTS["describe_tokens"],
        "selection=describe: most tokens the describe pass generates; it stops at EOS (official max_new_tokens=300)",
        low=1,
    ),
    Param(
        "prune_rows",
        str,
        DEFAULTS["prune_rows"],
        "rows that lose the unkept image keys: after_image | decode (official) | all (official min_token 0)",
        choices=PRUNE_ROWS,
    ),
    Param("seed", int, DEFAULTS["seed"], "describe_score=random: seed of the per-layer permutations"),
    Param(
        "cache_strategy",
        str,
        "",
        "compressed: the official context from a describe pass (qs: system prompt + per-layer kept image entries + describe prompt; q; s); empty: ours",
        choices=("",) + CACHE_STRATEGIES,
    ),
    Param(
        "fastv_layer",
        int,
        DEFAULTS["fastv_layer"],
        "mode=fastv: first layer without the dropped image tokens (FastV's K)",
        low=1,
    ),
    Param(
        "fastv_ratio",
        float,
        DEFAULTS["fastv_ratio"],
        "mode=fastv: fraction of image tokens kept (int(n*R), plus the last one)",
        low=1e-6,
        high=1.0,
    ),
    Param(
        "keep_query", bool, DEFAULTS["keep_query"], "compressed: keep the first question's query tokens in the cache"
    ),
    Param(
        "primer",
        str,
        DEFAULTS["primer"],
        "compressed: build each image's cache from this text (e.g. 'describe the image') and answer every question from it",
    ),
    Param(
        "cache_size", int, DEFAULTS["cache_size"], "compressed: images whose compressed context is kept (LRU)", low=1
    ),
    Param(
        "stats_file",
        str,
        "auto",
        "JSON report of KV entries and time to first token; auto: <--output_path>/reprompt_stats.json, empty: log only",
    ),
)


def _stats_path(value: str):
    """`auto`: next to lmms-eval's output (the CLI's --output_path), one file per process."""
    if value != "auto":
        return Path(value) if value else None
    argv = sys.argv
    out = next((a.split("=", 1)[1] for a in argv if a.startswith("--output_path=")), None)
    if out is None and "--output_path" in argv and argv.index("--output_path") + 1 < len(argv):
        out = argv[argv.index("--output_path") + 1]
    if out is None:
        return None
    from accelerate import PartialState

    rank = PartialState().process_index
    return Path(out) / (
        f"reprompt_stats_rank{rank}.json" if PartialState().num_processes > 1 else "reprompt_stats.json"
    )


def build(p, model):
    technique = Reprompt(num_layers(model), **{k: p[k] for k in DEFAULTS})
    technique.stats_path = _stats_path(p["stats_file"])
    technique.log = logger.info
    return technique


SPEC = TechniqueSpec(
    name="llava_reprompt",
    params=PARAMS,
    build=build,
    presets={
        "prune_5pct": {"mode": "prune", "keep_ratio": 0.05},
        # OmriKaduri/vlm-interp run_on_coco.py -k 0.05 -k_selection_method attn_over_gen_percentage (default flags);
        # every official preset pads to a square, as the official wrapper's process_images (image_aspect_ratio=pad),
        # and resizes with PIL, as its CLIPImageProcessor (transformers 4.37)
        "official": {
            "pad_to_square": True,
            "image_backend": "pil",
            "mode": "prune",
            "keep_ratio": 0.05,
            "selection": "describe",
            "describe_score": "attn_over_gen",
            "prune_rows": "decode",
        },
        "fastv": {
            "pad_to_square": True,
            "image_backend": "pil",
            "mode": "fastv",
            "fastv_layer": 2,
            "fastv_ratio": 0.5,
        },  # FastV's K=2, R=50% (run_on_coco.py -fastv_*)
        # run_on_coco.py -k 0.05 then run_on_coco_from_cache.py -cache_strategy qs (its default)
        "official_reprompt": {
            "pad_to_square": True,
            "image_backend": "pil",
            "mode": "compressed",
            "keep_ratio": 0.05,
            "cache_strategy": "qs",
            "describe_score": "attn_over_gen",
        },
        "official_no_encoding": {
            "pad_to_square": True,
            "image_backend": "pil",
            "mode": "prune",
            "keep_ratio": 0.05,
            "selection": "describe",
            "describe_score": "attn_over_gen",
            "prune_rows": "all",
        },
        "compressed_5pct": {"mode": "compressed", "keep_ratio": 0.05},
        "describe_primer": {
            "mode": "compressed",
            "keep_ratio": 0.05,
            "primer": "\nPlease describe this image in detail.",
        },
    },
    doc="Image-token pruning by attention (mode=prune) and re-prompting from a compressed image context (mode=compressed).",
)

LlavaReprompt, LlavaRepromptChat = wrapper_classes(SPEC, __name__)


def bench_cases(ctx):
    """Pruning at 5%; a compressed follow-up at 5% (the image's context is built once, here): its whole
    generate, and its prefill alone against a full prefill (= time to first token vs full prefill)."""
    n = num_layers(ctx.model)
    prune = Reprompt(n, mode="prune", keep_ratio=0.05)
    followup = Reprompt(n, mode="compressed", keep_ratio=0.05)
    followup.generate(ctx.model, ctx.request, **ctx.inputs, **ctx.gen_kwargs)  # the first question builds the context
    context = next(iter(followup.contexts.values()))
    suffix = ctx.request.input_ids[:, int(ctx.request.image_pos[-1]) + 1 :]
    kv = f"KV {context.entries} of {context.full_entries} entries"
    return {
        "prune 5%": lambda: prune.generate(ctx.model, ctx.request, **ctx.inputs, **ctx.gen_kwargs),
        f"compressed follow-up 5% ({kv})": lambda: followup.generate(
            ctx.model, ctx.request, **ctx.inputs, **ctx.gen_kwargs
        ),
        f"compressed follow-up 5% prefill vs full prefill ({kv})": (
            lambda: forward_from(ctx.model, context, suffix),
            "forward",
        ),
    }
