"""VIRAL's teachers: the frozen vision models whose patch features are the alignment targets y,
and those targets on the LLM's grid (``teacher_targets``, ``teacher_targets_from_images``: resampled
with ``resample_grid`` of methods/viral.py, where the loss, the projector and the families are).

Teachers (all frozen, run under ``torch.no_grad``):
- ``BackboneTeacher``: any transformers vision backbone loaded by path (DINOv2 for real
  users, the ShapeWorld teacher here), with its *own* normalisation and input size. The
  reference implementation feeds the CLIP-normalised pixels to DINOv2 as they are; here
  the teacher sees either
  * the original image re-processed (``features_from_images``, the default in training):
    resized and centre-cropped with the LLaVA processor's geometry (shortest edge, then the
    same crop fraction) to the teacher's input size, normalised with the teacher's mean/std;
    the teacher then sees the full-resolution image, not the LLM's downsampled pixels; or
  * the LLaVA pixels converted (``features``): the processor's (x - mean)/std is undone
    exactly, the RGB image resized to the teacher's size and normalised with its mean/std.
  Either way the field of view is the LLM's (the teacher's own processor would crop
  differently: DINOv2 resizes to 256 and centre-crops 224), so patch (i, j) of both grids
  covers the same part of the picture.
- ``OfficialTeacher``: the reference implementation's path exactly (cvlab-kaist/VIRAL): a DINOv2
  whose position table is resampled to the LLM's grid, fed the LLaVA pixels as they are, its
  final-LayerNorm patch tokens matched 1:1 (``viral-train --preset official``).
- ``EncoderTeacher``: the LLaVA model's own vision tower at ``vision_feature_layer``
  (the paper's "align to the encoder's features" variant); its grid is the LLM's grid.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .viral import resample_grid, square_grid

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def unnormalise(pixel_values: torch.Tensor, mean, std) -> torch.Tensor:
    """Undo a processor's (x - mean) / std: back to RGB in [0, 1]."""
    m = torch.as_tensor(mean, dtype=pixel_values.dtype, device=pixel_values.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=pixel_values.dtype, device=pixel_values.device).view(1, -1, 1, 1)
    return pixel_values * s + m


