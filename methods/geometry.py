"""One geometry object per image: where its tokens are in the LM sequence and what they see.

Every technique reads image positions and grids from here, never from constants. A family
adapter (a *builder*, keyed by ``config.model_type``) is the only code that knows a family's
layout; adding a family means registering a builder, not touching techniques.

An image is one or more **blocks**, each a ``rows x cols`` grid of tokens in row-major order:

- LLaVA-1.5 (``llava``): one block, the vision tower's square grid (CLS dropped);
- LLaVA-NeXT (``llava_next``) and LLaVA-OneVision (``llava_onevision``): the **base** block
  (the whole image squashed to the tower's square input) followed by the **highres** block
  (the anyres tiles stitched together, the padding removed as the processor's
  ``_get_unpadded_features`` does, and for OneVision shrunk by interpolation when larger than
  ``anyres_max_N`` tiles), with one newline token after each high-res row; newlines share the
  image token id;
- Qwen2.5-VL (``qwen2_5_vl``): one non-square block,
  ``image_grid_thw[1:] / spatial_merge_size``.

Each block also knows the region of the image given to the processor it covers
(``region``: x0, y0, x1, y1 in fractions of that image; outside 0..1 where the block sees
padding, inside where it sees a crop), so a token maps back to pixels with ``cell_boxes``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import torch


class GeometryError(ValueError):
    """The prompt's image tokens do not match the geometry the config and processor predict."""


@dataclasses.dataclass(frozen=True)
class Block:
    """One grid of image tokens: ``positions[r * cols + c]`` is cell (r, c)'s absolute LM position."""

    name: str  # "base" | "highres" | "image"
    rows: int
    cols: int
    positions: torch.Tensor  # (rows * cols,) absolute positions, row-major
    newlines: torch.Tensor  # (rows,) absolute positions of the newline after each row, or empty
    region: tuple[float, float, float, float]  # what the block covers, in fractions of the processed-from image

    @property
    def grid_hw(self) -> tuple[int, int]:
        return self.rows, self.cols

    def grid(self, values: torch.Tensor) -> torch.Tensor:
        """(..., rows * cols) values in block order -> (..., rows, cols)."""
        return values.reshape(*values.shape[:-1], self.rows, self.cols)

    def to_image(self, box) -> list[float]:
        """(x1, y1, x2, y2) in fractions of this block's grid -> fractions of the image (unclipped)."""
        x0, y0, x1, y1 = self.region
        w, h = x1 - x0, y1 - y0
        return [x0 + box[0] * w, y0 + box[1] * h, x0 + box[2] * w, y0 + box[3] * h]

    def cell_boxes(self) -> torch.Tensor:
        """(rows * cols, 4): the image region (x1, y1, x2, y2, fractions) each token of the block sees."""
        r = torch.arange(self.rows, dtype=torch.float64).repeat_interleave(self.cols)
        c = torch.arange(self.cols, dtype=torch.float64).repeat(self.rows)
        x0, y0, x1, y1 = self.region
        w, h = (x1 - x0) / self.cols, (y1 - y0) / self.rows
        return torch.stack([x0 + c * w, y0 + r * h, x0 + (c + 1) * w, y0 + (r + 1) * h], dim=1)


@dataclasses.dataclass(frozen=True)
class ImageGeometry:
    """The tokens of one image in one prompt: its blocks, in sequence order."""

    family: str  # config.model_type
    image_size: tuple[int, int]  # (W, H) of the image given to the processor
    blocks: tuple[Block, ...]
    others: torch.Tensor = dataclasses.field(
        default_factory=lambda: torch.empty(0, dtype=torch.long)
    )  # image tokens of no cell (a kept CLS)

    @property
    def base(self) -> Block:
        """The block that sees the whole image at the tower's own resolution (the only one for LLaVA-1.5)."""
        return self.blocks[0]

    def block(self, name: str) -> Block:
        for b in self.blocks:
            if b.name == name:
                return b
        raise GeometryError(f"a {self.family} image has no {name!r} block; it has {[b.name for b in self.blocks]}")

    @property
    def newlines(self) -> torch.Tensor:
        return torch.cat([b.newlines for b in self.blocks]) if self.blocks else torch.empty(0, dtype=torch.long)

    def positions(self, newlines: bool = False) -> torch.Tensor:
        """Sorted absolute positions of the image's grid tokens (and its newline tokens if asked)."""
        parts = [b.positions for b in self.blocks] + ([self.newlines] if newlines else [])
        return torch.sort(torch.cat(parts)).values

    def all_positions(self) -> torch.Tensor:
        """Every image token of the image: cells, newlines and others (what ``input_ids == image_token_id`` finds)."""
        return torch.sort(torch.cat([self.positions(newlines=True), self.others])).values

    @property
    def span(self) -> tuple[int, int]:
        """[first, last + 1) of every image token."""
        pos = self.all_positions()
        return int(pos[0]), int(pos[-1]) + 1

    def describe(self) -> dict:
        return {
            "family": self.family,
            "image_size": list(self.image_size),
            "blocks": [
                {
                    "name": b.name,
                    "rows": b.rows,
                    "cols": b.cols,
                    "first": int(b.positions[0]) if b.positions.numel() else None,
                    "newlines": int(b.newlines.numel()),
                    "region": [round(v, 4) for v in b.region],
                }
                for b in self.blocks
            ],
        }


