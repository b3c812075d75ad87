"""`qwen2_5_vl_<technique>`: the techniques inside lmms-eval's own `qwen2_5_vl` classes.

Each name is its LLaVA twin's spec (same parameters, methods/ arithmetic, recipe logging)
on the Qwen2.5-VL family adapter (lmms_eval_plugins/qwen.py). A technique that cannot run
correctly on Qwen2.5-VL yet is still registered and refuses at construction with the
reason (``QWEN_REFUSED``), never silently wrong; the README support matrix repeats them.
"""

import dataclasses

from ..params import ModelArgsError
from ..qwen import FAMILY, qwen_wrapper_classes
from . import knockout, lochead, pai, paint, pm, reprompt, viral

QWEN_REFUSED = {
    "pm": "PM's map passes run the language model on embeddings it builds itself (methods/pm.py embed/_LanguageModel) "
    "without position ids, so Qwen2.5-VL's M-RoPE positions (get_rope_index over image_grid_thw) would silently become "
    "1-D positions, and its perception density assumes a square grid; it needs the M-RoPE position ids threaded "
    "through those passes and a rows x cols map",
    "paint": "PAINT selects local and summary tokens from the vision tower's CLS attention; the Qwen2.5-VL vision tower "
    "has no CLS token (windowed attention over patches, merged 2x2), and no substitute has been validated",
    "reprompt": "re-prompting and pruning rebuild prefills from input_ids/attention_mask/pixel_values(/image_sizes) "
    "(methods/reprompt.py FORWARD_KEYS) and let the model infer positions; Qwen2.5-VL needs image_grid_thw and "
    "mm_token_type_ids and explicit M-RoPE positions once image entries leave the KV cache (inferred positions shift "
    "the text after the image)",
    "viral": "VIRAL's training entry point, projector and adapter loading are built on LlavaForConditionalGeneration "
    "batches (LLM layer-16 image hidden states on LLaVA's square grid); Qwen2.5-VL training is not implemented",
}


def _pai_build(p, model):
    if p["use_cfg"]:
        raise ModelArgsError(
            "qwen2_5_vl_pai: use_cfg=true is not supported on Qwen2.5-VL: the image-free guidance pass "
            "(methods/guidance.py) decodes with the model's cached M-RoPE rope_deltas of the image prompt, which "
            "shifts its positions; use use_cfg=false (the default here)"
        )
    return pai.SPEC.build(p, model)


def _qwen_spec(spec, technique: str, **changes):
    refused = {FAMILY: QWEN_REFUSED[technique]} if technique in QWEN_REFUSED else {}
    return dataclasses.replace(spec, name=f"qwen2_5_vl_{technique}", aliases=(), refused=refused, **changes)


_PAI_PARAMS = tuple(
    dataclasses.replace(p, default=False, help=p.help + " (Qwen2.5-VL: refused, see QWEN_REFUSED)") if p.name == "use_cfg" else p
    for p in pai.SPEC.params
)

SPECS = {
    # the official/paper presets are PAI with CFG: not offered here
    "pai": _qwen_spec(pai.SPEC, "pai", params=_PAI_PARAMS, build=_pai_build, presets={}),
    "knockout": _qwen_spec(knockout.SPEC, "knockout"),
    "lochead": _qwen_spec(lochead.SPEC, "lochead"),
    "pm": _qwen_spec(pm.SPEC, "pm"),
    "paint": _qwen_spec(paint.SPEC, "paint"),
    "reprompt": _qwen_spec(reprompt.SPEC, "reprompt"),
    "viral": _qwen_spec(viral.SPEC, "viral"),
}

Qwen25VlPai, Qwen25VlPaiChat = qwen_wrapper_classes(SPECS["pai"], __name__)
Qwen25VlKnockout, Qwen25VlKnockoutChat = qwen_wrapper_classes(SPECS["knockout"], __name__)
Qwen25VlLochead, Qwen25VlLocheadChat = qwen_wrapper_classes(SPECS["lochead"], __name__)
Qwen25VlPm, Qwen25VlPmChat = qwen_wrapper_classes(SPECS["pm"], __name__)
Qwen25VlPaint, Qwen25VlPaintChat = qwen_wrapper_classes(SPECS["paint"], __name__)
Qwen25VlReprompt, Qwen25VlRepromptChat = qwen_wrapper_classes(SPECS["reprompt"], __name__)
Qwen25VlViral, Qwen25VlViralChat = qwen_wrapper_classes(SPECS["viral"], __name__)
