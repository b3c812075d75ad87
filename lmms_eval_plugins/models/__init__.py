"""One module per registered model name. model name -> (module, class name, aliases)."""

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
}
