"""One geometry object per image: where its tokens are in the LM sequence and what they see.

Every technique reads image positions and grids from an ``ImageGeometry``, never from constants.
The family adapters (methods/families/, one module per family) are the only code that knows a
family's layout; ``families.image_geometry`` builds one image's geometry through them. This module
holds the types and the family-free arithmetic (the processor's affine map, grid blocks).

An image is one or more **blocks**, each a ``rows x cols`` grid of tokens in row-major order
(LLaVA-1.5: one square grid; LLaVA-NeXT/OneVision: ``base`` then ``highres`` with row newlines;
Qwen2.5-VL: one non-square grid).

Each block also knows the region of the image given to the processor it covers
(``region``: x0, y0, x1, y1 in fractions of that image; outside 0..1 where the block sees
padding, inside where it sees a crop), so a token maps back to pixels with ``cell_boxes``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

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
# Helpers the family adapters (methods/families/) build their blocks with
# ---------------------------------------------------------------------------------------


def image_token_id(config) -> int:
    return (
        getattr(config, "image_token_id", None)
        if getattr(config, "image_token_id", None) is not None
        else config.image_token_index
    )


def grid_block(name, rows, cols, start, region, newline: bool = False) -> tuple[Block, int]:
    """A rows x cols block starting at ``start`` (with a newline after each row if asked); returns it and its end."""
    width = cols + (1 if newline else 0)
    idx = torch.arange(rows * width).view(rows, width) + start
    positions = idx[:, :cols].flatten()
    newlines = idx[:, cols] if newline else torch.empty(0, dtype=torch.long)
    return Block(name, rows, cols, positions, newlines, region), start + rows * width


def processed_region(image_processor, image_size) -> tuple[float, float, float, float]:
    """The region of the original image the processed (resized, cropped) image covers."""
    g = processor_geometry(image_processor, image_size)
    w, h = image_size
    return (
        -g.offset_x / g.scale_x / w,
        -g.offset_y / g.scale_y / h,
        (g.out_w - g.offset_x) / g.scale_x / w,
        (g.out_h - g.offset_y) / g.scale_y / h,
    )


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
