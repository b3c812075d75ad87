"""Qwen3-VL (``qwen3_vl``): one non-square merged grid over the whole image, interleaved M-RoPE, DeepStack.

The layout is Qwen2.5-VL's with 16 px patches (merged 2x2: one token per 32 x 32 pixels, row-major, the
whole image resized without crop or pad), so the geometry is its adapter's. Positions: interleaved M-RoPE
(the t/h/w frequencies alternate inside each head instead of three contiguous sections); the rows come
from the model's own ``get_rope_index``, so the interleaving is the rotary embedding's business only.
DeepStack: the tower's merged features of a few of its layers (``vision_config.deepstack_visual_indexes``)
are added to the language model's hidden states at the image positions, after LM layer i for the i-th
of them. The model's forward passes them as ``visual_pos_masks`` / ``deepstack_visual_embeds``; a pass of
our own over ``language_model`` gets them from ``lm_inputs`` (sliced by ``lm_slice``). No CLS token.
"""

from __future__ import annotations

import contextlib

import torch

from ..geometry import GeometryError
from .base import register, scatter_image
from .qwen2_5_vl import Qwen25VL


@register
class Qwen3VL(Qwen25VL):
    model_types = ("qwen3_vl",)
    display_name = "Qwen3-VL"
    lmms_eval_model = "qwen3_vl"
    name_prefix = "qwen3_vl"
    vision_tower = "Qwen3-VL vision tower (16 px patches, learned positions, merged 2x2)"
    mm_projector = "merger"
    system_prompt = "You are a helpful assistant."  # lmms-eval 0.7.3 qwen3_vl's default system_prompt
    deepstack = True

    def _features(self, model, pixel_values, inputs):
        thw = inputs.get("image_grid_thw")
        if thw is None:
            raise GeometryError("a qwen3_vl request needs the processor's image_grid_thw")
        return model.model.get_image_features(pixel_values.to(model.device), thw.to(model.device), return_dict=True)

    def embed_image(self, model, input_ids, pixel_values, inputs):
        """Input embeddings with the merged image features scattered in, as Qwen3VLModel.forward builds them
        (DeepStack's per-layer features are ``lm_inputs``')."""
        return self.lm_inputs(model, input_ids, pixel_values, inputs)[0]

    def lm_inputs(self, model, input_ids, pixel_values, inputs):
        """As Qwen3VLModel.forward: the embeddings, and DeepStack's (the image mask, one (n_image, d) tensor per
        injected layer), for ``language_model(visual_pos_masks=..., deepstack_visual_embeds=...)``."""
        m = model.model
        out = self._features(model, pixel_values, inputs)
        emb = scatter_image(m, input_ids, m.get_input_embeddings()(input_ids), out.pooler_output)
        mask = input_ids == model.config.image_token_id
        stacked = [torch.cat(list(f), dim=0).to(emb.device, emb.dtype) for f in out.deepstack_features]
        return emb, {"visual_pos_masks": mask, "deepstack_visual_embeds": stacked}

    def lm_slice(self, extras, start, stop):
        """The image mask over start..stop (False past the prompt) and the DeepStack rows of the image tokens in it."""
        mask = extras.get("visual_pos_masks")
        if mask is None:
            return {}
        part = mask[:, start:stop]
        if part.shape[1] < stop - start:
            part = torch.cat([part, part.new_zeros(part.shape[0], stop - start - part.shape[1])], dim=1)
        first, count = int(mask[:, :start].sum()), int(part.sum())
        if count == 0:
            return {}
        embeds = [e[first : first + count] for e in extras["deepstack_visual_embeds"]]
        return {"visual_pos_masks": part, "deepstack_visual_embeds": embeds}

    @contextlib.contextmanager
    def injection_off(self, model):
        """The language model's forward without DeepStack's features (only the input embeddings carry the image)."""

        def drop(module, args, kwargs):
            return args, {**kwargs, "deepstack_visual_embeds": None}

        handle = model.model.language_model.register_forward_pre_hook(drop, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
