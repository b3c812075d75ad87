"""Localization heads: training-free visual grounding from a few attention heads.

Kang et al., "Your Large Vision-Language Model Only Needs A Few Attention Heads For
Visual Grounding" (CVPR 2025). The last prompt token's attention over the image grid,
read from a handful of language-model heads, already points at the referred object.

Head discovery (per sample, over a grounding train split):
1. one prefill; for every (layer, head) the last prompt token's attention over the
   image tokens (a map over the patch grid) and its sum S_img;
2. keep the heads whose S_img lies above the knee of the descending S_img curve (the
   point with the largest distance to the chord joining the curve's ends);
3. of those, the ``per_sample`` (10) heads with the lowest spatial entropy: the map is
   thresholded at its mean, split into connected components, and the entropy of the
   components' shares is taken. The share of a component is its attention mass (not its
   cell count): a large faint blob and a small sharp one are told apart by what the head
   actually attends to;
then heads are ranked by how often they are selected over all samples.

Grounding (per request, one prefill, no decoding): the top-k heads' maps are smoothed
(Gaussian, sigma 1), summed, the cells above the mean kept, and the box of the largest
connected component (or the min/max box of all kept cells) is mapped back through the
processor's geometry (pad-to-square or resize+center-crop) to the original image and
written as ``[x1, y1, x2, y2]`` in 0..1, the format lmms-eval's ``refcoco*_bbox_rec``
tasks parse.

The official code's rules (seilk/LocalizationHeads @ 8ce33b0 and the authors' 9ffe219 rewrite)
differ in the prompt, the entropy, the elbow, the filters and the box; they are one function per
official step (``official_*``, ``rank_heads_official*``), selected by ``selection``, ``prompt``,
``box_scaling`` and ``heads="self"``, and compared with golden fixtures of the official code
(tests/test_parity_lochead.py, docs/lochead.md): 8 fp32 samples of a tiny random model; elbows, 9ffe219's
top-5, masks and boxes equal; head rankings equal only outside near-ties (heads whose official entropies
lie within 2e-5 sort by the CPU's last bits and may come in either order) and apart from up to 8 heads
whose entropy flips with capture noise; 9ffe219's kept set equal up to 2 heads.

This module is the technique (``LocHead``) and its answer text; the maps and their arithmetic are in
methods/lochead_maps.py, the official steps in methods/lochead_official.py, heads files and discovery
in methods/lochead_heads.py.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Sequence

import torch

from . import hooks
from .geometry import ProcessorGeometry, processor_geometry
from .lochead_maps import BOX_MODES, box_from_grid, capture_batch_maps, combine_head_maps, image_grid
from .lochead_official import SELECTIONS, official_box_grid, official_prompt_ids, official_query, select_heads
from .technique import Batch, Request, RequestError, Technique

DEFAULTS = {
    "top_k": 3,
    "sigma": 1.0,
    "box_mode": "component",
    "connectivity": 8,
    "decimals": 2,
    "selection": "ours",
    "box_scaling": "geometry",
    "prompt": "task",
    "block": "base",
    "precision": "fp32",  # fp32 | official: selection=official/official_v2 in fp16, as the official runs
}
PRECISIONS = ("fp32", "official")
BLOCKS = ("base", "highres")  # anyres (LLaVA-NeXT/OneVision): which block's grid the maps and box come from
# undo the processor's pad/resize/crop | 9ffe219's stretch of the grid onto W x H
BOX_SCALINGS = ("geometry", "stretch")
PROMPTS = ("task", "official")  # the lmms-eval task's prompt | the official referseg prompt (official_prompt_ids)

# ---------------------------------------------------------------------------------------
# The answer: the box as text
# ---------------------------------------------------------------------------------------


def format_box(box: Sequence[float], decimals: int = 2) -> str:
    """``[x1, y1, x2, y2]`` as LLaVA-1.5 writes it and lmms-eval's REC parser reads it."""
    return "[" + ", ".join(f"{v:.{decimals}f}" for v in box) + "]"


class AnswerEncodingError(RequestError):
    """The checkpoint's tokenizer cannot write the box text so that it decodes back unchanged."""


# The box format lmms-eval's refcoco*_bbox_rec tasks read: the first "[a, b, c, d]" of four numbers.
REC_BOX_PATTERN = re.compile(
    r"\[\s*(-?\d+(?:\.\d+)?),\s*(-?\d+(?:\.\d+)?),\s*(-?\d+(?:\.\d+)?),\s*(-?\d+(?:\.\d+)?)\s*\]"
)


