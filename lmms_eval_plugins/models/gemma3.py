"""`gemma3_<technique>`: the techniques inside lmms-eval's own `gemma3` class (simple only in 0.7.3).

Each name is its LLaVA twin's spec (same parameters, methods/ arithmetic, recipe logging) on the Gemma 3
wrappers (lmms_eval_plugins/gemma3.py) and adapter (methods/families/gemma3.py). A technique that cannot
run correctly on Gemma 3 is still registered and refuses at construction with the reason (its spec's
``refused``: PAINT, whose selection reads a CLS token SigLIP does not have).
"""

import dataclasses

from ..gemma3 import FAMILY, gemma3_wrapper_classes
from . import knockout, lochead, pai, paint, pm, reprompt, viral

# selection=describe's text after the image, in Gemma 3's chat format (llava_reprompt's is LLaVA-1.5's)
_REPROMPT_PARAMS = tuple(
    dataclasses.replace(p, default="<end_of_image>describe the image<end_of_turn>\n<start_of_turn>model\n")
    if p.name == "describe"
    else p
    for p in reprompt.SPEC.params
)


def _spec(spec, technique: str, **changes):
    return dataclasses.replace(spec, name=f"{FAMILY}_{technique}", aliases=(), **changes)


SPECS = {
    "pai": _spec(pai.SPEC, "pai"),
    "knockout": _spec(knockout.SPEC, "knockout"),
    "lochead": _spec(lochead.SPEC, "lochead"),
    "pm": _spec(pm.SPEC, "pm"),
    "paint": _spec(paint.SPEC, "paint"),
    "reprompt": _spec(reprompt.SPEC, "reprompt", params=_REPROMPT_PARAMS),
    "viral": _spec(viral.SPEC, "viral", build=viral.builder("gemma3_viral")),
}

Gemma3Pai = gemma3_wrapper_classes(SPECS["pai"], __name__)
Gemma3Knockout = gemma3_wrapper_classes(SPECS["knockout"], __name__)
Gemma3Lochead = gemma3_wrapper_classes(SPECS["lochead"], __name__)
Gemma3Pm = gemma3_wrapper_classes(SPECS["pm"], __name__)
Gemma3Paint = gemma3_wrapper_classes(SPECS["paint"], __name__)
Gemma3Reprompt = gemma3_wrapper_classes(SPECS["reprompt"], __name__)
Gemma3Viral = gemma3_wrapper_classes(SPECS["viral"], __name__)