class BackboneTeacher(nn.Module):
    """A frozen transformers vision backbone (DINOv2, ViT, the ShapeWorld teacher) loaded by path.

    ``features(pixel_values, src_mean, src_std)`` takes the LLaVA processor's pixels and
    returns (patch features (B, h*w, C), (h, w)) computed with the teacher's own
    normalisation and input size (see the module docstring)."""

    def __init__(
        self,
        backbone: nn.Module,
        mean,
        std,
        image_size: int,
        patch_size: int,
        name: str = "backbone",
        dim: int | None = None,
    ):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.mean, self.std = tuple(mean), tuple(std)
        self.image_size, self.patch_size, self.name = int(image_size), int(patch_size), name
        if self.image_size % self.patch_size:
            raise ValueError(f"teacher image size {image_size} is not a multiple of its patch size {patch_size}")
        self.dim = int(dim or backbone.config.hidden_size)

    @classmethod
    def from_pretrained(cls, path, image_size: int | None = None) -> "BackboneTeacher":
        from transformers import AutoModel

        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"teacher {path} is not a transformers checkpoint directory (no config.json); pass a local vision "
                "backbone such as a saved facebook/dinov2-base, `self` for the model's own vision tower, or `none`"
            )
        try:
            backbone = AutoModel.from_pretrained(path, use_safetensors=True)
        except ValueError:  # task-only architectures (Depth Anything): their vision backbone
            from transformers import AutoModelForDepthEstimation

            backbone = AutoModelForDepthEstimation.from_pretrained(path, use_safetensors=True).backbone
        cfg = backbone.config
        cfg = getattr(cfg, "vision_config", None) or getattr(cfg, "backbone_config", None) or cfg
        proc = {}
        if (path / "preprocessor_config.json").exists():
            proc = json.loads((path / "preprocessor_config.json").read_text())
        mean = proc.get("image_mean", IMAGENET_MEAN)
        std = proc.get("image_std", IMAGENET_STD)
        if image_size is None:  # the resolution the teacher was trained at
            crop = proc.get("crop_size") or proc.get("size") or {}
            image_size = crop.get("height") or crop.get("shortest_edge") if isinstance(crop, dict) else crop
            image_size = int(image_size or cfg.image_size)
        patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
        # CLIP/SigLIP: vision_model; SAM: vision_encoder (a feature map after its neck, output_channels wide)
        backbone = getattr(backbone, "vision_model", None) or getattr(backbone, "vision_encoder", None) or backbone
        dim = getattr(cfg, "output_channels", None) or cfg.hidden_size
        return cls(backbone, mean, std, image_size, patch, name=str(path), dim=dim)

    @torch.no_grad()
    def features(self, pixel_values: torch.Tensor, src_mean, src_std):
        rgb = unnormalise(pixel_values.float(), src_mean, src_std).clamp(0, 1)
        size = self.image_size
        if rgb.shape[-2:] != (size, size):
            rgb = F.interpolate(rgb, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = (rgb - torch.tensor(self.mean).view(1, -1, 1, 1)) / torch.tensor(self.std).view(1, -1, 1, 1)
        return self._encode(x)

    def _encode(self, x: torch.Tensor):
        size = self.image_size
        param = next(self.backbone.parameters())
        out = self.backbone(pixel_values=x.to(param.device, param.dtype))
        # backbones (Depth Anything's DINOv2) give feature maps of their out stages: the last one
        tokens = out.feature_maps[-1] if getattr(out, "feature_maps", None) is not None else out.last_hidden_state
        if tokens.ndim == 4:  # (B, C, h, w) maps (SAM's neck, reshaped backbone stages) -> tokens on their grid
            b, c, h, w = tokens.shape
            return tokens.flatten(2).transpose(1, 2), (h, w)
        grid = (size // self.patch_size, size // self.patch_size)
        n = grid[0] * grid[1]
        return tokens[:, tokens.shape[1] - n :], grid  # drop CLS / register tokens in front

    @torch.no_grad()
    def features_from_images(self, images, crop_fraction: float | None = 1.0):
        """The original PIL images, with the LLM's field of view, at the teacher's size and normalisation."""
        x = teacher_pixels(images, self.image_size, self.mean, self.std, crop_fraction)
        return self._encode(x)

    def describe(self) -> dict:
        return {"teacher": self.name, "image_size": self.image_size, "patch_size": self.patch_size, "dim": self.dim}


class EncoderTeacher(nn.Module):
    """The LLaVA model's own vision tower at its ``vision_feature_layer`` (CLS dropped), frozen.

    Keeps a reference to the tower (not a copy): train it frozen (LoRA on the LLM only)."""

    def __init__(self, llava_model):
        super().__init__()
        base = llava_model
        while not hasattr(base, "vision_tower") and hasattr(base, "model"):
            base = base.model
        self.__dict__["tower"] = base.vision_tower  # not registered: not a submodule to train/save
        cfg = llava_model.config  # a peft-wrapped model forwards .config to the LLaVA model
        self.feature_layer = cfg.vision_feature_layer
        self.strategy = cfg.vision_feature_select_strategy
        self.dim = cfg.vision_config.hidden_size
        self.name = "self"

    @torch.no_grad()
    def features(self, pixel_values: torch.Tensor, src_mean=None, src_std=None):
        param = next(self.tower.parameters())
        out = self.tower(pixel_values.to(param.device, param.dtype), output_hidden_states=True)
        layer = self.feature_layer if isinstance(self.feature_layer, int) else self.feature_layer[-1]
        tokens = out.hidden_states[layer]
        if self.strategy == "default":
            tokens = tokens[:, 1:]
        return tokens, square_grid(tokens.shape[1])

    def describe(self) -> dict:
        return {"teacher": "self", "vision_feature_layer": self.feature_layer, "dim": self.dim}


def resample_pos_embed(pos: torch.Tensor, new_hw: tuple[int, int], num_prefix: int = 1) -> torch.Tensor:
    """(1, prefix + h*w, C) absolute position table -> (1, prefix + H*W, C): the patch part resized
    bicubic with antialiasing in float32, prefix tokens kept (the rule of timm's
    ``resample_abs_pos_embed``, which llava_llama.py:303-305 applies to DINOv2's 37x37 table)."""
    n = pos.shape[1] - num_prefix
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"position table of {n} patches is not square")
    if (side, side) == tuple(new_hw):
        return pos
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    fmap = grid.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    fmap = F.interpolate(fmap, size=tuple(new_hw), mode="bicubic", antialias=True)
    grid = fmap.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1]).to(pos.dtype)
    return torch.cat([prefix, grid], dim=1)


