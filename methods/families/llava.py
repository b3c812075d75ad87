"""LLaVA-1.5 (``llava``): one square grid of the vision tower's single crop, 1-D positions."""

from __future__ import annotations

import math

import torch

from ..geometry import grid_block, processed_region
from .base import Family, register, scatter_image


@register
class Llava(Family):
    model_types = ("llava",)
    display_name = "LLaVA-1.5"
    request_inputs = ("image_sizes",)  # none for LLaVA-1.5 itself; the HF class shares llava_hf with anyres
    square_grid = True
    crops_as_tower_rows = True
    batch_pixels = True

    def split_pixels(self, pixel_values, inputs):
        """(B, 3, H, W): one row per image."""
        return list(pixel_values.split(1))

    def blocks(self, config, processor, image_size, start, inputs):
        """One square grid (vision image_size / patch_size), CLS dropped under the 'default' strategy;
        it covers what the image processor keeps (CLIP: shortest-edge resize + centre crop)."""
        vc = config.vision_config
        side = vc.image_size // vc.patch_size
        extra = 1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0  # CLS kept, first
        region = processed_region(getattr(processor, "image_processor", processor), image_size)
        block, _ = grid_block("image", side, side, start + extra, region)
        return [block], torch.arange(start, start + extra)

    def tower_crops(self, config, inputs):
        """One crop per image: the tower's batch is the images'."""
        return 1

    def embed_image(self, model, input_ids, pixel_values, inputs):
        """As LlavaModel.forward: the tower's features at the vision_feature_layer, projected."""
        m, cfg = model.model, model.config
        emb = m.get_input_embeddings()(input_ids)
        out = m.get_image_features(
            pixel_values=pixel_values.to(model.device, model.dtype),
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            return_dict=True,
        )
        return scatter_image(m, input_ids, emb, out.pooler_output)

    def aligned_block(self, config, input_ids, image_token_id, inputs, image_size, n_grid=None):
        """VIRAL on LLaVA-1.5: every image token of a sample whose count equals the (square) grid's."""
        vc = config.vision_config
        side = vc.image_size // vc.patch_size
        n = n_grid or side * side
        root = math.isqrt(n)
        if root * root != n:
            raise ValueError(f"{n} patch tokens do not form a square grid; pass the grid shape explicitly")
        pos = (input_ids[0] == image_token_id).nonzero().flatten()
        return (pos, (root, root), False) if pos.numel() == n else None
