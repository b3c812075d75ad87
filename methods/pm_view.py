"""Perception Magnifier's inputs on any family: the view the map covers, the pixels of an image,
the input embeddings, and the positions of PM's own language-model passes.

What differs per family comes from its adapter (methods/families/):
- ``square_grid`` (LLaVA-1.5): the map pass and the magnification run on the square view of the
  image (``view``: padded as LLaVA-1.5 preprocesses, or centre-cropped);
- otherwise the mapped block (``geometry.base``) sees the whole image the processor got (no pad,
  no crop): the view is that image, and the magnified image, of the same size, must process to the
  prompt's own layout inputs (``request_inputs``: anyres ``image_sizes``, Qwen's
  ``image_grid_thw``), so the prompt's image tokens and their positions stay (checked);
- ``embed_image``: the input embeddings with the image features put in, as the model's forward;
  ``lm_inputs`` adds what else the forward hands the language model for the image (DeepStack);
- ``mrope``: PM's passes get the family's multi-axis positions of the prompt, continued as text
  after it (as ``generate`` does with Qwen's cached ``rope_deltas``); 1-D families get none (the
  model's own arange after the cache).
"""

from __future__ import annotations

import torch
from PIL import Image

from . import positions
from .pm_magnify import VIEWS, square_view, to_rgb
from .technique import Request, RequestError


def image_grid(model) -> int | None:
    """LLaVA-1.5's square grid side (vision image_size / patch_size); None for a family whose grid
    depends on the image (Qwen2.5-VL: ``Request.geometry``)."""
    vc = model.config.vision_config
    size = getattr(vc, "image_size", None)
    if isinstance(size, (list, tuple)):  # an (h, w) tower input (InternViT): tiles, never one square grid
        return None
    return size // vc.patch_size if size else None


def views(req: Request) -> tuple[str, ...]:
    """The ``view`` values that apply: pad or crop on a square grid; else only the default (nothing to pad or crop)."""
    return VIEWS if req.adapter.square_grid else ("pad",)


def view(req: Request, mode: str) -> Image.Image:
    """The image the map pass and the magnification see."""
    if not req.adapter.square_grid:
        return to_rgb(req.images[0])
    fill = (0, 0, 0)
    if mode == "pad":
        mean = getattr(req.processor.image_processor, "image_mean", None) or (0.0, 0.0, 0.0)
        fill = tuple(int(c * 255) for c in mean)
    return square_view(req.images[0], mode, fill)


def pixels(req: Request, image: Image.Image) -> torch.Tensor:
    """The processor's pixel_values of ``image``; off a square grid, checked to keep the prompt's layout."""
    out = req.adapter.process_image(req.processor, image, **req.image_kwargs)
    if req.adapter.square_grid:
        return out["pixel_values"]
    for key in req.adapter.request_inputs:
        given = req.inputs.get(key)
        if given is None or not torch.equal(torch.as_tensor(out[key]).cpu(), torch.as_tensor(given).cpu()):
            raise RequestError(
                f"pm: the magnified image ({image.size[0]}x{image.size[1]}) processes to {key} "
                f"{torch.as_tensor(out[key]).tolist()}, not the prompt's {None if given is None else torch.as_tensor(given).tolist()}; "
                "is the processor the one that made the prompt?"
            )
    return out["pixel_values"]


def embed(model, req: Request, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """Input embeddings with the image features scattered in, as the family's forward builds them."""
    return req.adapter.embed_image(model, input_ids, pixel_values, req.inputs)


def lm_inputs(model, req: Request, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(input embeddings, the language model's other image inputs) for PM's own passes, as the family's
    forward builds them (Qwen3-VL: DeepStack's per-layer features; most families: none)."""
    return req.adapter.lm_inputs(model, input_ids, pixel_values, req.inputs)


def pass_positions(model, req: Request, length: int) -> torch.Tensor | None:
    """Position ids of PM's passes over the request's first ``length`` tokens: None with 1-D RoPE;
    (3, 1, length) with M-RoPE (later tokens: text continuing after the prompt)."""
    if not req.adapter.mrope:
        return None
    thw = req.inputs.get("image_grid_thw")
    if thw is None:
        raise RequestError(f"pm: a {req.family} request needs the processor's image_grid_thw (Request.inputs)")
    pos = positions.prompt_positions(model, req.input_ids, thw.to(req.input_ids.device))
    n = pos.shape[-1]
    if length > n:
        pos = positions.extend(pos, positions.next_position(pos), length - n)
    return positions.position_ids(pos)[..., :length]
