"""One module per registered model name. model name -> (module, class name, aliases).

A name has a simple class and a chat class (``<class name>Chat``), except where lmms-eval 0.7.3 has
only a simple class for the family (``SIMPLE_ONLY``: its ``gemma3``)."""

MODELS = {
    "llava_pai": ("pai", "LlavaPai", ()),
    "llava_paint": ("paint", "LlavaPaint", ("llava_fia",)),
    "llava_pm": ("pm", "LlavaPm", ()),
    "llava_lochead": ("lochead", "LlavaLochead", ()),
    "llava_knockout": ("knockout", "LlavaKnockout", ()),
    "llava_reprompt": ("reprompt", "LlavaReprompt", ()),
    "llava_viral": ("viral", "LlavaViral", ()),
    # Qwen2.5-VL (lmms-eval's qwen2_5_vl classes; lmms_eval_plugins/qwen.py): one module for all seven
    "qwen2_5_vl_pai": ("qwen2_5_vl", "Qwen25VlPai", ()),
    "qwen2_5_vl_pm": ("qwen2_5_vl", "Qwen25VlPm", ()),
    "qwen2_5_vl_paint": ("qwen2_5_vl", "Qwen25VlPaint", ()),
    "qwen2_5_vl_lochead": ("qwen2_5_vl", "Qwen25VlLochead", ()),
    "qwen2_5_vl_knockout": ("qwen2_5_vl", "Qwen25VlKnockout", ()),
    "qwen2_5_vl_reprompt": ("qwen2_5_vl", "Qwen25VlReprompt", ()),
    "qwen2_5_vl_viral": ("qwen2_5_vl", "Qwen25VlViral", ()),
    # Gemma 3 (lmms-eval's gemma3 class; lmms_eval_plugins/gemma3.py): one module for all seven
    "gemma3_pai": ("gemma3", "Gemma3Pai", ()),
    "gemma3_pm": ("gemma3", "Gemma3Pm", ()),
    "gemma3_paint": ("gemma3", "Gemma3Paint", ()),
    "gemma3_lochead": ("gemma3", "Gemma3Lochead", ()),
    "gemma3_knockout": ("gemma3", "Gemma3Knockout", ()),
    "gemma3_reprompt": ("gemma3", "Gemma3Reprompt", ()),
    "gemma3_viral": ("gemma3", "Gemma3Viral", ()),
    # Qwen3-VL (lmms-eval's qwen3_vl classes; lmms_eval_plugins/qwen3_vl.py): one module for all seven
    "qwen3_vl_pai": ("qwen3_vl", "Qwen3VlPai", ()),
    "qwen3_vl_pm": ("qwen3_vl", "Qwen3VlPm", ()),
    "qwen3_vl_paint": ("qwen3_vl", "Qwen3VlPaint", ()),
    "qwen3_vl_lochead": ("qwen3_vl", "Qwen3VlLochead", ()),
    "qwen3_vl_knockout": ("qwen3_vl", "Qwen3VlKnockout", ()),
    "qwen3_vl_reprompt": ("qwen3_vl", "Qwen3VlReprompt", ()),
    "qwen3_vl_viral": ("qwen3_vl", "Qwen3VlViral", ()),
    # InternVL, HF-native (lmms-eval's internvl_hf class; lmms_eval_plugins/internvl.py): one module for all seven
    "internvl_hf_pai": ("internvl", "InternvlHfPai", ()),
    "internvl_hf_pm": ("internvl", "InternvlHfPm", ()),
    "internvl_hf_paint": ("internvl", "InternvlHfPaint", ()),
    "internvl_hf_lochead": ("internvl", "InternvlHfLochead", ()),
    "internvl_hf_knockout": ("internvl", "InternvlHfKnockout", ()),
    "internvl_hf_reprompt": ("internvl", "InternvlHfReprompt", ()),
    "internvl_hf_viral": ("internvl", "InternvlHfViral", ()),
}
SIMPLE_ONLY = ("gemma3",)  # modules whose names have no chat class


def plugin_class(model: str):
    """The plugin's class registered as ``model`` (or one of its aliases); None for any other name (stock classes)."""
    import importlib

    module, cls, _ = next((v for k, v in MODELS.items() if model in (k, *v[2])), (None, None, None))
    return getattr(importlib.import_module(f"lmms_eval_plugins.models.{module}"), cls) if module else None


def arg_pairs(model_args: str) -> dict:
    return dict(a.split("=", 1) for a in (model_args or "").split(",") if "=" in a)


def preprocessing(model: str, model_args: str) -> dict:
    """How a run preprocesses images beyond its class's own (``PREPROCESSING``: pad_to_square, image_backend),
    given directly or through its preset, as lower-case strings; {} for a stock class."""
    from ..base import PREPROCESSING

    lm = plugin_class(model)
    if lm is None:
        return {}
    given = arg_pairs(model_args)
    values = {**lm.spec.presets.get(given.get("preset"), {}), **given}
    values = {k: str(values[k]).lower() for k in PREPROCESSING if k in values}
    return {k: v for k, v in values.items() if v != str(PREPROCESSING[k]).lower()}


def on_same_pixels(base_model: str, base_args: str, want: dict, wrapper: str) -> tuple[str, str]:
    """(model, model_args) of the baseline ``base_model base_args`` made to preprocess as ``want`` (a
    ``preprocessing`` result): a wrapper keeps its arguments and takes ``want``'s; a stock class becomes
    ``wrapper`` with ``baseline=true`` (no technique: the family's class on those pixels)."""
    extra = ",".join(f"{k}={v}" for k, v in sorted(want.items()))
    if plugin_class(base_model) is None:
        return wrapper, ",".join(a for a in ("baseline=true", extra) if a)
    kept = ",".join(a for a in (base_args or "").split(",") if a and a.split("=", 1)[0] not in want)
    return base_model, ",".join(a for a in (kept, extra) if a)


def baseline_like(name: str, base_model: str, base_args: str, model: str, model_args: str, wrapper: str = ""):
    """None when the baseline run ``name`` (``base_model base_args``) preprocesses images as ``model model_args``
    does; else (name, model, model_args) of the baseline made to (``on_same_pixels``; a stock class becomes
    ``wrapper``, default ``model``), named ``NAME+key=value...``: the one rule of compare, verdicts and recipes."""
    want = preprocessing(model, model_args)
    if want == preprocessing(base_model, base_args):
        return None
    derived = on_same_pixels(base_model, base_args, want, wrapper or model)
    return (f"{name}+{'+'.join(f'{k}={v}' for k, v in sorted(want.items()))}", *derived)
