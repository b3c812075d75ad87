"""LLaVA-NeXT (``llava_next``) and LLaVA-OneVision (``llava_onevision``): anyres tiling.

The **base** block (the whole image squashed to the tower's square input) is followed by the
**highres** block (the anyres tiles stitched together, the padding removed as the processor's
``_get_unpadded_features`` does, and for OneVision shrunk by interpolation past ``anyres_max_N``
tiles), with one newline token after each high-res row; newlines share the image token id.
1-D positions. The base block is what techniques with one grid read (PM's map, PAINT's CLS crop,
VIRAL's aligned tokens): it sees every region of the image once.
"""

from __future__ import annotations

import math

import torch

from ..geometry import GeometryError, grid_block
from .base import Family, register, scatter_image


def unpadded_grid(orig_w: int, orig_h: int, rows: int, cols: int) -> tuple[int, int, tuple[float, float, float, float]]:
    """The stitched tiles' grid (rows x cols) with the resize padding removed, as the processor's
    ``_get_unpadded_features`` and the model's ``unpad_image`` do; returns (rows, cols, region)."""
    if orig_w / orig_h > cols / rows:  # wider than the tiling: padding above and below
        scale = cols / orig_w
        new_h = int(round(orig_h * scale, 7))
        pad = (rows - new_h) // 2
        kept = rows - 2 * pad
        top = (pad - (rows - orig_h * scale) / 2) / (orig_h * scale)
        return kept, cols, (0.0, top, 1.0, top + kept / (orig_h * scale))
    scale = rows / orig_h
    new_w = int(round(orig_w * scale, 7))
    pad = (cols - new_w) // 2
    kept = cols - 2 * pad
    left = (pad - (cols - orig_w * scale) / 2) / (orig_w * scale)
    return rows, kept, (left, 0.0, left + kept / (orig_w * scale), 1.0)


def anyres_tiling(config, image_size) -> tuple[int, int]:
    """(tile rows, tile cols) that anyres picks for an image (W, H): the best pinpoint resolution / tower size."""
    from transformers.image_processing_utils import select_best_resolution

    w, h = image_size
    side = config.vision_config.image_size
    bh, bw = select_best_resolution((h, w), config.image_grid_pinpoints)
    return bh // side, bw // side


class Anyres(Family):
    request_inputs = ("image_sizes",)
    row_newlines = True
    highres_block = True
    cls_crop = 0  # the base crop: the whole image at the tower's resolution
    crops_as_tower_rows = True
    batch_pixels = True

    def split_pixels(self, pixel_values, inputs):
        """(B, most crops, 3, H, W): one row per image, padded with crops the model drops (it counts each image's
        crops from its ``image_sizes``)."""
        return list(pixel_values.split(1))

    def join_pixels(self, parts, like):
        """Each image's crops padded with zero crops to the batch's most, as the processor pads a batch."""
        pad = lambda p: torch.nn.functional.pad(p, (0, 0) * (p.dim() - 2) + (0, like.shape[1] - p.shape[1]))  # noqa: E731
        return torch.cat([pad(p) for p in parts])

    def blocks(self, config, processor, image_size, start, inputs):
        """Base block, then the un-padded high-res block with one newline per row."""
        vc = config.vision_config
        side = vc.image_size // vc.patch_size
        self.check_strategy(config)
        base, pos = grid_block("base", side, side, start, (0.0, 0.0, 1.0, 1.0))
        tile_rows, tile_cols = anyres_tiling(config, image_size)
        rows, cols, region = unpadded_grid(image_size[0], image_size[1], side * tile_rows, side * tile_cols)
        rows, cols = self.shrink(config, side, rows, cols)
        highres, _ = grid_block("highres", rows, cols, pos, region, newline=True)
        return [base, highres]

    def check_strategy(self, config) -> None:
        pass

    def tower_crops(self, config, inputs):
        """The base crop and the anyres tiles: the model's ``image_size_to_num_patches`` of the processor's image
        size (get_image_features keeps that many crops of each image, then concatenates the images')."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return image_size_to_num_patches(
            image_size=inputs["image_sizes"][0],
            grid_pinpoints=config.image_grid_pinpoints,
            patch_size=config.vision_config.image_size,
        )

    def shrink(self, config, side: int, rows: int, cols: int) -> tuple[int, int]:
        """The high-res grid the model keeps (NeXT: all of it)."""
        return rows, cols

    def embed_image(self, model, input_ids, pixel_values, inputs):
        """Input embeddings with the packed anyres features (base, high-res rows, newlines) scattered in, as the model's forward."""
        m, cfg = model.model, model.config
        emb = m.get_input_embeddings()(input_ids)
        out = m.get_image_features(
            pixel_values=pixel_values.to(model.device, model.dtype),
            image_sizes=torch.as_tensor(inputs["image_sizes"]).to(model.device),
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            return_dict=True,
        )
        return scatter_image(m, input_ids, emb, out.pooler_output)


@register
class LlavaNext(Anyres):
    model_types = ("llava_next",)
    display_name = "LLaVA-NeXT"

    def check_strategy(self, config) -> None:
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        if strategy != "default":
            raise GeometryError(
                f"llava_next with vision_feature_select_strategy={strategy!r} is not supported (CLS kept)"
            )


@register
class LlavaOnevision(Anyres):
    model_types = ("llava_onevision",)
    display_name = "LLaVA-OneVision"
    vision_cls = False
    vision_tower = "SigLIP vision tower"

    def shrink(self, config, side, rows, cols):
        """Past anyres_max_N tiles the model interpolates the grid down; it still covers the same region."""
        max_tiles = int(str(getattr(config, "vision_aspect_ratio", "anyres_max_9")).removeprefix("anyres_max_"))
        ratio = math.sqrt(rows * cols / (max_tiles * side**2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
        return rows, cols
