"""PAI ("Paying more attention to image"): boost every image token for the answer rows.

On the query rows that predict answer tokens, in layers [start, end), the pre-softmax
scores over the image tokens become a + alpha * |a| (alpha 0.2, layers 2..31 of 32 in the
paper). Optional classifier-free guidance against an image-free pass (gamma 1.1).
"""

from __future__ import annotations

from transformers import LogitsProcessorList

from . import guidance, hooks
from .technique import Request, Technique, layer_range

DEFAULTS = {"alpha": 0.2, "start_layer": 2, "end_layer": None, "use_cfg": False, "gamma": 1.1, "cutoff": 0.1}


class GuidedTechnique(Technique):
    """A technique whose recipe may be followed by image-free guidance (PAI, PAINT)."""

    def generate(self, model, req: Request, **kwargs):
        req.require_one_image(self.name)
        if self.params.get("use_cfg"):
            text_ids = guidance.drop_image_tokens(req.input_ids, req.image_token_id)
            cfg = guidance.ImageFreeGuidance(model, text_ids, self.params["gamma"], self.params["cutoff"])
            kwargs["logits_processor"] = LogitsProcessorList([*kwargs.get("logits_processor", []), cfg])
        with hooks.edited(model, *self.recipe(model, req)):
            return model.generate(**kwargs)

    def forward(self, model, req: Request, **kwargs):
        out = super().forward(model, req, **kwargs)
        if self.params.get("use_cfg"):
            p = self.params
            out = guidance.guided_forward(
                model, req.input_ids, out, req.prompt_len, req.image_token_id, p["gamma"], p["cutoff"], kwargs.get("labels")
            )
        return out


class Pai(GuidedTechnique):
    name = "pai"

    def __init__(self, n_layers: int, **params):
        super().__init__(**{**DEFAULTS, **params})
        p = self.params
        self.layers = layer_range(p["start_layer"], p["end_layer"], n_layers, default_start=2, name=self.name)

    def recipe(self, model, req: Request):
        if self.params["alpha"] == 0:
            return []  # nothing to edit: stay on the fast path, bit-identical to the baseline
        return [hooks.Boost(layers=self.layers, rows=req.answer_rows, keys=req.image_pos, alpha=self.params["alpha"])]

    def describe(self):
        return {**super().describe(), "layers": f"{self.layers.start}..{self.layers.stop - 1}"}
