"""`llava_pm`: the Perception Magnifier (methods/pm.py) inside lmms-eval's llava_hf."""

from methods.hooks import num_layers
from methods.pm import BLOCK_ROWS, DEFAULTS, PRESETS, REFRESH, VIEWS, PerceptionMagnifier, image_grid

from ..base import TechniqueSpec, wrapper_classes
from ..params import Param
from ..visuals import rank_prefix, visuals_dir

PARAMS = (
    Param("deep_layer", int, None, "first deep layer L, 1-based (default: 12 of 32 scaled to the model's depth)", low=1, optional=True),
    Param("alpha", float, DEFAULTS["alpha"], "map contrast: sigmoid(alpha * standardised map)", low=0.0),
    Param("kernel", int, DEFAULTS["kernel"], "k x k box filter on the token-grid map (odd)", low=1, high=99),
    Param("beta", float, DEFAULTS["beta"], "stop refining when the remaining map sum / deep layers <= beta", low=0.0),
    Param("max_iter", int, DEFAULTS["max_iter"], "most refinement passes (re-forwards) per map", low=0, high=64),
    Param("refresh", str, DEFAULTS["refresh"], "when the map is computed: once (first step), every_token, every_n", choices=REFRESH),
    Param("refresh_n", int, DEFAULTS["refresh_n"], "with refresh=every_n: recompute the map every n tokens", low=1),
    Param(
        "block_rows",
        str,
        DEFAULTS["block_rows"],
        "who cannot see blocked tokens: all later tokens, text tokens, or the last query only "
        "(auto: all for once, last otherwise, as the reference)",
        choices=BLOCK_ROWS,
    ),
    Param("view", str, DEFAULTS["view"], "image geometry: pad (LLaVA-1.5, the paper) or crop (a centre-cropping processor)", choices=VIEWS),
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
    presets={name: dict(values) for name, values in PRESETS.items()},
    doc="Perception Magnifier: magnify the attended image regions (iteratively refined attention map) and answer again.",
)

LlavaPm, LlavaPmChat = wrapper_classes(SPEC, __name__)


def bench_cases(ctx):
    """One POPE-style sample with the map once (the default), and with the map every token."""
    n, grid = num_layers(ctx.model), image_grid(ctx.model)
    once = PerceptionMagnifier(n, grid)
    every = PerceptionMagnifier(n, grid, refresh="every_token")
    return {
        "pm_once": lambda: once.generate(ctx.model, ctx.request, **ctx.inputs, **ctx.gen_kwargs),
        "pm_every_token": lambda: every.generate(ctx.model, ctx.request, **ctx.inputs, **ctx.gen_kwargs),
    }
