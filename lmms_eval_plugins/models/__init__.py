"""One module per registered model name. model name -> (module, class name, aliases)."""

MODELS = {
    "llava_pai": ("pai", "LlavaPai", ()),
    "llava_paint": ("paint", "LlavaPaint", ("llava_fia",)),
    "llava_pm": ("pm", "LlavaPm", ()),
    "llava_lochead": ("lochead", "LlavaLochead", ()),
    "llava_knockout": ("knockout", "LlavaKnockout", ()),
    "llava_reprompt": ("reprompt", "LlavaReprompt", ()),
    "llava_viral": ("viral", "LlavaViral", ()),
}
