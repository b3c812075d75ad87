"""VIRAL (visual representation alignment): a training-time regulariser for LLaVA models.

    L = L_LM + weight * L_VRA,   L_VRA = -mean_{image tokens} cos(P(h_l), y)

h_l: the language model's hidden state at the image-token positions after decoder layer
``layer`` (1-based over ``hidden_states``: hidden_states[0] is the embedding output,
hidden_states[l] the output of decoder layer l; paper default 16 of 32);
P: a small MLP d -> hidden -> hidden -> d_teacher with SiLU (``VraProjector``, 2048 wide
in the paper); y: the frozen teacher's patch features, resampled to the LLM's visual grid.

Teachers (``BackboneTeacher``, ``OfficialTeacher``, ``EncoderTeacher``) and the targets they give
are in methods/viral_teachers.py.

Grid resampling: the teacher's patch features are laid out on their 2-D grid (h, w) and
resized to the LLM's grid (H, W) by bilinear interpolation of the feature map
(``align_corners=False``, antialiased when shrinking); identical grids pass through.

Losses (``vra_loss``): ``direct`` (the cosine above) or ``similarity`` (MSE between the
token-token cosine matrices); several layers, with one shared projector or one each, average.

Samples whose image-token count differs from the grid count (e.g. a different image
layout) and text-only samples are left out of L_VRA (they still count in L_LM).

Families (their adapters' ``aligned_block``, methods/families/): how a batch becomes, per sample, the LM
positions of the aligned image tokens and their rows x cols grid (``aligned_tokens``):
- ``llava`` (LLaVA-1.5): every image token, the tower's square grid (unchanged rule: a sample
  counts when its image-token count equals the grid's);
- ``llava_next`` / ``llava_onevision``: the **base block** only (the whole image squashed to the
  tower's square input, methods/geometry.py), not the high-res tiles or the newline tokens;
- ``qwen2_5_vl``: the merged tokens, ``image_grid_thw[1:] / spatial_merge_size`` (non-square).
The teacher's features are resampled to each sample's grid. LLaVA-1.5's teacher sees the
processor's field of view (shortest edge + centre crop); the other families' aligned blocks
see the whole image (region 0..1), so their teacher sees the whole image resized to its
square input (squashed), and ``resample_grid`` maps its square grid onto rows x cols.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import families

DEFAULTS = {"layer": 16, "weight": 0.5, "proj_hidden": 2048}


class VraProjector(nn.Module):
    """P: d -> hidden -> hidden -> d_teacher, SiLU between the linear layers."""

    def __init__(self, d_model: int, d_teacher: int, hidden: int = DEFAULTS["proj_hidden"]):
        super().__init__()
        self.d_model, self.d_teacher, self.hidden = d_model, d_teacher, hidden
        self.net = nn.Sequential(
            nn.Linear(d_model, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, d_teacher)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)

    def config(self) -> dict:
        return {"d_model": self.d_model, "d_teacher": self.d_teacher, "hidden": self.hidden}


# ---------------------------------------------------------------------------------------
# Grids and targets
# ---------------------------------------------------------------------------------------


def square_grid(n_tokens: int) -> tuple[int, int]:
    """(h, w) of a square token grid; a clear error for a non-square count."""
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"{n_tokens} patch tokens do not form a square grid; pass the grid shape explicitly")
    return side, side


def resample_grid(features: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, C) patch features on grid ``src_hw`` -> (B, H*W, C) on grid ``dst_hw``.

    Bilinear on the 2-D feature map (align_corners=False), antialiased when shrinking."""
    (h, w), (H, W) = tuple(src_hw), tuple(dst_hw)
    b, n, c = features.shape
    if n != h * w:
        raise ValueError(f"features have {n} tokens, but the grid {h}x{w} has {h * w}")
    if (h, w) == (H, W):
        return features
    fmap = features.transpose(1, 2).reshape(b, c, h, w)
    out = F.interpolate(fmap.float(), size=(H, W), mode="bilinear", align_corners=False, antialias=H < h or W < w)
    return out.to(features.dtype).reshape(b, c, H * W).transpose(1, 2)


def image_token_features(hidden: torch.Tensor, input_ids: torch.Tensor, image_token_id: int, n_grid: int):
    """The hidden states of the image tokens of each sample whose count equals ``n_grid``.

    hidden: (B, L, d); returns (features (B', n_grid, d), kept sample indices (B',))."""
    is_img = input_ids == image_token_id
    counts = is_img.sum(1)
    keep = (counts == n_grid).nonzero().flatten()
    if keep.numel() == 0:
        return hidden.new_zeros(0, n_grid, hidden.shape[-1]), keep
    feats = hidden[keep][is_img[keep]].reshape(keep.numel(), n_grid, hidden.shape[-1])
    return feats, keep


LOSSES = ("direct", "similarity")


