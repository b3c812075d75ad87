"""What every technique shares: the request it sees, and how it runs generation or a forward.

A technique is a recipe (a list of hook-layer edits built from its parameters and the
request) plus, when it needs more than one pass, its own ``generate``/``forward``.
This module imports no lmms-eval: the lmms-eval wrappers build a ``Request`` and call
``Technique.generate`` or ``Technique.forward``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from . import families, hooks
from .geometry import GeometryError

if TYPE_CHECKING:
    from .geometry import ImageGeometry


class RequestError(ValueError):
    """The request cannot be served by the technique (no image, several images, ...)."""


@dataclasses.dataclass(frozen=True)
class SquarePad:
    """Where an image sits in its pad-to-square canvas (LLaVA-1.5's ``expand2square``: the image
    centred on a max(w, h) square of the processor's mean colour, llava/mm_utils.py). Boxes and maps
    in fractions of the square map back to fractions of the original with ``to_original``."""

    orig_w: int
    orig_h: int

    @property
    def side(self) -> int:
        return max(self.orig_w, self.orig_h)

    @property
    def offset(self) -> tuple[int, int]:
        return (self.side - self.orig_w) // 2, (self.side - self.orig_h) // 2

    def to_original(self, box) -> list[float]:
        """(x1, y1, x2, y2) in fractions of the square -> fractions of the original image, clipped to 0..1."""
        ox, oy = self.offset
        clip = lambda v: min(1.0, max(0.0, v))  # noqa: E731
        x1, y1, x2, y2 = box
        return [
            clip((x1 * self.side - ox) / self.orig_w),
            clip((y1 * self.side - oy) / self.orig_h),
            clip((x2 * self.side - ox) / self.orig_w),
            clip((y2 * self.side - oy) / self.orig_h),
        ]

    def to_square(self, box) -> list[float]:
        """(x1, y1, x2, y2) in fractions of the original image -> fractions of the square."""
        ox, oy = self.offset
        x1, y1, x2, y2 = box
        return [
            (x1 * self.orig_w + ox) / self.side,
            (y1 * self.orig_h + oy) / self.side,
            (x2 * self.orig_w + ox) / self.side,
            (y2 * self.orig_h + oy) / self.side,
        ]


def pad_to_square(image, fill) -> tuple[Any, SquarePad]:
    """(the image on its centred square canvas of colour ``fill``, its SquarePad); square images unchanged."""
    from PIL import Image

    image = image.convert("RGB") if image.mode != "RGB" else image
    pad = SquarePad(*image.size)
    if pad.orig_w == pad.orig_h:
        return image, pad
    canvas = Image.new("RGB", (pad.side, pad.side), tuple(int(c) for c in fill))
    canvas.paste(image, pad.offset)
    return canvas, pad


def mean_colour(processor) -> tuple[int, int, int]:
    """The image processor's mean as 0..255 RGB (what expand2square fills with: int(x * 255))."""
    ip = getattr(processor, "image_processor", processor)
    return tuple(int(x * 255) for x in getattr(ip, "image_mean", (0.5, 0.5, 0.5)))


@dataclasses.dataclass
class Request:
    """One lmms-eval request as a technique sees it (batch size 1).

    input_ids: (1, n) prompt ids (with the continuation, for a loglikelihood forward);
    prompt_len: number of prompt tokens; rows >= prompt_len - 1 predict answer tokens;
    images: the visuals given to the processor (PIL images, full resolution; with
    pad_to_square, the padded squares, and ``pads`` maps them back to the originals);
    text: the prompt text given to the processor; processor: to re-process an image.
    """

    input_ids: torch.Tensor
    image_token_id: int
    prompt_len: int
    images: list = dataclasses.field(default_factory=list)
    text: str | None = None
    processor: Any = None
    doc_key: str | None = None  # optional stable id of the document (for saved visuals)
    pads: list = dataclasses.field(
        default_factory=list
    )  # SquarePad per image when pad_to_square is on (images are then the squares)
    config: Any = None  # the model config (the family and its grids); None: a single square block is assumed
    inputs: dict = dataclasses.field(
        default_factory=dict
    )  # processor outputs a family's geometry needs (image_grid_thw)
    # the image options the lmms-eval class called the processor with (qwen3_vl: do_resize=False, the image
    # already resized by qwen_vl_utils): re-processing an image (PM's magnified view) passes them again
    image_kwargs: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.input_ids.shape[0] != 1:
            raise RequestError(f"one request at a time (batch_size=1); got a batch of {self.input_ids.shape[0]}")

    @property
    def image_pos(self) -> torch.Tensor:
        """Absolute positions of every image token (grid cells and, for anyres models, newlines), from config.image_token_id."""
        return hooks.image_positions(self.input_ids, self.image_token_id)

    def image_keys(self, newlines: bool = True) -> torch.Tensor:
        """The image's token positions; ``newlines=False`` leaves out the row-newline tokens of anyres
        models (LLaVA-NeXT/OneVision), which share the image token id but are a learned separator.
        LLaVA-1.5 has one block and no newlines: no geometry needed."""
        if newlines or not self.adapter.row_newlines:
            return self.image_pos
        return self.geometry.positions(newlines=False).to(self.input_ids.device)

    @property
    def family(self) -> str:
        return getattr(self.config, "model_type", "llava")

    @property
    def adapter(self) -> "families.Family":
        """The family adapter (methods/families/); LLaVA-1.5's for a hand-built request without a config."""
        try:
            return families.adapter(self.family)
        except GeometryError as e:
            raise RequestError(str(e)) from e

    @property
    def geometry(self) -> "ImageGeometry":
        """The image's geometry (blocks, grids, newlines, regions), computed once from the config,
        processor and image size (methods/geometry.py); call after ``require_one_image``."""
        cached = self.__dict__.get("_geometry")
        if cached is None:
            cached = self.__dict__["_geometry"] = self._build_geometry()
        return cached

    def _build_geometry(self):
        from .geometry import single_block

        if self.config is None:  # a hand-built request (tests, scripts): one contiguous square block
            return single_block(self.image_pos, self.images[0].size if self.images else None)
        try:
            size = self.images[0].size if self.images else None
            return families.image_geometry(self.config, self.processor, size, self.input_ids, self.inputs)
        except GeometryError as e:
            raise RequestError(str(e)) from e

    def refuse_family(self, technique: str, supported: tuple[str, ...], why: str) -> None:
        """A RequestError naming the family when a technique does not (yet) support it."""
        if self.family not in supported:
            raise RequestError(f"{technique} does not support {self.family} checkpoints: {why}")

    @property
    def answer_rows(self) -> hooks.Rows:
        """The query rows that predict answer tokens: the last prompt token and every later one."""
        return hooks.Rows.span(self.prompt_len - 1)

    def require_one_image(self, technique: str) -> None:
        known = families.ADAPTERS.get(self.family)  # names in the messages; an unknown family is refused elsewhere
        stock, shown = (known.lmms_eval_model, known.display_name) if known else ("lmms-eval's class", self.family)
        n_img = len(self.images)
        if n_img != 1:
            raise RequestError(
                f"{technique} needs exactly one image per request, but this request has {n_img}; "
                f"use a single-image task (or stock {stock} for text-only and multi-image tasks)"
            )
        if self.image_pos.numel() == 0:
            raise RequestError(
                f"{technique}: the prompt has no image token (id {self.image_token_id}) although the request has an "
                f"image; does the checkpoint's processor insert {shown}'s image tokens?"
            )
        pos = self.image_pos
        if int(pos[-1] - pos[0]) + 1 != pos.numel():
            raise RequestError(f"{technique}: the image tokens are not contiguous; one image per prompt is supported")


@dataclasses.dataclass
class Batch:
    """Several requests in one left-padded batch (lmms-eval's ``--batch_size N``), as a technique sees them.

    Each request is the one it would be alone (``requests[i]``: its own unpadded ids, image, geometry), and
    ``offsets[i]`` is its row's left padding: a technique builds each request's edits exactly as at batch size
    1 and ``place_each`` moves them to their batch row and shifts their positions by the padding. Padding keys
    are masked by the model's own attention mask, so every request's attention is what it is alone.
    input_ids / attention_mask: the padded (B, L) batch; prompts end together at L (left padding).
    """

    requests: list[Request]
    offsets: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None

    @property
    def image_token_id(self) -> int:
        return self.requests[0].image_token_id

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def config(self):
        return self.requests[0].config

    @property
    def family(self) -> str:
        return self.requests[0].family

    @property
    def adapter(self) -> "families.Family":
        return self.requests[0].adapter

    def require_one_image(self, technique: str) -> None:
        for req in self.requests:
            req.require_one_image(technique)

    def vision_rows(self, i: int) -> list[int]:
        """The vision tower's batch rows of request i: its image's crops, after the earlier requests' crops (the
        family adapter's ``tower_crops``: LLaVA-1.5 row i; NeXT/OneVision the base crop and tiles of image i)."""
        family = self.adapter
        if not family.crops_as_tower_rows:
            raise RequestError(
                f"{self.family}: an edit of the vision tower cannot be placed in a batch ({family.display_name}'s "
                "tower does not run each image as rows of its batch); use batch_size=1"
            )
        crops = [family.tower_crops(r.config, r.inputs) for r in self.requests[: i + 1]]
        start = sum(crops[:i])
        return list(range(start, start + crops[i]))

    def place_each(self, recipe) -> list[hooks.AttnEdit]:
        """Every request's edits (``recipe(request)``, built as for the request alone), placed in its batch row."""
        placed, seen = [], set()
        for i, (req, offset) in enumerate(zip(self.requests, self.offsets)):
            for edit in recipe(req):
                if id(edit) in seen:
                    continue
                seen.add(id(edit))
                if edit.tower == "vision":
                    edit.place(self.vision_rows(i), 0)  # the tower sees each image unpadded
                else:
                    edit.place([i], offset)
                placed.append(edit)
        return placed


def left_offsets(attention_mask: torch.Tensor) -> list[int]:
    """Each row's left padding; a RequestError for a right-padded or gapped row (positions would not line up)."""
    offsets = []
    for row in attention_mask.bool():
        n = int((~row).sum())
        if n and bool(row[:n].any()):
            raise RequestError("a batch must be left-padded (the padding tokens first); got right or inner padding")
        offsets.append(n)
    return offsets


class Technique:
    """Base: install ``recipe`` for one generate/forward call. Override for multi-pass methods.

    A ``Batch`` (batch_size > 1) runs through the same code when ``batch_refusal()`` is None: each request's
    ``recipe`` is placed in its batch row (``Batch.place_each``). A technique whose result would not equal
    batch size 1 per request returns the reason instead, and the wrappers refuse batch_size > 1 with it."""

    name = "technique"
    batch_refused = (
        "it runs its own passes per request (not yet written for a left-padded batch); use batch_size=1 and scale "
        "out with accelerate launch --num_processes N"
    )

    def batch_refusal(self, family=None) -> str | None:
        """None when batches give every request its batch-size-1 result; else why not (ModelArgsError text).
        ``family``: the checkpoint's family adapter, when the answer depends on it (None: any family)."""
        return self.batch_refused

    def __init__(self, **params):
        self.params = params

    def recipe(self, model, req: Request) -> list[hooks.AttnEdit]:
        return []

    def describe(self) -> dict:
        """The full recipe configuration, logged with results."""
        return {"technique": self.name, **self.params}

    def edits(self, model, req: Request | Batch) -> list[hooks.AttnEdit]:
        """``recipe`` for one request; for a batch, every request's recipe placed in its row."""
        if isinstance(req, Batch):
            self.check_batch(req)
            return req.place_each(lambda r: self.recipe(model, r))
        return self.recipe(model, req)

    def check_batch(self, batch: Batch) -> None:
        why = self.batch_refusal(batch.adapter)
        if why:
            raise RequestError(f"{self.name} cannot run a batch of {len(batch.requests)} requests: {why}")

    def generate(self, model, req: Request | Batch, **kwargs):
        req.require_one_image(self.name)
        if isinstance(req, Batch) and int(kwargs.get("num_beams") or 1) > 1:
            raise RequestError(f"{self.name}: beam search in a batch is not supported; use batch_size=1")
        with hooks.edited(model, *self.edits(model, req)):
            return model.generate(**kwargs)

    def forward(self, model, req: Request | Batch, **kwargs):
        req.require_one_image(self.name)
        with hooks.edited(model, *self.edits(model, req)):
            return model(**kwargs)


def layer_range(start: int | None, end: int | None, n_layers: int, *, default_start: int, name: str) -> range:
    """[start, end) clipped to the model's depth; a clear error for an empty or outside range."""
    start = default_start if start is None else start
    end = n_layers if end is None else end
    if start < 0:
        start += n_layers
    if end < 0:
        end += n_layers
    if not (0 <= start < end <= n_layers):
        raise ValueError(
            f"{name}: layer range [{start}, {end}) is outside the model's {n_layers} language-model layers; "
            f"choose 0 <= start < end <= {n_layers}"
        )
    return range(start, end)
