"""`internvl_hf_<technique>`: the techniques inside lmms-eval's own `internvl_hf` class (HF-native InternVL).

Each name is its LLaVA twin's spec (same parameters, methods/ arithmetic, recipe logging) on the InternVL
wrappers (lmms_eval_plugins/internvl.py) and adapter (methods/families/internvl.py). The prefix is
lmms-eval's class name, ``internvl_hf``: lmms-eval's ``internvl``/``internvl2``/``internvl3`` are other
(remote-code) classes. A technique that cannot run correctly on InternVL is still registered and refuses at
construction with the reason (its spec's ``refused``: PAINT, whose patch selection does not map one to one
onto pixel-shuffled tokens).
"""

import dataclasses

from ..internvl import FAMILY, internvl_wrapper_classes
from . import knockout, lochead, pai, paint, pm, reprompt, viral

# selection=describe's text after the image, in InternVL's chat format (llava_reprompt's is LLaVA-1.5's)
_REPROMPT_PARAMS = tuple(
    dataclasses.replace(p, default="</img>\ndescribe the image<|im_end|>\n<|im_start|>assistant\n")
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
    "viral": _spec(viral.SPEC, "viral", build=viral.builder("internvl_hf_viral")),
}

InternvlHfPai, InternvlHfPaiChat = internvl_wrapper_classes(SPECS["pai"], __name__)
InternvlHfKnockout, InternvlHfKnockoutChat = internvl_wrapper_classes(SPECS["knockout"], __name__)
InternvlHfLochead, InternvlHfLocheadChat = internvl_wrapper_classes(SPECS["lochead"], __name__)
InternvlHfPm, InternvlHfPmChat = internvl_wrapper_classes(SPECS["pm"], __name__)
InternvlHfPaint, InternvlHfPaintChat = internvl_wrapper_classes(SPECS["paint"], __name__)
InternvlHfReprompt, InternvlHfRepromptChat = internvl_wrapper_classes(SPECS["reprompt"], __name__)
InternvlHfViral, InternvlHfViralChat = internvl_wrapper_classes(SPECS["viral"], __name__)