def vra_loss(
    hidden_img: torch.Tensor, target: torch.Tensor, projector: nn.Module | None, kind: str = "direct"
) -> torch.Tensor:
    """L_VRA of one aligned layer, mean over samples. hidden_img (B, N, d), target (B, N, d_teacher).

    - ``direct`` (VIRAL's default, llava_llama.py:586-590): -mean over image tokens of cos(P(h), y);
    - ``similarity`` (llava_llama.py:591-600): per sample, MSE between the N x N cosine-similarity
      (Gram) matrices of P(h) and of y; with ``projector=None`` the hidden states themselves
      (the official ``use_projector=False``).
    """
    if projector is not None:
        # the projector stays in float32 (its own master weights) when the model runs in bf16/fp16:
        # the hidden states are cast at its input, and gradients flow back through the cast
        pred = projector(hidden_img.to(next(projector.parameters()).dtype))
    else:
        pred = hidden_img
    if kind == "direct":
        return -F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()
    if kind == "similarity":
        p, y = F.normalize(pred.float(), dim=-1), F.normalize(target.float(), dim=-1)
        gram_p, gram_y = p @ p.transpose(-2, -1), y @ y.transpose(-2, -1)
        return ((gram_p - gram_y) ** 2).mean(dim=(-2, -1)).mean()
    raise ValueError(f"VRA loss {kind!r}: use one of {', '.join(LOSSES)}")


# ---------------------------------------------------------------------------------------
# Where h_l comes from: a forward hook on one decoder layer (cheaper than all hidden states)
# ---------------------------------------------------------------------------------------