def parse_box(text: str) -> list[float] | None:
    m = REC_BOX_PATTERN.search(text)
    return [float(g) for g in m.groups()] if m else None


def answer_ids(tokenizer, text: str) -> list[int]:
    """Token ids whose decoding (skip_special_tokens, as lmms-eval's llava_hf does) is ``text``,
    or reads as the same box in the REC format (a word-level tokenizer may decode
    "[0.12, 0.34, 0.56, 0.78]" as "[ 0.12, 0.34, 0.56, 0.78 ]", which parses the same)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    back = tokenizer.decode(ids, skip_special_tokens=True).strip()
    if back != text and (parse_box(back) is None or parse_box(back) != parse_box(text)):
        raise AnswerEncodingError(
            f"this checkpoint's tokenizer cannot write the box {text!r}: it decodes back as {back!r}, which "
            "lmms-eval's REC parser does not read as the same box. llava_lochead answers through the tokenizer, "
            "as llava_hf's decoding does, so the tokenizer must represent the digits, '.', ',' and brackets of the "
            "box (LLaMA/SentencePiece and byte-level BPE tokenizers do; shapeworld-tiny's has number tokens)"
        )
    return ids


# ---------------------------------------------------------------------------------------
# The technique
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Located:
    """One request's grounding: the box in original-image fractions and what produced it."""

    box: list
    box_processed: list
    heads: list
    head_maps: torch.Tensor  # (k, h, w)
    combined: torch.Tensor  # (h, w)
    geometry: ProcessorGeometry | None
    mask: torch.Tensor | None = None  # optional SAM mask (original image size)
    image: object = None  # the original image (without the pad_to_square canvas)


def original_image(req: Request):
    """The request's first image as the user gave it: pad_to_square's canvas cropped away."""
    if not req.images:
        return None
    if not req.pads:
        return req.images[0]
    pad = req.pads[0]
    ox, oy = pad.offset
    return req.images[0].crop((ox, oy, ox + pad.orig_w, oy + pad.orig_h))