# ---------------------------------------------------------------------------------------
# The image processor's affine map (original image -> processed image), shared by every
# family's block regions and by lochead's boxes
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProcessorGeometry:
    """Where the original image lands in the processed (model input) image, per axis:
    processed = original * scale + offset, inside an out_w x out_h canvas. Built by
    ``processor_geometry`` from the processor's own settings (pad, resize, center crop)."""

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    out_w: int
    out_h: int
    orig_w: int
    orig_h: int

    def to_original(self, box: Sequence[float]) -> list[float]:
        """A box in fractions of the processed image -> fractions of the original image, clipped to 0..1."""
        x1, y1, x2, y2 = box
        xs = [(v * self.out_w - self.offset_x) / self.scale_x / self.orig_w for v in (x1, x2)]
        ys = [(v * self.out_h - self.offset_y) / self.scale_y / self.orig_h for v in (y1, y2)]
        clip = lambda v: min(1.0, max(0.0, v))  # noqa: E731
        return [clip(xs[0]), clip(ys[0]), clip(xs[1]), clip(ys[1])]

    def after_pad(self, pad) -> "ProcessorGeometry":
        """This geometry (of a pad-to-square canvas) composed with the pad: original -> square -> processed."""
        ox, oy = pad.offset
        return ProcessorGeometry(
            self.scale_x,
            self.scale_y,
            self.offset_x + ox * self.scale_x,
            self.offset_y + oy * self.scale_y,
            self.out_w,
            self.out_h,
            pad.orig_w,
            pad.orig_h,
        )

    def to_processed(self, box: Sequence[float]) -> list[float]:
        """A box in fractions of the original image -> fractions of the processed image (unclipped)."""
        x1, y1, x2, y2 = box
        fx = lambda v: (v * self.orig_w * self.scale_x + self.offset_x) / self.out_w  # noqa: E731
        fy = lambda v: (v * self.orig_h * self.scale_y + self.offset_y) / self.out_h  # noqa: E731
        return [fx(x1), fy(y1), fx(x2), fy(y2)]


