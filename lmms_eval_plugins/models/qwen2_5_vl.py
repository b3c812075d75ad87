"""`qwen2_5_vl_<technique>`: the techniques inside lmms-eval's own `qwen2_5_vl` classes.

Each name is its LLaVA twin's spec (same parameters, methods/ arithmetic, recipe logging)
on the Qwen2.5-VL family adapter (lmms_eval_plugins/qwen.py). A technique that cannot run
correctly on Qwen2.5-VL yet is still registered and refuses at construction with the
reason (its spec's ``refused``), never silently wrong; the README support matrix repeats them.
"""

import dataclasses

from ..qwen import qwen_wrapper_classes
from . import knockout, lochead, pai, paint, pm, reprompt, viral


def _qwen_spec(spec, technique: str, **changes):
    """The LLaVA twin's spec under its qwen2_5_vl_ name; its ``refused`` already names the families the
    technique refuses and why (PAINT: towers without CLS, from the family adapters)."""
    return dataclasses.replace(spec, name=f"qwen2_5_vl_{technique}", aliases=(), **changes)


# selection=describe's text after the image, in Qwen's chat format (llava_reprompt's is LLaVA-1.5's "... ASSISTANT:")
_REPROMPT_PARAMS = tuple(
    dataclasses.replace(p, default="<|vision_end|>describe the image<|im_end|>\n<|im_start|>assistant\n")
    if p.name == "describe"
    else p
    for p in reprompt.SPEC.params
)

SPECS = {
    # CFG's image-free pass gets its own M-RoPE positions (methods/positions.py): the same defaults and presets as llava_pai
    "pai": _qwen_spec(pai.SPEC, "pai"),
    "knockout": _qwen_spec(knockout.SPEC, "knockout"),
    "lochead": _qwen_spec(lochead.SPEC, "lochead"),
    "pm": _qwen_spec(pm.SPEC, "pm"),
    "paint": _qwen_spec(paint.SPEC, "paint"),
    "reprompt": _qwen_spec(reprompt.SPEC, "reprompt", params=_REPROMPT_PARAMS),
    "viral": _qwen_spec(viral.SPEC, "viral", build=viral.builder("qwen2_5_vl_viral")),
}

Qwen25VlPai, Qwen25VlPaiChat = qwen_wrapper_classes(SPECS["pai"], __name__)
Qwen25VlKnockout, Qwen25VlKnockoutChat = qwen_wrapper_classes(SPECS["knockout"], __name__)
Qwen25VlLochead, Qwen25VlLocheadChat = qwen_wrapper_classes(SPECS["lochead"], __name__)
Qwen25VlPm, Qwen25VlPmChat = qwen_wrapper_classes(SPECS["pm"], __name__)
Qwen25VlPaint, Qwen25VlPaintChat = qwen_wrapper_classes(SPECS["paint"], __name__)
Qwen25VlReprompt, Qwen25VlRepromptChat = qwen_wrapper_classes(SPECS["reprompt"], __name__)
Qwen25VlViral, Qwen25VlViralChat = qwen_wrapper_classes(SPECS["viral"], __name__)
