"""Perception Magnifier, what differs per model family: the view the map covers, the pixels of an
image, the input embeddings, and the positions of PM's own language-model passes (``FAMILIES``).
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
    return size // vc.patch_size if size else None


def embed(model, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """Input embeddings with the image features scattered in, as LlavaModel.forward builds them."""
    m, cfg = model.model, model.config
    emb = m.get_input_embeddings()(input_ids)
    out = m.get_image_features(
        pixel_values=pixel_values.to(model.device, model.dtype),
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        return_dict=True,
    )
    feats = torch.cat(list(out.pooler_output), dim=0).to(emb.device, emb.dtype)
    mask = m.get_placeholder_mask(input_ids, inputs_embeds=emb, image_features=feats)
    return emb.masked_scatter(mask, feats)


class LlavaFamily:
    """LLaVA-1.5 (``llava``): one square grid; the map pass and the magnification run on the
    square view of the image (``view``: padded as LLaVA-1.5 preprocesses, or centre-cropped);
    the language model's own 1-D positions (none passed: arange after the cache)."""

    views = VIEWS

    def view(self, req: Request, mode: str) -> Image.Image:
        fill = (0, 0, 0)
        if mode == "pad":
            mean = getattr(req.processor.image_processor, "image_mean", None) or (0.0, 0.0, 0.0)
            fill = tuple(int(c * 255) for c in mean)
        return square_view(req.images[0], mode, fill)

    def pixels(self, req: Request, image: Image.Image) -> torch.Tensor:
        return req.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]

    def embed(self, model, req: Request, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        return embed(model, input_ids, pixel_values)

    def positions(self, model, req: Request, length: int) -> None:
        return None


class _WholeImage:
    """A family whose mapped block sees the whole image the processor got (no pad, no crop): the view
    is that image, and the magnified image, of the same size, must process to the prompt's own
    ``size_key`` (so the prompt's image tokens, and their positions, stay)."""

    views = ("pad",)  # the parameter's default; there is nothing to pad or crop
    size_key = ""

    def view(self, req: Request, mode: str) -> Image.Image:
        return to_rgb(req.images[0])

    def pixels(self, req: Request, image: Image.Image) -> torch.Tensor:
        out = req.processor.image_processor(images=[image], return_tensors="pt")
        given = req.inputs.get(self.size_key)
        if given is None or not torch.equal(torch.as_tensor(out[self.size_key]).cpu(), torch.as_tensor(given).cpu()):
            raise RequestError(
                f"pm: the magnified image ({image.size[0]}x{image.size[1]}) processes to {self.size_key} "
                f"{torch.as_tensor(out[self.size_key]).tolist()}, not the prompt's {None if given is None else torch.as_tensor(given).tolist()}; "
                "is the processor the one that made the prompt?"
            )
        return out["pixel_values"]


class QwenFamily(_WholeImage):
    """Qwen2.5-VL (``qwen2_5_vl``): one rows x cols merged grid over the whole image the processor
    got (no padding, no crop), so the view is that image and the magnified image keeps its size,
    hence its ``image_grid_thw``; every pass of PM's own passes gets the M-RoPE positions of
    ``get_rope_index`` (text after the image resumes at start + max(h, w) / merge), continued as
    text after the prompt, as ``generate`` does with its cached ``rope_deltas``."""

    size_key = "image_grid_thw"

    def embed(self, model, req: Request, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Input embeddings with the merged image features scattered in, as Qwen2_5_VLModel.forward builds them."""
        m = model.model
        emb = m.get_input_embeddings()(input_ids)
        out = m.get_image_features(pixel_values.to(model.device), self._thw(req).to(model.device), return_dict=True)
        return _scatter_image(m, input_ids, emb, out.pooler_output)

    def positions(self, model, req: Request, length: int) -> torch.Tensor:
        """(3, 1, length) M-RoPE positions of the request's first ``length`` tokens (later ones: text
        continuing after the prompt, where ``generate``'s cached rope_deltas put them)."""
        pos = positions.prompt_positions(model, req.input_ids, self._thw(req).to(req.input_ids.device))
        n = pos.shape[-1]
        if length > n:
            pos = positions.extend(pos, positions.next_position(pos), length - n)
        return positions.position_ids(pos)[..., :length]

    @staticmethod
    def _thw(req: Request) -> torch.Tensor:
        thw = req.inputs.get("image_grid_thw")
        if thw is None:
            raise RequestError("pm: a qwen2_5_vl request needs the processor's image_grid_thw (Request.inputs)")
        return thw


class AnyresFamily(_WholeImage, LlavaFamily):
    """LLaVA-NeXT / LLaVA-OneVision (``llava_next``, ``llava_onevision``): the map is over the **base
    block** (``req.geometry.base``: the whole image squashed to the tower's square, one fixed
    side x side grid that sees every region once, as LLaVA-1.5's); the high-res tiles and their
    newlines are neither mapped nor blocked. The view is the image the processor got, whole (the
    base block covers it); the magnified image keeps its size, so ``image_sizes``, the anyres tiling
    and the token count stay (checked); the base crop and every tile are cut from the magnified
    image. 1-D positions, as LLaVA-1.5."""

    size_key = "image_sizes"

    def embed(self, model, req: Request, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Input embeddings with the packed anyres features (base, high-res rows, newlines) scattered in, as the model's forward."""
        m, cfg = model.model, model.config
        emb = m.get_input_embeddings()(input_ids)
        out = m.get_image_features(
            pixel_values=pixel_values.to(model.device, model.dtype),
            image_sizes=torch.as_tensor(req.inputs["image_sizes"]).to(model.device),
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            return_dict=True,
        )
        return _scatter_image(m, input_ids, emb, out.pooler_output)


def _scatter_image(m, input_ids: torch.Tensor, emb: torch.Tensor, pooled) -> torch.Tensor:
    """The image features put at the image tokens, as the models' forwards do (OneVision's and
    Qwen's placeholder masks come as (image, video))."""
    feats = torch.cat(list(pooled), dim=0).to(emb.device, emb.dtype)
    mask = m.get_placeholder_mask(input_ids, inputs_embeds=emb, image_features=feats)
    return emb.masked_scatter(mask[0] if isinstance(mask, tuple) else mask, feats)


FAMILIES = {
    "llava": LlavaFamily(),
    "llava_next": AnyresFamily(),
    "llava_onevision": AnyresFamily(),
    "qwen2_5_vl": QwenFamily(),
}
