"""Qwen2.5-VL (``qwen2_5_vl``): one non-square merged grid over the whole image, M-RoPE positions."""

from __future__ import annotations

import torch

from ..geometry import GeometryError, grid_block
from .base import Family, register, scatter_image


@register
class Qwen25VL(Family):
    model_types = ("qwen2_5_vl",)
    display_name = "Qwen2.5-VL"
    lmms_eval_model = "qwen2_5_vl"
    name_prefix = "qwen2_5_vl"
    request_inputs = ("image_grid_thw",)
    token_inputs = ("mm_token_type_ids",)  # transformers 5: which tokens are image tokens, for M-RoPE
    vision_cls = False
    vision_tower = "Qwen2.5-VL vision tower (windowed attention over patches, merged 2x2)"
    mrope = True
    mm_projector = "merger"
    system_prompt = "You are a helpful assistant."  # lmms-eval 0.7.3 qwen2_5_vl's default system_prompt
    batch_pixels = True

    def split_pixels(self, pixel_values, inputs):
        """(patches, C): every image's patches one after the other, t x h x w of them (``image_grid_thw``)."""
        return list(pixel_values.split([int(thw.prod()) for thw in inputs["image_grid_thw"]]))

    def blocks(self, config, processor, image_size, start, inputs):
        """One contiguous non-square block: the merged grid ``image_grid_thw[1:] / spatial_merge_size``,
        row-major (the merger keeps raster order), covering the whole image given to the processor
        (Qwen resizes to multiples of patch x merge without cropping or padding). Without
        ``image_grid_thw`` the grid is the processor's own ``smart_resize`` of ``image_size``."""
        merge = config.vision_config.spatial_merge_size
        thw = inputs.get("image_grid_thw")
        if thw is not None:
            if len(thw) != 1:
                raise GeometryError(
                    f"{config.model_type}: {len(thw)} images in the prompt; one image per prompt is supported"
                )
            t, h, w = (int(v) for v in thw[0])
        else:
            from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

            ip = getattr(processor, "image_processor", processor)
            size = ip.size
            get = (lambda k: size.get(k)) if isinstance(size, dict) else (lambda k: getattr(size, k, None))
            factor = ip.patch_size * ip.merge_size
            rh, rw = smart_resize(
                image_size[1],
                image_size[0],
                factor=factor,
                min_pixels=get("shortest_edge"),
                max_pixels=get("longest_edge"),
            )
            t, h, w = 1, rh // ip.patch_size, rw // ip.patch_size
        if t != 1:
            raise GeometryError(
                f"{config.model_type}: image_grid_thw has t={t}; images only (videos are not supported)"
            )
        # named "base": the one block that sees the whole image at the tower's resolution (what
        # techniques with a block choice, e.g. lochead's block=base, read)
        block, _ = grid_block("base", h // merge, w // merge, start, (0.0, 0.0, 1.0, 1.0))
        return [block]

    def embed_image(self, model, input_ids, pixel_values, inputs):
        """Input embeddings with the merged image features scattered in, as Qwen2_5_VLModel.forward builds them."""
        thw = inputs.get("image_grid_thw")
        if thw is None:
            raise GeometryError("a qwen2_5_vl request needs the processor's image_grid_thw")
        m = model.model
        emb = m.get_input_embeddings()(input_ids)
        out = m.get_image_features(pixel_values.to(model.device), thw.to(model.device), return_dict=True)
        return scatter_image(m, input_ids, emb, out.pooler_output)

    def rope_index(self, model, input_ids, image_grid_thw) -> torch.Tensor:
        """The model's own ``get_rope_index`` (image tokens by config.image_token_id; one image, no video)."""
        types = (input_ids == model.config.image_token_id).int()
        pos, _ = model.model.get_rope_index(input_ids[:1], mm_token_type_ids=types[:1], image_grid_thw=image_grid_thw)
        return pos[:, 0]