class OfficialTeacher(nn.Module):
    """The teacher as cvlab-kaist/VIRAL computes it (llava_llama.py:294-306, 497-502), on a local
    transformers DINOv2 (e.g. a saved ``facebook/dinov2-base``):

    - the position table resampled once to the LLM's grid (24x24 for LLaVA-1.5) with
      ``resample_pos_embed``, so the model runs at the LLM's resolution without interpolating;
    - input: the LLaVA pixels exactly as the LLM gets them (padded to square, CLIP-normalised,
      336 px), bilinearly resized to grid x patch (a no-op at 336 = 24 x 14); no re-normalisation;
    - output: the final-LayerNorm patch tokens (``x_norm_patchtokens``), one per LLM image token,
      no feature resampling.
    """

    def __init__(self, backbone: nn.Module, grid: tuple[int, int], name: str = "backbone"):
        super().__init__()
        cfg = backbone.config
        self.patch_size = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
        self.n_prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.grid, self.name, self.dim = tuple(grid), name, int(cfg.hidden_size)
        emb = backbone.embeddings
        with torch.no_grad():
            table = resample_pos_embed(emb.position_embeddings.detach(), self.grid)
        emb.position_embeddings = nn.Parameter(table, requires_grad=False)
        self.backbone = backbone.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, path, grid: tuple[int, int]) -> "OfficialTeacher":
        from transformers import AutoModel

        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"teacher {path} is not a local transformers checkpoint (no config.json). The official VIRAL teacher is "
                "DINOv2 ViT-B/14: on a machine with network, `huggingface-cli download facebook/dinov2-base --local-dir "
                f"{path}` (or `AutoModel.from_pretrained('facebook/dinov2-base').save_pretrained('{path}')`), then pass that directory"
            )
        backbone = AutoModel.from_pretrained(path, use_safetensors=True)
        if not hasattr(backbone, "embeddings") or not hasattr(backbone.embeddings, "position_embeddings"):
            raise ValueError(
                f"teacher {path}: the official input path needs a ViT with an absolute position table (DINOv2); "
                "use --teacher-input image|pixels for other backbones"
            )
        return cls(backbone, grid, name=str(path))

    @torch.no_grad()
    def features(self, pixel_values: torch.Tensor, src_mean=None, src_std=None):
        size = (self.grid[0] * self.patch_size, self.grid[1] * self.patch_size)
        param = next(self.backbone.parameters())
        x = pixel_values.to(param.device, param.dtype)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear")
        tokens = self.backbone(pixel_values=x).last_hidden_state
        return tokens[:, self.n_prefix :], self.grid

    def describe(self) -> dict:
        return {
            "teacher": self.name,
            "input": "official (LLaVA pixels, position table resampled)",
            "grid": list(self.grid),
            "dim": self.dim,
        }


def teacher_pixels(images, size: int, mean, std, crop_fraction: float | None = 1.0) -> torch.Tensor:
    """(B, 3, size, size): shortest edge resized to size / crop_fraction (bicubic), centre crop
    of size x size (the geometry of CLIPImageProcessor's resize + centre crop), then (x - mean) / std.
    ``crop_fraction=None``: the whole image resized (squashed) to size x size, nothing cropped."""
    import numpy as np
    from PIL import Image

    out = []
    for im in images:
        im = im.convert("RGB")
        if crop_fraction is None:
            im = im.resize((size, size), Image.Resampling.BICUBIC)
            out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
            continue
        short = round(size / crop_fraction)
        w, h = im.size
        nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)  # as transformers does
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
    x = torch.stack(out)
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def crop_fraction(image_processor) -> float:
    """Which fraction of the resized shortest edge the LLaVA processor keeps (1.0 for LLaVA-1.5)."""
    size = getattr(image_processor, "size", None) or {}
    crop = getattr(image_processor, "crop_size", None) or {}
    short = size.get("shortest_edge") if isinstance(size, dict) else None
    keep = crop.get("height") if isinstance(crop, dict) else None
    if not getattr(image_processor, "do_center_crop", False) or not short or not keep:
        return 1.0
    return min(1.0, keep / short)


def teacher_targets_from_images(teacher, images, dst_grid: tuple[int, int], crop: float | None = 1.0) -> torch.Tensor:
    """Like ``teacher_targets`` from the original images (BackboneTeacher only); ``crop=None``: the
    whole image (squashed to the teacher's square), for blocks that see the whole image."""
    with torch.no_grad():
        feats, grid = teacher.features_from_images(images, crop)
        return resample_grid(feats.float(), grid, dst_grid)


def teacher_targets(teacher, pixel_values: torch.Tensor, src_mean, src_std, dst_grid: tuple[int, int]) -> torch.Tensor:
    """Teacher patch features resampled to the LLM's grid: (B, H*W, d_teacher), no gradient."""
    with torch.no_grad():
        feats, grid = teacher.features(pixel_values, src_mean, src_std)
        return resample_grid(feats.float(), grid, dst_grid)


def load_teacher(spec: str, model, image_size: int | None = None):
    """``self`` -> EncoderTeacher(model); a directory -> BackboneTeacher; ``none`` -> None."""
    if spec in (None, "", "none"):
        return None
    if spec == "self":
        return EncoderTeacher(model)
    return BackboneTeacher.from_pretrained(spec, image_size=image_size)
