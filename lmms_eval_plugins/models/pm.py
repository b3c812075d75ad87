"""`llava_pm`: the Perception Magnifier (methods/pm.py) inside lmms-eval's llava_hf (LLaVA-1.5);
the same spec runs as `qwen2_5_vl_pm` (models/qwen2_5_vl.py; the family differences are
the family adapters, methods/families/, and methods/pm_view.py)."""

from methods.hooks import num_layers
from methods.pm import (
    REFUSED,
    BLOCK_ROWS,
    DEFAULTS,
    LAYER_MAPS,
    MAP_QUANT,
    PRECISIONS,
    PRESETS,
    REFINE,
    REFRESH,
    SAMPLERS,
    TWO_MEANS,
    PerceptionMagnifier,
    replay_passes,
)
from methods.pm_view import image_grid
from methods.pm_magnify import VIEWS

from ..base import TechniqueSpec, wrapper_classes
from methods.params import Param
from ..visuals import rank_prefix, visuals_dir

PARAMS = (
    Param(
        "deep_layer",
        int,
        None,
        "first deep layer L, 1-based (default: 12 of 32 scaled to the model's depth)",
        low=1,
        optional=True,
    ),
    Param("alpha", float, DEFAULTS["alpha"], "map contrast: sigmoid(alpha * standardised map)", low=0.0),
    Param("kernel", int, DEFAULTS["kernel"], "k x k box filter on the token-grid map (odd)", low=1, high=99),
    Param("beta", float, DEFAULTS["beta"], "stop refining when the remaining map sum / deep layers <= beta", low=0.0),
    Param("max_iter", int, DEFAULTS["max_iter"], "most refinement passes (re-forwards) per map", low=0, high=64),
    Param(
        "refresh",
        str,
        DEFAULTS["refresh"],
        "when the map is computed: once (first step), every_token, every_n",
        choices=REFRESH,
    ),
    Param("refresh_n", int, DEFAULTS["refresh_n"], "with refresh=every_n: recompute the map every n tokens", low=1),
    Param(
        "block_rows",
        str,
        DEFAULTS["block_rows"],
        "who cannot see blocked tokens: all later tokens, text tokens, or the last query only "
        "(auto: all for once, last otherwise; first_all: all at the first map, last after, as the reference's per-token path)",
        choices=BLOCK_ROWS,
    ),
    Param(
        "refine",
        str,
        DEFAULTS["refine"],
        "refinement passes: exact (recompute every row the block_rows mask changes, reusing the rest) or fast "
        "(recompute only the last row, the one the map reads, against the unmasked cache: not the reference's "
        "arithmetic, see docs/pm.md for how often it agrees); never set by a preset",
        choices=REFINE,
    ),
    Param(
        "view",
        str,
        DEFAULTS["view"],
        "image geometry: pad (LLaVA-1.5, the paper) or crop (a centre-cropping processor); Qwen2.5-VL: the whole image (crop refused)",
        choices=VIEWS,
    ),
    Param(
        "layer_map",
        str,
        DEFAULTS["layer_map"],
        "map / exit divisor: mean (layers summed) or official (float32 sum / (n_layers - L))",
        choices=LAYER_MAPS,
    ),
    Param(
        "two_means",
        str,
        DEFAULTS["two_means"],
        "2-means split: stable (until no change) or official (10 steps / 1e-4 shift)",
        choices=TWO_MEANS,
    ),
    Param(
        "map_quant",
        str,
        DEFAULTS["map_quant"],
        "perception map: float, or uint8 (the official x255 truncation, bicubic on 8 bits)",
        choices=MAP_QUANT,
    ),
    Param(
        "sampler",
        str,
        DEFAULTS["sampler"],
        "inverse-CDF grid: centres (identity on a flat map) or official (linspace over cumsum)",
        choices=SAMPLERS,
    ),
    Param(
        "single_layer",
        bool,
        DEFAULTS["single_layer"],
        "map from the first deep layer alone (the official --single_layer)",
    ),
    Param(
        "temperature",
        float,
        None,
        "sample at this temperature with top_k 50 (the official runs use 1.0 over the full vocabulary, no top-k); default: the task's decoding",
        low=1e-3,
        high=10.0,
        optional=True,
    ),
    Param(
        "precision",
        str,
        DEFAULTS["precision"],
        "fp32, or official: with layer_map=official, each layer's map rounded to fp16 and summed in numpy float16 "
        "(the reference's fp16 runs; the model keeps its dtype); docs/pm.md 'Precision'",
        choices=PRECISIONS,
    ),
    Param(
        "resample_cd",
        float,
        DEFAULTS["resample_cd"],
        "loglikelihood: magnified + cd * (magnified - original) logits (the official --resample_cd)",
        low=-10.0,
        high=10.0,
    ),
)


def build(p, model):
    return PerceptionMagnifier(
        num_layers(model),
        image_grid(model),
        visuals_dir=visuals_dir(p["save_visuals"], "llava_pm"),
        max_visuals=p["max_visuals"],
        visuals_prefix=rank_prefix(),
        **{k: p[k] for k in DEFAULTS},
    )


SPEC = TechniqueSpec(
    name="llava_pm",
    params=PARAMS,
    build=build,
    # the official presets see the official pixels: mm_utils.py:166-184 runs transformers 4.37's CLIPImageProcessor (PIL)
    presets={
        name: {**values, "image_backend": "pil"} if name.startswith("official") else dict(values)
        for name, values in PRESETS.items()
    },
    doc="Perception Magnifier: magnify the attended image regions (iteratively refined attention map) and answer again.",
    refused=REFUSED,
)

LlavaPm, LlavaPmChat = wrapper_classes(SPEC, __name__)


def bench_cases(ctx):
    """One POPE-style sample with the map once (the default, exact), with refine=fast, and with the map every
    token; and the passes of the exact sample's search replayed on the plain model without PM (the vision tower,
    the map pass and each refinement pass from the same position, then stock generate): what its passes alone
    cost, the reference for PM's own overhead."""
    n, grid = num_layers(ctx.model), image_grid(ctx.model)
    once = PerceptionMagnifier(n, grid)
    fast = PerceptionMagnifier(n, grid, refine="fast")
    every = PerceptionMagnifier(n, grid, refresh="every_token")

    def passes_alone():
        if once.last_magnified is None:  # the search to replay (the warm-up call runs it)
            once.generate(ctx.model, ctx.request, **ctx.inputs, **ctx.gen_kwargs)
        replay_passes(ctx.plain, ctx.request, ctx.inputs["pixel_values"], once.last_magnified)
        return ctx.plain.generate(**ctx.inputs, **ctx.gen_kwargs)

    return {
        "pm_once": lambda: once.generate(ctx.model, ctx.request, **ctx.inputs, **ctx.gen_kwargs),
        "pm_passes_alone: the once search's passes on the plain model + stock generate": passes_alone,
        "pm_fast: once, refine=fast": lambda: fast.generate(ctx.model, ctx.request, **ctx.inputs, **ctx.gen_kwargs),
        "pm_every_token": lambda: every.generate(ctx.model, ctx.request, **ctx.inputs, **ctx.gen_kwargs),
    }
