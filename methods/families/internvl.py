"""InternVL, HF-native (``internvl``: ``InternVLForConditionalGeneration``): dynamic tiles plus a thumbnail,
pixel-shuffled tokens, 1-D positions.

The processor (``crop_to_patches``, as InternVLProcessor always asks) squashes the image onto the
``cols x rows`` canvas of tower-sized tiles whose aspect ratio is closest to the image's, among those
with ``min_patches..max_patches`` tiles (``get_optimal_tiled_canvas``), and cuts it into tiles in
raster order; with more than one tile it appends a **thumbnail**: the whole image squashed to one
tile. The tower (InternViT: a CLS token, then ``side x side`` patches) runs on every tile as a batch;
the model drops the CLS and pixel-shuffles each tile's patch grid (``downsample_ratio`` 0.5): each
language-model token is a 2x2 group of neighbouring patches, ``(side / 2)^2`` tokens per tile in raster
order. All of one image's tokens sit between ``<img>`` and ``</img>``: tile after tile, the thumbnail last.

Blocks (in the names anyres uses, so techniques with a block choice read the same names):
- **base**: the thumbnail (or the only tile when the canvas is one tile): the whole image at the
  tower's resolution, the block techniques with one grid read (PM's map, lochead's default, VIRAL);
  it is the last block in the sequence but ``ImageGeometry.base`` (listed first);
- **highres**: the tiles stitched into one ``rows * t x cols * t`` grid (t tokens per tile side) over
  the whole image; its cells are not contiguous in the sequence (each tile's tokens are), which the
  block's ``positions`` map says. No newline tokens.
"""

from __future__ import annotations

import torch

from ..geometry import Block, GeometryError, grid_block
from .base import Family, register, scatter_image


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


def tile_side(config) -> int:
    """Language-model tokens per tile side: the tower's patch grid side, pixel-shuffled."""
    h, w = _pair(config.vision_config.image_size)
    ph, pw = _pair(config.vision_config.patch_size)
    side, ratio = h // ph, float(config.downsample_ratio)
    if h // ph != w // pw or (side * ratio) % 1:
        raise GeometryError(f"internvl: a {h // ph}x{w // pw} patch grid does not pixel-shuffle by {ratio}")
    return int(side * ratio)


def tiling(image_processor, image_size) -> tuple[int, int]:
    """(tile rows, tile cols) the processor cuts an image (W, H) into, as ``crop_image_to_patches`` picks them
    (with ``crop_to_patches`` on, as InternVLProcessor asks, and the image processor's min/max_patches)."""
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    size = image_processor.size
    get = (lambda k: size.get(k)) if isinstance(size, dict) else (lambda k: getattr(size, k))
    lo, hi = int(image_processor.min_patches), int(image_processor.max_patches)
    if hi <= 1:
        return 1, 1
    cols, rows = get_optimal_tiled_canvas((image_size[1], image_size[0]), (get("height"), get("width")), lo, hi)
    return rows, cols


def stitched_block(name: str, tile_rows: int, tile_cols: int, t: int, start: int) -> Block:
    """The tiles (each t x t tokens, raster order, one after the other from ``start``) as one grid."""
    r = torch.arange(tile_rows * t)[:, None]
    c = torch.arange(tile_cols * t)[None, :]
    tile = (r // t) * tile_cols + c // t
    positions = start + tile * t * t + (r % t) * t + c % t
    return Block(
        name, tile_rows * t, tile_cols * t, positions.flatten(), torch.empty(0, dtype=torch.long), (0.0, 0.0, 1.0, 1.0)
    )


@register
class InternVL(Family):
    model_types = ("internvl",)
    display_name = "InternVL (HF)"
    lmms_eval_model = "internvl_hf"
    # lmms-eval's own class is internvl_hf; its internvl/internvl2/internvl3 are remote-code classes
    name_prefix = "internvl_hf"
    vision_tower = "InternViT vision tower"
    # each image token is a 2x2 group of the tower's patches (pixel shuffle): a selection of patches is not one of tokens
    patches_per_token = 4
    highres_block = True  # the stitched tiles (images of more than one tile)

    def blocks(self, config, processor, image_size, start, inputs):
        """Base (the thumbnail, or the only tile) first, then the stitched tiles when there are several."""
        if processor is None:
            raise GeometryError("internvl: the tiling needs the checkpoint's processor (its tile size and max_patches)")
        t = tile_side(config)
        rows, cols = tiling(getattr(processor, "image_processor", processor), image_size)
        whole = (0.0, 0.0, 1.0, 1.0)
        if rows * cols == 1:
            block, _ = grid_block("base", t, t, start, whole)
            return [block]
        tiles = stitched_block("highres", rows, cols, t, start)
        thumbnail, _ = grid_block("base", t, t, start + rows * cols * t * t, whole)
        return [thumbnail, tiles]

    def process_image(self, processor, image, **options) -> dict:
        """The image's pixel_values as InternVLProcessor makes them (tiles and thumbnail, not one resized crop)."""
        return processor.image_processor(images=[image], crop_to_patches=True, return_tensors="pt", **options)

    def embed_image(self, model, input_ids, pixel_values, inputs):
        """As InternVLModel.forward: the tower's features at vision_feature_layer, CLS dropped, pixel-shuffled, projected."""
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
        """VIRAL on InternVL: the thumbnail's tokens (the last tile's, or the only tile's), the whole image."""
        t = tile_side(config)
        pos = (input_ids[0] == image_token_id).nonzero().flatten()
        if pos.numel() == 0 or pos.numel() % (t * t):
            return None
        return pos[-t * t :], (t, t), True
