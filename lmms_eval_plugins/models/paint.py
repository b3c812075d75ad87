"""`llava_paint` (alias `llava_fia`): PAINT's selective image-token boost (methods/paint.py)
inside lmms-eval's llava_hf."""

from methods.paint import (
    DEFAULTS,
    HEAD_MODULATIONS,
    NO_CLS_MEASURED,  # noqa: F401  (the measured reason towers without CLS are refused; qwen2_5_vl_paint's too)
    REFUSED,
    SELECTION_PRECISIONS,
    SELECTION_SOURCES,
    SPATIAL_VARIANTS,
    Paint,
)

from ..base import TechniqueSpec, wrapper_classes
from methods.params import Param
from .pai import WINDOW_AND_CFG_PARAMS

PARAMS = (
    Param("alpha", float, DEFAULTS["alpha"], "margin on local (and spatial) tokens: a + alpha*|a|", low=0.0),
    Param("beta", float, DEFAULTS["beta"], "margin on summary tokens: a + beta*|a|", low=0.0),
    Param(
        "top_ratio",
        float,
        DEFAULTS["top_ratio"],
        "local tokens: top fraction of patches by layer-0 CLS attention",
        low=0.0,
        high=1.0,
    ),
    Param(
        "spatial_ratio",
        float,
        DEFAULTS["spatial_ratio"],
        "spatial tokens: fraction of patches (0: off)",
        low=0.0,
        high=1.0,
    ),
    Param(
        "spatial",
        str,
        DEFAULTS["spatial"],
        "spatial tokens: grid (ours, a stratified lattice) or official (top row sums of layer-0 attention)",
        choices=SPATIAL_VARIANTS,
    ),
    Param(
        "selection_precision",
        str,
        DEFAULTS["selection_precision"],
        "selection arithmetic: float32, model (the vision tower's dtype), or float16 (as the official fp16 runs, "
        "on any model; docs/paint.md 'Precision')",
        choices=SELECTION_PRECISIONS,
    ),
    Param(
        "selection_source",
        str,
        DEFAULTS["selection_source"],
        "local/summary tokens from: cls (the vision tower's CLS "
        "attention, the paper's) or received (ours, a measured ablation: the attention each patch receives from the "
        "patches; it does not reproduce the CLS selection, docs/paint.md)",
        choices=SELECTION_SOURCES,
    ),
    Param("local_layer", int, DEFAULTS["local_layer"], "vision-tower layer whose CLS attention picks local tokens"),
    Param(
        "summary_layer",
        int,
        DEFAULTS["summary_layer"],
        "vision-tower layer whose CLS-attention outliers are summary tokens (-2: penultimate)",
    ),
    Param(
        "head_modulation",
        str,
        DEFAULTS["head_modulation"],
        "scale margins per head by visual sensitivity",
        choices=HEAD_MODULATIONS,
    ),
    Param(
        "max_head_scale",
        float,
        DEFAULTS["max_head_scale"],
        "cap on the per-head scale (sensitivity / mean sensitivity)",
        low=1.0,
    ),
    *WINDOW_AND_CFG_PARAMS,
)

# What the official code (hasanar1f/PAINT @ 2a9e8f8, modPAI/) runs; docs/paint.md has the parity table.
OFFICIAL = {
    "alpha": 0.7,  # chair_eval.py:51 (argparse default; modpai_eval.sh:17 passes 0.9, see "script")
    "beta": 0.3,  # chair_eval.py:52
    "top_ratio": 0.25,  # clip_encoder.py:37 (chair_eval.py:50's --top_token_ratio is never passed on)
    "start_layer": 2,  # chair_eval.py:57 and modpai_eval.sh:17
    "end_layer": None,  # chair_eval.py:58: 32, the depth of LLaVA-1.5-7B
    "use_cfg": True,  # modpai_eval.sh:17 --use-cfg; every result file ends in _cfg_1.1
    "gamma": 1.1,  # modpai_eval.sh:17 (the argparse default, chair_eval.py:55, is 2)
    "cutoff": 0.1,  # CFG.py:53
    "boost_first_step": False,  # attention.py:125,139: llama_modify(use_cfg=True) keeps the prefill unboosted
    "official_quirks": True,  # CFG.py:43-47 (image-free cache ignores beam reordering), CFG.py:30-31 (gamma 1: no boost)
    "spatial": "official",  # clip_encoder.py:31-34
    "spatial_ratio": 0.0,  # clip_encoder.py:41 passes no ratio: 0
    "selection_precision": "float16",  # the fp16 model's attentions, summed in fp16 (clip_encoder.py:38-39)
    "head_modulation": "none",  # not in the official code
}

SPEC = TechniqueSpec(
    name="llava_paint",
    params=PARAMS,
    build=lambda p, model: Paint.for_model(
        model, **{k: p[k] for k in DEFAULTS}, save_visuals=p["save_visuals"], max_visuals=p["max_visuals"]
    ),
    presets={
        # modPAI/chair_eval.py:72, pope_eval.py:69 call LLaVA-1.5's CLIPImageProcessor (transformers 4.37: PIL) on the image
        "official": {**OFFICIAL, "image_backend": "pil"},
        # modpai_eval.sh:17 verbatim (its captions in the repository's results average 6 words)
        "script": {**OFFICIAL, "image_backend": "pil", "alpha": 0.9},
        # paper, spatial-token ablation: alpha 0.7, beta 0.4 (results/chair/llava-1.5/*_alpha_0.7_beta_0.4_cfg_1.1.jsonl)
        "paper": {**OFFICIAL, "image_backend": "pil", "beta": 0.4},
        # paper, "PAINT with spatial tokens" (*_alpha_0.7_beta_0.4_cfg_1.1_spatial_0.05.jsonl; the only spatial code is clip_encoder.py:31)
        "paper_spatial": {**OFFICIAL, "image_backend": "pil", "beta": 0.4, "spatial_ratio": 0.05},
        # ours: the paper's margins with our evenly spread spatial tokens and per-head modulation, no CFG
        "full": {"alpha": 0.7, "beta": 0.4, "spatial": "grid", "spatial_ratio": 0.05, "head_modulation": "sensitivity"},
    },
    aliases=("llava_fia",),
    refused=REFUSED,
    doc="PAINT: boost local/summary (and spatial) image tokens chosen from the vision tower's CLS attention.",
)

LlavaPaint, LlavaPaintChat = wrapper_classes(SPEC, __name__)


def bench_cases(ctx):
    """One sample of each variant, timed by `lmms-plugins bench` against greedy generate."""

    fitted = ctx.fit_layers("paint", DEFAULTS)  # default layers the bench model lacks, adapted

    def run(**params):
        technique = Paint.for_model(ctx.model, **{**fitted, **params})
        return lambda: technique.generate(ctx.model, ctx.request, **ctx.inputs, **ctx.gen_kwargs)

    return {
        "default (no CFG)": run(),
        "spatial_ratio=0.05": run(spatial_ratio=0.05),
        "head_modulation=sensitivity": run(head_modulation="sensitivity"),
        "use_cfg=true": run(use_cfg=True),
    }
