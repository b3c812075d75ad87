"""`qwen3_vl_<technique>`: the techniques inside lmms-eval's own `qwen3_vl` classes.

Each name is its LLaVA twin's spec (same parameters, methods/ arithmetic, recipe logging) on the Qwen3-VL
wrappers (lmms_eval_plugins/qwen3_vl.py) and adapter (methods/families/qwen3_vl.py). A technique that cannot
run correctly on Qwen3-VL is still registered and refuses at construction with the reason (its spec's
``refused``: PAINT, whose selection reads a CLS token the tower does not have). docs/qwen3_vl.md says what
each technique means under DeepStack.
"""

import dataclasses

from methods.hooks import num_layers
from methods.knockout import DEFAULTS as KNOCKOUT_DEFAULTS
from methods.knockout import INJECTION, Knockout
from methods.params import Param

from ..qwen3_vl import FAMILY, qwen3_vl_wrapper_classes
from . import knockout, lochead, pai, paint, pm, reprompt, viral
from .qwen2_5_vl import _REPROMPT_PARAMS  # selection=describe's text in Qwen's chat format

# Knockout blocks attention edges; DeepStack's features stay in the image positions' own states (keep), or
# are not added at all for the run (drop). Measured in docs/qwen3_vl.md.
_DEEPSTACK = Param(
    "deepstack",
    str,
    "keep",
    "DeepStack's image features added to the first LM layers' image states: keep (only attention is cut) or drop (not added either)",
    choices=INJECTION,
)


def _knockout_build(params, model):
    return Knockout(num_layers(model), injection=params["deepstack"], **{k: params[k] for k in KNOCKOUT_DEFAULTS})


def _spec(spec, technique: str, **changes):
    return dataclasses.replace(spec, name=f"{FAMILY}_{technique}", aliases=(), **changes)


SPECS = {
    "pai": _spec(pai.SPEC, "pai"),
    "knockout": _spec(knockout.SPEC, "knockout", params=(*knockout.SPEC.params, _DEEPSTACK), build=_knockout_build),
    "lochead": _spec(lochead.SPEC, "lochead"),
    "pm": _spec(pm.SPEC, "pm"),
    "paint": _spec(paint.SPEC, "paint"),
    "reprompt": _spec(reprompt.SPEC, "reprompt", params=_REPROMPT_PARAMS),
    "viral": _spec(viral.SPEC, "viral", build=viral.builder("qwen3_vl_viral")),
}

Qwen3VlPai, Qwen3VlPaiChat = qwen3_vl_wrapper_classes(SPECS["pai"], __name__)
Qwen3VlKnockout, Qwen3VlKnockoutChat = qwen3_vl_wrapper_classes(SPECS["knockout"], __name__)
Qwen3VlLochead, Qwen3VlLocheadChat = qwen3_vl_wrapper_classes(SPECS["lochead"], __name__)
Qwen3VlPm, Qwen3VlPmChat = qwen3_vl_wrapper_classes(SPECS["pm"], __name__)
Qwen3VlPaint, Qwen3VlPaintChat = qwen3_vl_wrapper_classes(SPECS["paint"], __name__)
Qwen3VlReprompt, Qwen3VlRepromptChat = qwen3_vl_wrapper_classes(SPECS["reprompt"], __name__)
Qwen3VlViral, Qwen3VlViralChat = qwen3_vl_wrapper_classes(SPECS["viral"], __name__)