class LocHead(Technique):
    """Grounding from localization heads: one prefill, no decoding; the answer is the box text.

    heads: ranked (layer, head) list; top_k of them are used. ``heads="all"`` averages every
    head of every layer (the all-heads baseline).
    """

    name = "lochead"

    def __init__(self, heads, **params):
        super().__init__(**{**DEFAULTS, **params})
        p = self.params
        for key, allowed in (
            ("box_mode", BOX_MODES),
            ("selection", SELECTIONS),
            ("box_scaling", BOX_SCALINGS),
            ("prompt", PROMPTS),
            ("precision", PRECISIONS),
        ):
            if p[key] not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, not {p[key]!r}")
        if heads in ("all", "self"):
            self.heads = heads
        else:
            heads = [tuple(map(int, h)) for h in heads]
            if not heads:
                raise ValueError("lochead needs at least one (layer, head)")
            self.heads = heads[: p["top_k"]]
        self.on_located = None  # optional callback(req, located) for saved visuals
        self.refiner = None  # optional SamRefiner
        # optional callback(processor) -> ranked heads, run at the first request (heads=auto off LLaVA-1.5)
        self.pending = None

    def _resolve_pending(self, req: Request) -> None:
        """heads=auto discovered with the processor evaluation uses (its min/max pixels), at the first request."""
        if self.pending is not None:
            heads, self.pending = self.pending(req.processor), None
            self.heads = [tuple(map(int, h)) for h in heads][: self.params["top_k"]]

    def describe(self):
        heads = self.heads if isinstance(self.heads, str) else [f"L{l}H{h}" for l, h in self.heads]
        if self.pending is not None:
            heads = "auto: discovered at the first request, with the evaluation's processor"
        return {**super().describe(), "heads_used": heads}

    def batch_refusal(self, family=None) -> str | None:
        if self.params["prompt"] != "task":
            return f"prompt={self.params['prompt']} builds its own prompt per request (not the batch's padded one)"
        return None  # one prefill: each request's capture placed in its row, its box from its own maps

    def locate(self, model, req: Request, **kwargs) -> Located:
        req.require_one_image(self.name)
        self._resolve_pending(req)
        inputs = self.prompt_inputs(req, kwargs)
        pos, grid, block = self.image_block(model, req, inputs["input_ids"])
        maps = capture_batch_maps(model, inputs, [pos], self.capture_layers())[0]
        return self.locate_from(req, maps, grid, block)

    def locate_batch(self, model, batch: Batch, **kwargs) -> list[Located]:
        """``locate`` for every request of a left-padded batch, from one prefill (each request's capture placed in
        its row; its box from its own maps, as alone)."""
        self.check_batch(batch)
        batch.require_one_image(self.name)
        self._resolve_pending(batch.requests[0])
        blocks = [self.image_block(model, r, r.input_ids) for r in batch.requests]
        inputs = {**kwargs, "input_ids": batch.input_ids}
        maps = capture_batch_maps(model, inputs, [b[0] for b in blocks], self.capture_layers(), batch.offsets)
        return [self.locate_from(r, m, b[1], b[2]) for r, m, b in zip(batch.requests, maps, blocks)]

    def image_block(self, model, req: Request, input_ids: torch.Tensor):
        """(image positions in ``input_ids``, their (rows, cols) grid, the geometry block or None for LLaVA-1.5)."""
        block = self.anyres_block(req)
        if block is None:  # LLaVA-1.5: the single square grid
            pos = hooks.image_positions(input_ids, req.image_token_id)
            return pos, image_grid(model, pos.numel()), None
        return block.positions.to(input_ids.device), block.grid_hw, block

    def capture_layers(self):
        """The LM layers whose maps are read: every layer for heads=all/self, else those of the chosen heads."""
        return None if self.heads in ("all", "self") else sorted({l for l, _ in self.heads})

    def locate_from(self, req: Request, maps: torch.Tensor, grid, block) -> Located:
        """The box of one request from its captured maps ((layers, heads, image tokens); ``capture_layers``)."""
        if self.heads == "all":
            heads = "all"
            flat = maps.flatten(0, 1)
        elif self.heads == "self":  # this request's own best heads (9ffe219 pipeline.py:57-70)
            heads = select_heads(
                maps,
                grid,
                self.params["selection"],
                self.params["top_k"],
                self.params["connectivity"],
                self.params["precision"] == "official",
            )
            flat = torch.stack([maps[l, h] for l, h in heads])
        else:
            row = {l: i for i, l in enumerate(self.capture_layers())}
            flat = torch.stack([maps[row[l], h] for l, h in self.heads])
            heads = list(self.heads)
        gh, gw = grid
        head_maps = flat.reshape(-1, gh, gw)
        combined = combine_head_maps(head_maps, self.params["sigma"])
        box_p = box_from_grid(combined, self.params["box_mode"], self.params["connectivity"])
        geometry = None
        if (
            self.params["box_scaling"] == "stretch"
        ):  # 9ffe219 bbox.py:148-181: grid cells onto W x H, padding not undone
            x0, y0, x1, y1 = official_box_grid(combined)
            box_p = [x0 / gw, y0 / gh, (x1 + 1) / gw, (y1 + 1) / gh]
            box = list(box_p)
        elif block is not None:  # the block's region of the image (undoes the anyres squash / tiling and padding)
            box = [min(1.0, max(0.0, v)) for v in block.to_image(box_p)]
            if req.pads:
                box = req.pads[0].to_original(box)
        elif req.images and req.processor is not None:
            ip = getattr(req.processor, "image_processor", req.processor)
            geometry = processor_geometry(ip, req.images[0].size)
            if req.pads:  # pad_to_square: the processor saw the square; map through the pad too
                geometry = geometry.after_pad(req.pads[0])
            box = geometry.to_original(box_p)
        else:
            box = list(box_p)
        located = Located(box, box_p, heads, head_maps, combined, geometry, image=original_image(req))
        if self.refiner is not None and req.images:
            peak = int(torch.argmax(combined))
            cell = [(peak % gw + 0.5) / gw, (peak // gw + 0.5) / gh]
            point = (geometry.to_original(cell * 2) if geometry else cell * 2)[:2]
            located.mask, mask_box = self.refiner(located.image, box, point)
            if self.refiner.use_box and mask_box is not None:
                located.box = mask_box
        if self.on_located is not None:
            self.on_located(req, located)
        return located

    def anyres_block(self, req: Request):
        """The geometry block the maps are read from (None: LLaVA-1.5's single square grid, read from the tokens)."""
        if req.config is None or req.adapter.square_grid:
            return None
        if self.params["prompt"] != "task":
            raise RequestError(
                f"lochead: prompt={self.params['prompt']} is LLaVA-1.5 only; use prompt=task on {req.family}"
            )
        block = req.geometry.block(self.params.get("block", "base"))
        if block.rows * block.cols == 0:
            raise RequestError(
                f"lochead: the {block.name} block of this {req.images[0].size} image is empty; use block=base"
            )
        return block

    def prompt_inputs(self, req: Request, kwargs: dict) -> dict:
        """The forward's inputs: the request's own, or (prompt=official) the official prompt's ids around the same image."""
        if self.params["prompt"] == "task":
            return {**kwargs, "input_ids": req.input_ids}
        tokenizer = getattr(req.processor, "tokenizer", req.processor)
        token = getattr(req.processor, "image_token", "<image>")
        ids = official_prompt_ids(tokenizer, official_query(req.text, token), req.image_token_id, req.image_pos.numel())
        input_ids = torch.tensor([ids], dtype=req.input_ids.dtype, device=req.input_ids.device)
        return {**kwargs, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def answer_text(self, located: Located) -> str:
        return format_box(located.box, self.params["decimals"])

    def generate(self, model, req: Request | Batch, **kwargs):
        """Prompt ids + the ids of the box text (what llava_hf decodes after the prompt); for a batch, each row's
        box text after the padded prompts, the shorter ones followed by end-of-sequence tokens (skipped when
        decoded, as generate pads a finished row)."""
        requests = req.requests if isinstance(req, Batch) else [req]
        located = (
            self.locate_batch(model, req, **kwargs) if isinstance(req, Batch) else [self.locate(model, req, **kwargs)]
        )
        tokenizer = getattr(requests[0].processor, "tokenizer", requests[0].processor)
        eos = getattr(tokenizer, "eos_token_id", None)
        tails = [answer_ids(tokenizer, self.answer_text(loc)) + ([eos] if eos is not None else []) for loc in located]
        width = max(len(t) for t in tails)
        fill = kwargs.get("pad_token_id", eos)
        if len(tails) > 1 and fill is None:
            raise RequestError("lochead: a batch's shorter answers need an end-of-sequence or pad token")
        rows = [t + [fill] * (width - len(t)) for t in tails]
        tail = torch.tensor(rows, dtype=req.input_ids.dtype, device=req.input_ids.device)
        return torch.cat([req.input_ids, tail], dim=1)

    def forward(self, model, req: Request, **kwargs):
        raise RequestError(
            "llava_lochead answers grounding (generate_until) tasks with a box; it has no loglikelihood. "
            "Use llava_hf for multiple-choice/loglikelihood tasks"
        )


class SamRefiner:
    """Optional masks: a local SAM checkpoint (transformers ``SamModel``) prompted with the
    box and the peak point of the combined map. Never downloads: the path must be a local directory."""

    def __init__(self, path, use_box: bool = False):
        from transformers import SamModel, SamProcessor

        if not Path(path).is_dir():
            raise FileNotFoundError(
                f"sam={path} is not a local directory with a transformers SamModel checkpoint (SAM is optional; leave sam empty to skip masks)"
            )
        self.model = SamModel.from_pretrained(path, local_files_only=True).eval()
        self.processor = SamProcessor.from_pretrained(path, local_files_only=True)
        self.use_box = use_box

    @torch.no_grad()
    def __call__(self, image, box, point):
        """(mask (h, w) bool of the original image, its box in fractions or None if empty)."""
        w, h = image.size
        inputs = self.processor(
            images=image,
            input_boxes=[[[box[0] * w, box[1] * h, box[2] * w, box[3] * h]]],
            input_points=[[[[point[0] * w, point[1] * h]]]],
            return_tensors="pt",
        ).to(self.model.device)
        out = self.model(**inputs, multimask_output=False)
        masks = self.processor.image_processor.post_process_masks(
            out.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu()
        )
        mask = masks[0].reshape(-1, h, w)[0].bool()
        if not mask.any():
            return mask, None
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        return mask, [cols[0].item() / w, rows[0].item() / h, (cols[-1].item() + 1) / w, (rows[-1].item() + 1) / h]
