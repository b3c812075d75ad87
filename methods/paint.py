"""PAINT ("Paying Attention to INformed Tokens", a.k.a. fixing imbalanced attention).

Instead of boosting every image token like PAI, PAINT boosts chosen ones, with a margin
per kind of token: local, summary and (optional) spatial tokens, chosen from the vision
tower's attention (methods/paint_selection.py, where each kind is defined).

On the query rows that predict answer tokens, pre-softmax, in language-model layers
[start, end): a += alpha*|a| on local and spatial tokens, a += beta*|a| on summary tokens.
With image-free guidance (``use_cfg``, shared with PAI: ``GuidedTechnique``) the first
answer token is guided but not boosted, as in the official code.

Head-specific modulation (``head_modulation="sensitivity"``; described in the paper, absent
from its code): per layer, per query row, each head's visual sensitivity s_h is its own
attention mass on the image tokens before the edit (softmax over the full row). Its margin
is scaled by w_h = min(s_h / mean_h(s_h), max_head_scale): heads that already read the
image are boosted more, heads that look at text (whose attention to the image is mostly
noise) are left nearly alone; dividing by the mean keeps the layer's average margin at
alpha/beta, so the option redistributes the boost rather than strengthening it, and the cap
keeps one dominant head from receiving H times the margin.

Selection happens inside the same forward as the edit: the vision tower runs before the
language model in LlavaForConditionalGeneration, so a vision-tower ``Capture`` records the
CLS rows, and the language-model edit (``PaintBoost``) resolves its per-token margins
lazily from that capture the first time a language-model layer runs. No second pass of the
vision tower, no ``output_attentions``.

A CLS-free candidate (``selection_source="received"``; ours, not in the paper or its code) was
measured as a substitute for towers without CLS (methods/paint_selection.py): it does not
reproduce the CLS selection, so the towers without CLS stay refused (``REFUSED``).

Parity with the official code (hasanar1f/PAINT @ 2a9e8f8, ``modPAI/``): each step below
cites the official file:line it reproduces; docs/paint.md has the table.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from . import families, hooks
from .pai import GuidedTechnique
from .paint_selection import TokenSelection, TokenSelector, official_spatial_count
from .technique import Request, RequestError, layer_range

# What the CLS-free candidate (selection_source=received) measured against the CLS selection on
# the two CLIP towers with CLS (docs/paint.md, `lmms-plugins paint-selection --compare --limit 150`).
NO_CLS_MEASURED = (
    "no substitute is validated: the CLS-free candidate (the attention each patch receives from the other "
    "patches, selection_source=received) does not reproduce the CLS selection where CLS exists: local tokens "
    "Jaccard 0.09 and 0.10 vs chance 0.11 and 0.13, Spearman -0.09 and -0.20 (shapeworld-tiny; the "
    "LLaVA-1.5-shaped tiny CLIP), summary tokens only partly (Jaccard 0.42 and 0.31); see docs/paint.md"
)
# Why PAINT refuses the families whose tower has no CLS token (their adapters say so; README support matrix).
REFUSED = {
    model_type: f"its {family.vision_tower} has no CLS token, and PAINT's local/summary selection is CLS attention "
    f"(clip_encoder.py); {NO_CLS_MEASURED}"
    for model_type, family in families.ADAPTERS.items()
    if not family.vision_cls
}
# Towers with CLS whose image tokens each merge several patches (InternVL's pixel shuffle): the CLS
# attention ranks patches, but PAINT edits tokens one for one; a pooled selection is not validated.
REFUSED.update(
    {
        model_type: f"its image tokens each merge {family.patches_per_token} patches of its {family.vision_tower} "
        "(pixel shuffle), while PAINT's local/summary selection ranks single patches by CLS attention and edits the "
        "image token of each selected patch (clip_encoder.py); a selection pooled over each token's patches is a "
        "different method, not validated"
        for model_type, family in families.ADAPTERS.items()
        if family.vision_cls and family.patches_per_token > 1
    }
)
SELECTION_SOURCES = ("cls", "received")

DEFAULTS = {
    "alpha": 0.7,
    "beta": 0.4,
    "top_ratio": 0.25,
    "spatial_ratio": 0.0,
    "local_layer": 0,
    "summary_layer": -2,
    "spatial": "grid",
    "selection_precision": "float32",
    "selection_source": "cls",
    "head_modulation": "none",
    "max_head_scale": 2.0,
    "start_layer": 2,
    "end_layer": None,
    "use_cfg": False,
    "gamma": 1.1,
    "cutoff": 0.1,
    "boost_first_step": False,
    "official_quirks": False,
}
HEAD_MODULATIONS = ("none", "sensitivity")
SPATIAL_VARIANTS = ("grid", "official")
# "float32": select from float32 attention; "model": round it to the vision tower's dtype
# first and sum in that dtype, as the official code does (fp16 in its scripts); "float16": round to
# fp16 and sum in fp16 whatever the model's dtype (the official fp16 runs' selection on any model).
SELECTION_PRECISIONS = ("float32", "model", "float16")


# ---------------------------------------------------------------------------------------
# Margins and the boost (the selection itself: methods/paint_selection.py)
# ---------------------------------------------------------------------------------------


def token_margins(sel: TokenSelection, alpha: float, beta: float) -> torch.Tensor:
    """(batch, N) margin per patch: alpha on local and spatial tokens, beta on summary tokens, 0 elsewhere."""
    out = torch.zeros(sel.local.shape, dtype=torch.float32, device=sel.local.device)
    out[sel.local | sel.spatial] = alpha
    out[sel.summary] = beta
    return out


def head_sensitivity_weights(image_mass: torch.Tensor, max_scale: float) -> torch.Tensor:
    """w_h = min(s_h / mean_h s_h, max_scale) for image_mass s of shape (batch, heads, rows)."""
    mean = image_mass.mean(dim=1, keepdim=True).clamp_min(torch.finfo(image_mass.dtype).tiny)
    return (image_mass / mean).clamp(max=max_scale)


def boost_scores(scores: torch.Tensor, margins: torch.Tensor, head_weights: torch.Tensor | None = None) -> torch.Tensor:
    """a + c * |a| with c = margin[key] (x head weight[head, row]).

    scores: (batch, heads, rows, keys); margins: (batch, keys); head_weights: (batch, heads, rows) or None.
    """
    c = margins[:, None, None, :].to(scores.dtype)
    if head_weights is not None:
        c = c * head_weights[..., None].to(scores.dtype)
    return scores + c * scores.abs()


# ---------------------------------------------------------------------------------------
# The hook-layer edit: a language-model boost resolved lazily from the vision-tower capture
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class PaintBoost(hooks.AttnEdit):
    """a + c*|a| on the image tokens, c = the selection's per-token margin (x per-head weight).

    Official: ``a.abs() * alpha + a`` on the last query row of every forward (the last prompt
    token in the prefill, the new token in each decode step), local tokens then summary
    tokens, after the causal mask, pre-softmax, in layers [start, end) (attention.py:134-147,
    :189); patch i is position ``img_start_idx + i`` (attention.py:135). Ours edits the same
    rows in generation (``Request.answer_rows``) and every answer row of a loglikelihood
    forward, which is what step-by-step decoding would do.

    ``image_keys``: absolute positions of the edited keys: the image tokens (plus the token
    after them with the official spatial variant); patch i of the vision tower is key
    ``i + patch_offset`` (0 for LLaVA's "default" feature strategy, which drops CLS; 1 for
    "full"). With head modulation the edit spans the full row (``keys`` = all), to measure
    each head's attention mass on the image before editing.
    """

    selector: TokenSelector | None = None
    image_keys: torch.Tensor | None = None
    patch_offset: int = 0
    alpha: float = 0.7
    beta: float = 0.4
    head_modulation: str = "none"
    max_head_scale: float = 2.0
    changes_scores = True

    # In a batch (``place``) the keys shift by the request's padding; ``image_keys`` index the edited site's
    # columns, which start at the request's first token either way, so they stay as built.

    def margins(self) -> torch.Tensor:
        """(batch, image tokens) margins of the current selection (computed once per selection)."""
        sel = self.selector.current()
        cached = self.__dict__.get("_margins")
        if cached is None or cached[0] is not sel:
            m = token_margins(sel, self.alpha, self.beta)
            cached = (sel, torch.nn.functional.pad(m, (self.patch_offset, 0)))  # "full" strategy: CLS is token 0
            self.__dict__["_margins"] = cached
        return cached[1]

    def edit_scores(self, scores, layer):
        margins = self.margins().to(scores.device)
        if margins.shape[0] != scores.shape[0]:
            raise RequestError(
                f"PAINT: {margins.shape[0]} images for a batch of {scores.shape[0]} prompts; one image per prompt"
            )
        if self.head_modulation == "none":
            return boost_scores(scores, margins)
        img = self.image_keys.to(scores.device)
        probs = torch.softmax(scores.float(), dim=-1)
        weights = head_sensitivity_weights(probs[..., img].sum(-1), self.max_head_scale)
        out = scores.clone()
        out[..., img] = boost_scores(scores[..., img], margins, weights)
        return out

    def describe(self):
        d = super().describe()
        d.pop("selector", None)
        d.pop("image_keys", None)
        return d


# ---------------------------------------------------------------------------------------
# The technique
# ---------------------------------------------------------------------------------------


def image_geometry(model) -> tuple[tuple[int, int], int]:
    """(grid, patch_offset) of a LLaVA model: the vision tower's patch grid, and where patch 0
    lands among the image tokens (LLaVA's "default" strategy drops CLS: offset 0)."""
    vc = model.config.vision_config
    side = vc.image_size // vc.patch_size
    strategy = getattr(model.config, "vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"PAINT: vision_feature_select_strategy={strategy!r} is not supported (default or full)")
    return (side, side), 0 if strategy == "default" else 1


class Paint(GuidedTechnique):
    name = "paint"

    def __init__(
        self,
        n_layers: int,
        n_vision_layers: int,
        grid: tuple[int, int],
        patch_offset: int = 0,
        vision_dtype: torch.dtype = torch.float32,
        **params,
    ):
        save_dir = params.pop("save_visuals", "") or ""
        max_visuals = params.pop("max_visuals", 8)
        super().__init__(**{**DEFAULTS, **params})
        p = self.params
        if p["head_modulation"] not in HEAD_MODULATIONS:
            raise ValueError(
                f"paint: head_modulation={p['head_modulation']!r}; use one of {', '.join(HEAD_MODULATIONS)}"
            )
        if p["spatial"] not in SPATIAL_VARIANTS:
            raise ValueError(f"paint: spatial={p['spatial']!r}; use one of {', '.join(SPATIAL_VARIANTS)}")
        if p["selection_source"] not in SELECTION_SOURCES:
            raise ValueError(
                f"paint: selection_source={p['selection_source']!r}; use one of {', '.join(SELECTION_SOURCES)}"
            )
        if p["selection_source"] == "received" and p["spatial"] == "official" and p["spatial_ratio"] > 0:
            raise ValueError(
                "paint: spatial=official reads the local layer's full attention rows including CLS; "
                "with selection_source=received use spatial=grid"
            )
        if p["selection_precision"] not in SELECTION_PRECISIONS:
            raise ValueError(
                f"paint: selection_precision={p['selection_precision']!r}; use one of {', '.join(SELECTION_PRECISIONS)}"
            )
        if not 0 < p["top_ratio"] <= 1 or not 0 <= p["spatial_ratio"] <= 1:
            raise ValueError("paint: top_ratio must be in (0, 1] and spatial_ratio in [0, 1]")
        self.selection_dtype = {"model": vision_dtype, "float16": torch.float16}.get(
            p["selection_precision"], torch.float32
        )
        self.layers = layer_range(p["start_layer"], p["end_layer"], n_layers, default_start=2, name=self.name)
        self.vision_layers = tuple(
            self._vision_layer(p[k], n_vision_layers, k) for k in ("local_layer", "summary_layer")
        )
        self.grid, self.patch_offset = tuple(grid), patch_offset
        self.save_dir, self.max_visuals, self.saved = save_dir, max_visuals, 0
        self.last_selector: TokenSelector | None = None

    @staticmethod
    def _vision_layer(layer: int, n: int, name: str) -> int:
        idx = layer + n if layer < 0 else layer
        if not 0 <= idx < n:
            raise ValueError(
                f"paint: {name}={layer} is outside the vision tower's {n} layers; use 0..{n - 1} or -{n}..-1"
            )
        return idx

    @classmethod
    def for_model(cls, model, **params) -> Paint:
        grid, offset = image_geometry(model)
        vision_dtype = next(hooks.attention_modules(model)["vision"][0].parameters()).dtype
        return cls(
            hooks.num_layers(model, "lm"), hooks.num_layers(model, "vision"), grid, offset, vision_dtype, **params
        )

    def batch_refusal(self, family=None) -> str | None:
        if self.save_dir:
            return "save_visuals draws one request's selection at a time; drop save_visuals or use batch_size=1"
        if family is not None and not family.crops_as_tower_rows:
            return (
                f"its selection reads the CLS attention of the image's crop in the vision tower's batch, and "
                f"{family.display_name}'s tower does not run each image as rows of its batch"
            )
        # each request's captures sit on its own image's tower rows (Batch.vision_rows), as alone: its selection
        # reads the same crop (LLaVA-1.5: the only one; NeXT: the base crop, ``cls_crop``)
        return None

    def recipe(self, model, req: Request):
        p = self.params
        rows = self.boost_rows(req)  # with CFG the first answer token is not boosted (GuidedTechnique)
        editing = (p["alpha"] != 0 or p["beta"] != 0) and rows is not None
        self.last_selector = None
        if not editing and not self.save_dir:
            return []  # nothing to edit: stay on the fast path, bit-identical to the baseline
        first, crop = self._base_block(req)
        selector = TokenSelector(
            *self.vision_layers,
            self.grid,
            p["top_ratio"],
            p["spatial_ratio"],
            p["spatial"],
            self.selection_dtype,
            source=p["selection_source"],
        )
        selector.crop = crop
        self.last_selector = selector
        if not editing:
            return selector.captures  # observation only: outputs stay the baseline's
        keys = torch.arange(first, first + self.patch_offset + selector.width)
        if int(keys[-1]) >= req.input_ids.shape[1]:
            raise RequestError(
                "paint: spatial=official boosts the token after the image, but the prompt ends with the image"
            )
        sensitivity = p["head_modulation"] == "sensitivity"
        boost = PaintBoost(
            layers=self.layers,
            rows=rows,
            keys=slice(None) if sensitivity else keys,
            selector=selector,
            image_keys=keys,
            patch_offset=self.patch_offset,
            alpha=p["alpha"],
            beta=p["beta"],
            head_modulation=p["head_modulation"],
            max_head_scale=p["max_head_scale"],
        )
        return [*selector.captures, boost]

    def _base_block(self, req: Request) -> tuple[int, int | None]:
        """(position of the first edited image token, the vision-tower crop the CLS attention comes from).

        LLaVA-1.5: the image's single grid, the tower's only crop. LLaVA-NeXT (anyres): the base
        block and crop 0, the whole image at the tower's resolution, where CLS attention means
        what it means for LLaVA-1.5; the high-res tiles' tokens are left unedited (each tile's CLS
        only sees its tile: a selection per tile would be a different method)."""
        n_patches = self.grid[0] * self.grid[1]
        if req.config is not None and not req.adapter.vision_cls:
            raise RequestError(f"paint does not support {req.family}: {REFUSED[req.family]}")
        if req.config is not None and not req.adapter.square_grid:
            if self.params["spatial"] == "official" and official_spatial_count(self.grid, self.params["spatial_ratio"]):
                raise RequestError(
                    "paint: spatial=official boosts the token after the image grid, which on "
                    f"{req.family} is a high-res token; use spatial=grid"
                )
            base = req.geometry.base
            if base.rows * base.cols != n_patches:
                raise RequestError(
                    f"paint: the base block is {base.rows}x{base.cols} but the vision tower gives {self.grid}"
                )
            return int(base.positions[0]), req.adapter.cls_crop
        n_img = req.image_pos.numel()
        if n_img != n_patches + self.patch_offset:
            raise RequestError(
                f"paint: the prompt has {n_img} image tokens but the vision tower gives {n_patches} patches "
                f"(+{self.patch_offset}); only single-crop LLaVA-1.5-style models are supported"
            )
        return int(req.image_pos[0]), None

    def generate(self, model, req: Request, **kwargs):
        out = super().generate(model, req, **kwargs)
        self._save_visual(req)
        return out

    def forward(self, model, req: Request, **kwargs):
        out = super().forward(model, req, **kwargs)
        self._save_visual(req)
        return out

    def _save_visual(self, req: Request) -> None:
        if not self.save_dir or self.saved >= self.max_visuals or self.last_selector is None:
            return
        sel = self.last_selector.current()
        image = model_view(req.images[0], getattr(req.processor, "image_processor", None))
        out = Path(self.save_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"paint_{self.saved:04d}"
        draw_selection(image, sel).save(stem.with_suffix(".png"))
        tokens = {k: getattr(sel, k)[0].nonzero().flatten().tolist() for k in COLORS}
        stem.with_suffix(".json").write_text(json.dumps({"grid": sel.grid, "prompt": req.text, **tokens}))
        self.saved += 1

    def describe(self):
        return {
            **super().describe(),
            "layers": f"{self.layers.start}..{self.layers.stop - 1}",
            "vision_layers": {"local": self.vision_layers[0], "summary": self.vision_layers[1]},
            "grid": self.grid,
        }


# ---------------------------------------------------------------------------------------
# Saved visuals
# ---------------------------------------------------------------------------------------

COLORS = {"local": (255, 200, 0), "summary": (40, 110, 240), "spatial": (40, 200, 90)}


def model_view(image, image_processor=None):
    """The part of the original image the model sees: CLIP-style resize of the shortest edge
    then centre crop (the whole image when the processor does not crop)."""
    image = image.convert("RGB")
    crop = getattr(image_processor, "crop_size", None) if image_processor is not None else None
    size = getattr(image_processor, "size", None) if image_processor is not None else None
    if not getattr(image_processor, "do_center_crop", False) or not crop or not size or "shortest_edge" not in size:
        return image
    w, h = image.size
    scale = size["shortest_edge"] / min(w, h)
    cw, ch = min(w, crop["width"] / scale), min(h, crop["height"] / scale)
    left, top = (w - cw) / 2, (h - ch) / 2
    return image.crop((round(left), round(top), round(left + cw), round(top + ch)))


def draw_selection(image, sel: TokenSelection, item: int = 0, size: int = 336):
    """The image with its local (yellow), summary (blue) and spatial (green) patches shaded."""
    from PIL import Image, ImageDraw

    base = image.convert("RGBA").resize((size, size))
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    gh, gw = sel.grid
    for kind, color in COLORS.items():
        for idx in getattr(sel, kind)[item].nonzero().flatten().tolist():
            if idx >= gh * gw:
                continue  # the official spatial variant's slot after the image: not a patch
            r, c = divmod(idx, gw)
            box = (c * size / gw, r * size / gh, (c + 1) * size / gw - 1, (r + 1) * size / gh - 1)
            draw.rectangle(box, fill=(*color, 90), outline=(*color, 255), width=2)
    return Image.alpha_composite(base, overlay).convert("RGB")
