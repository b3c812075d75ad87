"""`llava_viral`: llava_hf on a base checkpoint with a VIRAL-trained LoRA adapter merged in.

    lmms-eval --model llava_viral --model_args pretrained=BASE,adapter=RUN_DIR --tasks ...

RUN_DIR is the --output-dir of `lmms-plugins viral-train` (or any peft LoRA adapter
directory). VIRAL changes only the weights: inference is the plain greedy model, no edits.
`qwen2_5_vl_viral` (lmms_eval_plugins/models/qwen2_5_vl.py) is the same on Qwen2.5-VL:
--model_args pretrained=BASE,adapter=RUN_DIR,min_pixels=...,max_pixels=...
"""

from methods.viral import merge_adapter
from methods.technique import Technique

from ..base import TechniqueSpec, wrapper_classes
from methods.params import ModelArgsError, Param


class MergedAdapter(Technique):
    """Nothing at inference time: the adapter was merged into the weights when the model was built."""

    name = "viral"
    batch_refused = None  # no edits: the model's own batched generation

    def generate(self, model, req, **kwargs):
        return model.generate(**kwargs)

    def forward(self, model, req, **kwargs):
        return model(**kwargs)


def builder(name: str):
    """The build function of a ``<family>_viral`` name (the same on every family: peft merges the adapter)."""

    def build(params, model) -> Technique:
        if not params["adapter"]:
            raise ModelArgsError(
                f"{name} needs adapter=DIR: the --output-dir of `lmms-plugins viral-train` (a peft LoRA adapter)"
            )
        lora = merge_adapter(model, params["adapter"])
        return MergedAdapter(adapter=params["adapter"], r=lora.get("r"), lora_alpha=lora.get("lora_alpha"))

    return build


build = builder("llava_viral")


PARAMS = (
    Param("adapter", str, "", "viral-train output directory (or peft LoRA adapter directory) merged into pretrained"),
)

SPEC = TechniqueSpec(
    name="llava_viral",
    params=PARAMS,
    build=build,
    doc="VIRAL: a base LLaVA checkpoint with a LoRA adapter trained with visual representation alignment.",
)

LlavaViral, LlavaViralChat = wrapper_classes(SPEC, __name__)