def _size_get(size, key):
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def processor_geometry(image_processor, image_size: tuple[int, int]) -> ProcessorGeometry:
    """The affine map original -> processed image of a transformers image processor.

    Follows the processor's own steps: pad to a square (``do_pad``, LLaVA's expand2square,
    image centred), resize (``shortest_edge`` keeping the aspect ratio, or an exact
    height x width), center crop (``do_center_crop``, padding first if the crop is larger).
    The HF port of llava-1.5 uses CLIPImageProcessor: shortest-edge resize + center crop.
    """
    w, h = image_size
    sx = sy = 1.0
    ox = oy = 0.0
    cw, ch = w, h
    if getattr(image_processor, "do_pad", False):
        side = max(cw, ch)
        ox += (side - cw) // 2
        oy += (side - ch) // 2
        cw = ch = side
    if getattr(image_processor, "do_resize", True):
        size = image_processor.size
        short_edge = _size_get(size, "shortest_edge")
        if _size_get(size, "height") and _size_get(size, "width"):
            nh, nw = int(_size_get(size, "height")), int(_size_get(size, "width"))
        elif short_edge:
            short, long = (cw, ch) if cw <= ch else (ch, cw)
            new_short, new_long = int(short_edge), int(int(short_edge) * long / short)
            nw, nh = (new_short, new_long) if cw <= ch else (new_long, new_short)
        else:
            raise ValueError(f"unsupported image processor size {size!r}: need shortest_edge or height/width")
        fx, fy = nw / cw, nh / ch
        sx, sy, ox, oy = sx * fx, sy * fy, ox * fx, oy * fy
        cw, ch = nw, nh
    if getattr(image_processor, "do_center_crop", False):
        crop = image_processor.crop_size
        tw, th = int(_size_get(crop, "width")), int(_size_get(crop, "height"))
        if tw > cw or th > ch:  # the processor pads before cropping
            px, py = ((tw - cw) // 2 if tw > cw else 0), ((th - ch) // 2 if th > ch else 0)
            ox, oy = ox + px, oy + py
            cw, ch = max(cw, tw), max(ch, th)
        top, left = int((ch - th) / 2.0), int((cw - tw) / 2.0)
        ox, oy = ox - left, oy - top
        cw, ch = tw, th
    return ProcessorGeometry(sx, sy, ox, oy, cw, ch, w, h)


# ---------------------------------------------------------------------------------------
# Builders, one per model family
# ---------------------------------------------------------------------------------------

# builder(config, processor, image_size (W, H), start, inputs) -> list[Block] | (list[Block], others)
BUILDERS: dict[str, Callable[..., Any]] = {}


def builder(*model_types: str):
    """Register a family's builder: ``fn(config, processor, image_size, start, inputs)`` returning its
    blocks in sequence order (or ``(blocks, others)`` with the positions of image tokens of no cell)."""

    def register(fn):
        for t in model_types:
            BUILDERS[t] = fn
        return fn

    return register


def supported_families() -> tuple[str, ...]:
    return tuple(sorted(BUILDERS))


def image_geometry(config, processor, image_size, input_ids: torch.Tensor, inputs: dict | None = None) -> ImageGeometry:
    """The geometry of the (single) image of one prompt, checked against the prompt's image tokens.

    config: the model config; processor: the checkpoint's processor (or its image processor);
    image_size: (W, H) of the image given to the processor; input_ids: (1, n); inputs: the
    processor's other outputs, for families whose layout needs them (``image_grid_thw``)."""
    family = getattr(config, "model_type", None)
    if family not in BUILDERS:
        raise GeometryError(
            f"no image geometry for model_type {family!r}; supported: {', '.join(supported_families())}"
        )
    token_id = image_token_id(config)
    where = (input_ids[0] == token_id).nonzero().flatten().cpu()
    if where.numel() == 0:
        raise GeometryError("the prompt has no image token")
    start = int(where[0])
    built = BUILDERS[family](config, processor, tuple(int(v) for v in image_size), start, inputs or {})
    blocks, others = built if isinstance(built, tuple) else (built, torch.empty(0, dtype=torch.long))
    geo = ImageGeometry(family, tuple(int(v) for v in image_size), tuple(blocks), others)
    expected = geo.all_positions()
    if expected.numel() != where.numel() or not torch.equal(expected, where):
        raise GeometryError(
            f"{family}: the prompt has {where.numel()} image tokens at {_span_text(where)}, but the config and processor "
            f"predict {expected.numel()} for a {image_size[0]}x{image_size[1]} image "
            f"({', '.join(f'{b.name} {b.rows}x{b.cols}' for b in blocks)}); one image per prompt is supported"
        )
    return geo


def image_token_id(config) -> int:
    return (
        getattr(config, "image_token_id", None)
        if getattr(config, "image_token_id", None) is not None
        else config.image_token_index
    )


def _span_text(pos: torch.Tensor) -> str:
    contiguous = int(pos[-1] - pos[0]) + 1 == pos.numel()
    return f"{int(pos[0])}..{int(pos[-1])}" + ("" if contiguous else " (not contiguous)")


def _grid_block(name, rows, cols, start, region, newline: bool = False) -> tuple[Block, int]:
    """A rows x cols block starting at ``start`` (with a newline after each row if asked); returns it and its end."""
    width = cols + (1 if newline else 0)
    idx = torch.arange(rows * width).view(rows, width) + start
    positions = idx[:, :cols].flatten()
    newlines = idx[:, cols] if newline else torch.empty(0, dtype=torch.long)
    return Block(name, rows, cols, positions, newlines, region), start + rows * width


def _image_processor(processor):
    return getattr(processor, "image_processor", processor)


# -- LLaVA-1.5 -------------------------------------------------------------------------


@builder("llava")
def llava_geometry(config, processor, image_size, start, inputs) -> list[Block]:
    """One square grid (vision image_size / patch_size), CLS dropped under the 'default' strategy;
    it covers what the image processor keeps (CLIP: shortest-edge resize + centre crop)."""
    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    extra = 1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0  # CLS kept, first
    region = _processed_region(_image_processor(processor), image_size)
    block, _ = _grid_block("image", side, side, start + extra, region)
    return [block], torch.arange(start, start + extra)


def _processed_region(image_processor, image_size) -> tuple[float, float, float, float]:
    """The region of the original image the processed (resized, cropped) image covers."""
    g = processor_geometry(image_processor, image_size)
    w, h = image_size
    return (
        -g.offset_x / g.scale_x / w,
        -g.offset_y / g.scale_y / h,
        (g.out_w - g.offset_x) / g.scale_x / w,
        (g.out_h - g.offset_y) / g.scale_y / h,
    )


# -- LLaVA-NeXT / LLaVA-OneVision (anyres) ----------------------------------------------


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


@builder("llava_next", "llava_onevision")
def anyres_geometry(config, processor, image_size, start, inputs) -> list[Block]:
    """Base block (the whole image squashed to the tower's square), then the un-padded high-res
    block with one newline per row (OneVision: shrunk by interpolation past anyres_max_N tiles)."""
    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    if strategy != "default" and config.model_type == "llava_next":
        raise GeometryError(f"llava_next with vision_feature_select_strategy={strategy!r} is not supported (CLS kept)")
    base, pos = _grid_block("base", side, side, start, (0.0, 0.0, 1.0, 1.0))
    tile_rows, tile_cols = anyres_tiling(config, image_size)
    rows, cols, region = unpadded_grid(image_size[0], image_size[1], side * tile_rows, side * tile_cols)
    if config.model_type == "llava_onevision":
        max_tiles = int(str(getattr(config, "vision_aspect_ratio", "anyres_max_9")).removeprefix("anyres_max_"))
        ratio = math.sqrt(rows * cols / (max_tiles * side**2))
        if ratio > 1.1:  # the model interpolates the grid down; it still covers the same region
            rows, cols = int(rows // ratio), int(cols // ratio)
    highres, _ = _grid_block("highres", rows, cols, pos, region, newline=True)
    return [base, highres]


def single_block(image_pos: torch.Tensor, image_size=None) -> ImageGeometry:
    """The LLaVA-1.5 case without a config: the image tokens as one contiguous square block."""
    n = image_pos.numel()
    side = math.isqrt(n)
    if n == 0 or side * side != n or int(image_pos[-1] - image_pos[0]) + 1 != n:
        raise GeometryError(
            f"{n} image tokens are not one contiguous square grid; pass the model config to the Request"
        )
    block = Block("image", side, side, image_pos.cpu(), torch.empty(0, dtype=torch.long), (0.0, 0.0, 1.0, 1.0))
    return ImageGeometry("llava", tuple(image_size or (0, 0)), (block,))


# -- Qwen2.5-VL ------------------------------------------------------------------------


@builder("qwen2_5_vl")
def qwen2_5_vl_geometry(config, processor, image_size, start, inputs) -> list[Block]:
    """One contiguous non-square block: the merged grid ``image_grid_thw[1:] / spatial_merge_size``,
    row-major (the merger keeps raster order), covering the whole image given to the processor
    (Qwen resizes to multiples of patch x merge without cropping or padding). Without
    ``image_grid_thw`` the grid is the processor's own ``smart_resize`` of ``image_size``."""
    merge = config.vision_config.spatial_merge_size
    thw = inputs.get("image_grid_thw")
    if thw is not None:
        if len(thw) != 1:
            raise GeometryError(f"qwen2_5_vl: {len(thw)} images in the prompt; one image per prompt is supported")
        t, h, w = (int(v) for v in thw[0])
    else:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        ip = _image_processor(processor)
        size = ip.size
        get = (lambda k: size.get(k)) if isinstance(size, dict) else (lambda k: getattr(size, k, None))
        factor = ip.patch_size * ip.merge_size
        rh, rw = smart_resize(
            image_size[1], image_size[0], factor=factor, min_pixels=get("shortest_edge"), max_pixels=get("longest_edge")
        )
        t, h, w = 1, rh // ip.patch_size, rw // ip.patch_size
    if t != 1:
        raise GeometryError(f"qwen2_5_vl: image_grid_thw has t={t}; images only (videos are not supported)")
    # named "base": the one block that sees the whole image at the tower's resolution (what
    # techniques with a block choice, e.g. lochead's block=base, read)
    block, _ = _grid_block("base", h // merge, w // merge, start, (0.0, 0.0, 1.0, 1.0))
    return [block]