def decoder_layers(model) -> nn.ModuleList:
    """The language model's decoder layers (works on a peft-wrapped model too)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.endswith("language_model.layers"):
            return mod
    raise ValueError(
        "cannot find the language model's decoder layers (expected a LLaVA model with `language_model.layers`)"
    )


def check_layer(layer: int, n_layers: int) -> None:
    if not 1 <= layer <= n_layers:
        raise ValueError(
            f"VIRAL layer={layer} is outside 1..{n_layers} (1-based over hidden_states: layer l is the output of "
            f"decoder layer l); this language model has {n_layers} layers, e.g. use layer={max(1, n_layers // 2)}"
        )


@contextlib.contextmanager
def capture_layer_output(model, layer: int):
    """Record hidden_states[layer] (the output of decoder layer ``layer``, 1-based) in ``box[0]``."""
    layers = decoder_layers(model)
    check_layer(layer, len(layers))
    box = []

    def hook(_module, _args, output):
        box[:] = [output[0] if isinstance(output, tuple) else output]

    handle = layers[layer - 1].register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


@contextlib.contextmanager
def capture_layer_outputs(model, layers):
    """Record hidden_states[l] for each l of ``layers`` (1-based) in ``box[l]``."""
    decoder = decoder_layers(model)
    box, handles = {}, []
    for layer in layers:
        check_layer(layer, len(decoder))

        def hook(_module, _args, output, layer=layer):
            box[layer] = output[0] if isinstance(output, tuple) else output

        handles.append(decoder[layer - 1].register_forward_hook(hook))
    try:
        yield box
    finally:
        for h in handles:
            h.remove()


def grid_count(model) -> int:
    """Image tokens per image in the LLM's sequence (LLaVA-1.5: (336/14)^2 = 576)."""
    vc = _config(model).vision_config
    return (vc.image_size // vc.patch_size) ** 2


# ---------------------------------------------------------------------------------------
# Families: how a batch becomes (the aligned image positions of each sample, their grid)
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Aligned:
    """The aligned image tokens of one sample: LM positions (row-major) on a rows x cols grid."""

    positions: torch.Tensor  # (rows * cols,)
    grid: tuple[int, int]
    whole_image: bool  # the block sees the whole image (teacher: squashed) vs the LLaVA-1.5 processor's crop


def family(config):
    """The family adapter (methods/families/) of a model config, for VIRAL; a clear error for anything else."""
    mt = getattr(config, "model_type", None)
    if mt not in families.ADAPTERS:
        raise ValueError(f"VIRAL supports model_type {', '.join(families.supported())}; this checkpoint is {mt!r}")
    fam = families.adapter(config)
    if fam.square_grid and getattr(config, "vision_feature_select_strategy", "default") != "default":
        raise ValueError("VIRAL needs vision_feature_select_strategy='default' (one image token per patch, no CLS)")
    return fam


def aligned_tokens(config, batch: dict, image_token_id: int | None = None, n_grid: int | None = None) -> list:
    """Per sample of ``batch``: the ``Aligned`` image tokens (positions, rows x cols grid) or None
    (no image, or LLaVA-1.5's count differs from ``n_grid``)."""
    if image_token_id is None:
        from .geometry import image_token_id as token_id

        image_token_id = token_id(config)
    fam = family(config)
    sizes, thw = batch.get("image_sizes"), batch.get("image_grid_thw")
    out, k = [], 0  # k: the image of the next sample with one (image inputs come per image, in sample order)
    for b, row in enumerate(batch["input_ids"]):
        if not bool((row == image_token_id).any()):
            out.append(None)
            continue
        size = tuple(int(v) for v in sizes[k].tolist()[::-1]) if sizes is not None else (0, 0)  # (H, W) -> (W, H)
        inputs = {"image_grid_thw": thw[k : k + 1]} if thw is not None else {}
        found = fam.aligned_block(config, batch["input_ids"][b : b + 1], image_token_id, inputs, size, n_grid)
        out.append(Aligned(*found) if found is not None else None)
        k += 1
    return out


def vra_loss_samples(feats: list, targets: list, projector, kind: str = "direct") -> torch.Tensor:
    """``vra_loss`` over samples whose grids may differ: one batched call when every grid is the same;
    otherwise per sample, ``direct`` as the mean over all image tokens, ``similarity`` over samples."""
    for f, t in zip(feats, targets):
        if f.shape[0] != t.shape[0]:
            raise ValueError(f"{f.shape[0]} aligned image tokens but {t.shape[0]} teacher targets for that sample")
    if len({f.shape for f in feats}) == 1:
        return vra_loss(torch.stack(feats), torch.stack(targets).to(feats[0].device), projector, kind)
    terms = torch.stack([vra_loss(f[None], t[None].to(f.device), projector, kind) for f, t in zip(feats, targets)])
    if kind == "direct":
        n = torch.tensor([float(f.shape[0]) for f in feats], device=terms.device)
        return (terms * n).sum() / n.sum()
    return terms.mean()


def viral_step(
    model,
    batch: dict,
    *,
    projector,
    targets,
    layer,
    weight: float,
    image_token_id: int | None = None,
    loss: str = "direct",
) -> dict:
    """One forward of L = L_LM + weight * L_VRA.

    batch: what the model takes (input_ids, attention_mask, pixel_values, labels, and the family's own
    image keys: image_sizes, image_grid_thw, mm_token_type_ids);
    targets: (B, n_grid, d_teacher) teacher features on the LLM grid for every sample of the batch, or
    a list of (rows * cols, d_teacher) per sample (None where nothing is aligned) when grids differ;
    the aligned positions and grids come from ``aligned_tokens``;
    layer: one layer or a list (1-based); projector: one module shared by the layers (the official
    default), one per layer (a list / ModuleList, the official ``use_multiple_projectors``), or None
    for ``loss="similarity"`` on the hidden states themselves. L_VRA is the mean over the layers
    (llava_llama.py:603-604). Returns {"loss", "lm_loss", "vra_loss" (None when not computed),
    "n_aligned"}.
    With weight == 0 (or no targets) the loss is exactly the LM loss.
    """
    layers = [layer] if isinstance(layer, int) else list(layer)
    use_vra = weight != 0 and targets is not None and (projector is not None or loss == "similarity")
    if not use_vra:
        out = model(**batch)
        return {"loss": out.loss, "lm_loss": out.loss, "vra_loss": None, "n_aligned": 0}
    projectors = list(projector) if isinstance(projector, (list, tuple, nn.ModuleList)) else [projector] * len(layers)
    if len(projectors) != len(layers):
        raise ValueError(f"{len(projectors)} projectors for {len(layers)} target layers")
    with capture_layer_outputs(model, layers) as box:
        out = model(**batch)
    aligned = aligned_tokens(
        _config(model), batch, image_token_id, targets.shape[1] if torch.is_tensor(targets) else None
    )
    keep = [b for b, a in enumerate(aligned) if a is not None and targets[b] is not None]
    if not keep:  # nothing to align in this batch
        return {"loss": out.loss, "lm_loss": out.loss, "vra_loss": None, "n_aligned": 0}
    terms = []
    for l, proj in zip(layers, projectors):
        hidden = box[l]
        feats = [hidden[b, aligned[b].positions.to(hidden.device)] for b in keep]
        terms.append(vra_loss_samples(feats, [targets[b] for b in keep], proj, loss))
    l_vra = torch.stack(terms).mean()
    return {"loss": out.loss + weight * l_vra, "lm_loss": out.loss, "vra_loss": l_vra, "n_aligned": len(keep)}


def _config(model):
    return model.config  # a peft-wrapped model forwards .config to the LLaVA model


def llm_grid(model) -> tuple[int, int]:
    vc = _config(model).vision_config
    side = vc.image_size // vc.patch_size
    return side, side


# ---------------------------------------------------------------------------------------
# Evaluation: the trained adapter merged into the base model
# ---------------------------------------------------------------------------------------


def adapter_dir(path) -> Path:
    """A viral-train output directory (its ``adapter/``) or a peft adapter directory itself."""
    p = Path(path)
    for cand in (p / "adapter", p):
        if (cand / "adapter_config.json").exists():
            return cand
    raise FileNotFoundError(
        f"adapter={path}: no adapter_config.json there or in {p / 'adapter'}; pass the --output-dir of "
        "`lmms-plugins viral-train` (or a peft LoRA adapter directory)"
    )


def merge_adapter(model, path) -> dict:
    """Merge a peft LoRA adapter into ``model`` in place (weights W + B A * alpha/r); returns its config."""
    from peft import PeftModel

    folder = adapter_dir(path)
    peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    merged = peft_model.merge_and_unload()
    if merged is not model:  # peft edits the modules of `model` itself; make sure the caller's object is the merged one
        raise RuntimeError("peft returned a new model object when merging; cannot merge in place")
    return json.loads((folder / "adapter_config.json").read_text())
