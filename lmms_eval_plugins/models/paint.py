"""`llava_paint` (alias `llava_fia`): PAINT's selective image-token boost (methods/paint.py)
inside lmms-eval's llava_hf."""

from methods.paint import DEFAULTS, HEAD_MODULATIONS, Paint

from ..base import TechniqueSpec, wrapper_classes
from ..params import Param
from .pai import WINDOW_AND_CFG_PARAMS

PARAMS = (
    Param("alpha", float, DEFAULTS["alpha"], "margin on local (and spatial) tokens: a + alpha*|a|", low=0.0),
    Param("beta", float, DEFAULTS["beta"], "margin on summary tokens: a + beta*|a|", low=0.0),
    Param("top_ratio", float, DEFAULTS["top_ratio"], "local tokens: top fraction of patches by layer-0 CLS attention", low=0.0, high=1.0),
    Param("spatial_ratio", float, DEFAULTS["spatial_ratio"], "spatial tokens: fraction of patches on a stratified grid (0: off)", low=0.0, high=1.0),
    Param("local_layer", int, DEFAULTS["local_layer"], "vision-tower layer whose CLS attention picks local tokens"),
    Param("summary_layer", int, DEFAULTS["summary_layer"], "vision-tower layer whose CLS-attention outliers are summary tokens (-2: penultimate)"),
    Param("head_modulation", str, DEFAULTS["head_modulation"], "scale margins per head by visual sensitivity", choices=HEAD_MODULATIONS),
    Param("max_head_scale", float, DEFAULTS["max_head_scale"], "cap on the per-head scale (sensitivity / mean sensitivity)", low=1.0),
    *WINDOW_AND_CFG_PARAMS,
)

SPEC = TechniqueSpec(
    name="llava_paint",
    params=PARAMS,
    build=lambda p, model: Paint.for_model(
        model, **{k: p[k] for k in DEFAULTS}, save_visuals=p["save_visuals"], max_visuals=p["max_visuals"]
    ),
    presets={
        "paper": {"alpha": 0.7, "beta": 0.4},
        "reference": {"alpha": 0.9, "beta": 0.3},  # the public reference script's margins
        "full": {"alpha": 0.7, "beta": 0.4, "spatial_ratio": 0.05, "head_modulation": "sensitivity"},
    },
    aliases=("llava_fia",),
    doc="PAINT: boost local/summary (and spatial) image tokens chosen from the vision tower's CLS attention.",
)

LlavaPaint, LlavaPaintChat = wrapper_classes(SPEC, __name__)


def bench_cases(ctx):
    """One sample of each variant, timed by `lmms-plugins bench` against greedy generate."""

    def run(**params):
        technique = Paint.for_model(ctx.model, **params)
        return lambda: technique.generate(ctx.model, ctx.request, **ctx.inputs, **ctx.gen_kwargs)

    return {
        "default (no CFG)": run(),
        "spatial_ratio=0.05": run(spatial_ratio=0.05),
        "head_modulation=sensitivity": run(head_modulation="sensitivity"),
        "use_cfg=true": run(use_cfg=True),
    }
