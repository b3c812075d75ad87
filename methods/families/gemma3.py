"""Gemma 3 (``gemma3``): one square grid of pooled SigLIP features over the whole image, 1-D positions.

The image processor resizes (squashes) every image to the tower's square input (896 px on the
real checkpoints; pan-and-scan off, as lmms-eval's ``gemma3`` leaves it), and the projector
average-pools the tower's patch grid to ``mm_tokens_per_image`` tokens (256 = 16 x 16), put
between ``<start_of_image>`` and ``<end_of_image>``. The language model interleaves sliding-window
layers with global ones, and its image tokens attend to each other in both directions (the mask
Gemma3Model builds from ``token_type_ids``, which therefore travels with every forward over the
image). No CLS token.
"""

from __future__ import annotations

import math

from ..geometry import GeometryError, grid_block
from .base import Family, register, scatter_image


@register
class Gemma3(Family):
    model_types = ("gemma3",)
    display_name = "Gemma 3"
    lmms_eval_model = "gemma3"
    name_prefix = "gemma3"
    token_inputs = ("token_type_ids",)
    vision_cls = False
    bidirectional_image = True
    vision_tower = "SigLIP vision tower"
    system_prompt = "You are a helpful assistant."  # lmms-eval 0.7.3 gemma3's default system_prompt

    def blocks(self, config, processor, image_size, start, inputs):
        """One side x side block (side = sqrt(mm_tokens_per_image)), row-major (the projector pools the
        patch grid in raster order), covering the whole image (squashed, no crop or padding)."""
        n = int(config.mm_tokens_per_image)
        side = math.isqrt(n)
        if side * side != n:
            raise GeometryError(f"gemma3: mm_tokens_per_image={n} is not a square grid")
        block, _ = grid_block("base", side, side, start, (0.0, 0.0, 1.0, 1.0))
        return [block]

    def embed_image(self, model, input_ids, pixel_values, inputs):
        """As Gemma3Model.forward: the tower's last hidden state, pooled and projected."""
        m = model.model
        emb = m.get_input_embeddings()(input_ids)
        out = m.get_image_features(pixel_values.to(model.device, model.dtype), return_dict=True)
        return scatter_image(m, input_ids, emb, out.pooler_output)
