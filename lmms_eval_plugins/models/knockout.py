"""`llava_knockout`: attention knockout (methods/knockout.py) inside lmms-eval's llava_hf."""

from methods.hooks import num_layers
from methods.knockout import DEFAULTS, LAST_ROW, OFFICIAL_FLAGS, QUERY_SETS, Knockout

from ..base import TechniqueSpec, wrapper_classes
from methods.params import Param

PARAMS = (
    Param(
        "mode",
        str,
        DEFAULTS["mode"],
        "query rows that lose the image: generated|query|both|all|block_query",
        choices=QUERY_SETS,
    ),
    Param(
        "from_layer",
        int,
        DEFAULTS["from_layer"],
        "first blocked language-model layer (0-based; negative: from the end)",
    ),
    Param(
        "to_layer",
        int,
        None,
        "one past the last blocked layer (default: the model's depth); = from_layer: none",
        optional=True,
    ),
    Param("outside", bool, DEFAULTS["outside"], "block every layer OUTSIDE [from_layer, to_layer) instead"),
    Param(
        "last_row",
        str,
        DEFAULTS["last_row"],
        "the last prompt row (it predicts the first answer token) counts as",
        choices=LAST_ROW,
    ),
    Param(
        "window",
        str,
        None,
        "official layer flag instead of from/to: after:L (layers > L) or not_4_to_20",
        optional=True,
    ),
    Param(
        "newlines",
        bool,
        DEFAULTS["newlines"],
        "LLaVA-NeXT/OneVision: block the high-res row-newline keys too (default: yes, after layer 0 they carry image information)",
    ),
)

# preset=official and the other run_on_coco.py flags (methods/knockout.py OFFICIAL_FLAGS); the official
# wrapper's process_images pads to a square (llava-v1.5-7b's image_aspect_ratio=pad: expand2square)
# and resizes with PIL (its CLIPImageProcessor, transformers 4.37: image_backend=pil)
OFFICIAL_PRESETS = {
    name: {"mode": m, "last_row": r, "window": w, "pad_to_square": True, "image_backend": "pil"}
    for name, (m, r, w) in OFFICIAL_FLAGS.items()
}

SPEC = TechniqueSpec(
    name="llava_knockout",
    params=PARAMS,
    build=lambda p, model: Knockout(num_layers(model), **{k: p[k] for k in DEFAULTS}),
    presets={
        "image_to_query": {"mode": "query"},
        "image_to_generated": {"mode": "generated"},
        "image_to_both": {"mode": "both"},
        **OFFICIAL_PRESETS,
    },
    doc="Attention knockout: block image keys for the generated/query/both/all rows in a layer window.",
)

LlavaKnockout, LlavaKnockoutChat = wrapper_classes(SPEC, __name__)


def bench_cases(ctx):
    """Knockout costs one eagerly recomputed block of rows per blocked layer; nothing else."""
    n = num_layers(ctx.model)
    mid = Knockout(n, mode="query", from_layer=n // 4, to_layer=max(n // 4 + 1, (3 * n) // 4))
    everything = Knockout(n, mode="both")
    return {
        "knockout_query_middle": lambda: mid.generate(ctx.model, ctx.request, **ctx.inputs, **ctx.gen_kwargs),
        "knockout_both_all_layers": lambda: everything.generate(ctx.model, ctx.request, **ctx.inputs, **ctx.gen_kwargs),
    }
