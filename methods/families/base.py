"""What every family adapter answers, the registry of adapters, and the image geometry built from them.

A ``Family`` is the only code that knows a model family: its image layout (``blocks``), how its
forward puts image features into the input embeddings (``embed_image``), its rotary positions
(``rope_index``), and a few facts the techniques ask instead of testing family names
(``square_grid``, ``vision_cls``, ``row_newlines``, ``mrope``, ...). Techniques call
``adapter(config)`` and read those; adding a family is one module that subclasses ``Family`` and
registers it with ``@register``.
"""

from __future__ import annotations

import contextlib

import torch

from ..geometry import GeometryError, ImageGeometry, image_token_id


class Family:
    """One model family (subclass it and ``@register`` it). Class attributes are facts; methods compute."""

    model_types: tuple[str, ...] = ()  # the config.model_type values it covers
    display_name = ""  # as users name the family (README support matrix, messages)
    lmms_eval_model = "llava_hf"  # the lmms-eval class the family's wrappers sit on
    name_prefix = "llava"  # the family's model names: <name_prefix>_<technique> (llava_pm, qwen2_5_vl_pm)
    request_inputs: tuple[str, ...] = ()  # processor outputs (besides pixel_values) its geometry reads
    token_inputs: tuple[str, ...] = ()  # per-token processor outputs its forward reads (masks, positions)
    # Every image token is a cell of one square grid over the tower's single square input (LLaVA-1.5):
    # the layout the papers' official code is written for (lochead's official prompt, PM's square view).
    square_grid = False
    row_newlines = False  # a learned newline token, with the image token id, after each high-res row
    highres_block = (
        False  # a "highres" block (tiles) beside the "base" one: lochead's and discover-heads' block=highres
    )
    vision_cls = True  # the vision tower has a CLS token (PAINT's selection reads its attention)
    cls_crop: int | None = None  # the tower crop whose CLS sees the whole image (None: the tower's only crop)
    vision_tower = "CLIP vision tower"  # as messages name it ("its SigLIP vision tower has no CLS token")
    mrope = False  # multi-axis rotary positions (rope_index); else 1-D arange
    # Image tokens attend to each other in both directions in the LM (a mask the model's own forward
    # builds, e.g. from token_type_ids): a pass of a technique's own over the LM must rebuild it.
    bidirectional_image = False
    mm_projector = "multi_modal_projector"  # the module between tower and LM (VIRAL trains it fully)
    system_prompt: str | None = None  # the system message lmms-eval's chat class puts first
    # Image features are also added to the hidden states after the first LM layers, at the image positions
    # (Qwen3-VL's DeepStack): a pass of a technique's own over the LM must add them too (``lm_inputs``).
    deepstack = False
    patches_per_token = 1  # tower patches behind each image token (InternVL's pixel shuffle: 4)
    # The vision tower runs each image as consecutive rows of its batch (its crops; ``tower_crops`` counts them),
    # the images in batch order: a vision-tower edit of request i of a batch acts on its image's rows
    # (methods/technique.py Batch.vision_rows). False: the tower packs images otherwise (Qwen: one patch sequence).
    crops_as_tower_rows = False
    # ``split_pixels`` / ``join_pixels`` know how the processor lays a batch's images out in ``pixel_values``
    # (a technique that swaps one request's image in a batch, PM, needs them); False: not written for the family.
    batch_pixels = False

    def blocks(self, config, processor, image_size, start: int, inputs: dict):
        """The image's blocks in sequence order (or ``(blocks, others)``: image tokens of no cell)."""
        raise NotImplementedError

    def tower_crops(self, config, inputs: dict) -> int:
        """How many rows of the vision tower's batch one request's image takes, as the model's forward lays them
        out (``crops_as_tower_rows`` families); ``inputs``: the request's ``request_inputs``."""
        raise NotImplementedError(f"{self.display_name}'s vision tower does not run an image as rows of its batch")

    def process_image(self, processor, image, **options) -> dict:
        """The image processor's outputs for one image, as the family's processor makes them in a prompt
        (``options``: the ones the lmms-eval class called its processor with, e.g. qwen3_vl's do_resize)."""
        return processor.image_processor(images=[image], return_tensors="pt", **options)

    def split_pixels(self, pixel_values: torch.Tensor, inputs: dict) -> list[torch.Tensor]:
        """Each image's part of a batch's ``pixel_values`` (one image per prompt, in prompt order; ``inputs``: the
        batch's ``request_inputs``), which the model reads as it reads that image's own ``pixel_values``."""
        raise NotImplementedError(f"{self.display_name}: a batch's pixel_values are not yet split per image")

    def join_pixels(self, parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """A batch's ``pixel_values`` made of each image's own (``like``: the batch's, for its layout): concatenated."""
        return torch.cat(parts)

    def embed_image(self, model, input_ids: torch.Tensor, pixel_values: torch.Tensor, inputs: dict) -> torch.Tensor:
        """Input embeddings of ``input_ids`` with the image features put at the image tokens, as the
        model's forward builds them; ``inputs``: the request's ``request_inputs``."""
        raise NotImplementedError

    def lm_inputs(self, model, input_ids: torch.Tensor, pixel_values: torch.Tensor, inputs: dict):
        """(input embeddings, the language model's other image inputs) as the model's forward builds them, for a
        pass of a technique's own over ``model.model.language_model``; default: ``embed_image`` and nothing else."""
        return self.embed_image(model, input_ids, pixel_values, inputs), {}

    def lm_slice(self, extras: dict, start: int, stop: int) -> dict:
        """``lm_inputs``' extras for a pass over stream positions start..stop (after a cache of ``start``
        entries; positions past the prompt are text); default: nothing."""
        return {}

    def injection_off(self, model):
        """A context in which image features enter the LM only through the input embeddings (no per-layer
        injection such as DeepStack); default: nothing to switch off."""
        return contextlib.nullcontext()

    def rope_index(self, model, input_ids: torch.Tensor, image_grid_thw) -> torch.Tensor:
        """(3, n) multi-axis positions of a (1, n) prompt (``mrope`` families only)."""
        raise NotImplementedError(f"{self.display_name} uses 1-D positions")

    def aligned_block(
        self, config, input_ids: torch.Tensor, image_token_id: int, inputs: dict, image_size, n_grid=None
    ):
        """VIRAL's aligned tokens of one sample with an image: (LM positions, (rows, cols), whether the
        block sees the whole image), or None to leave the sample out. Default: its geometry's base block."""
        base = image_geometry(config, None, image_size, input_ids, inputs).base
        return base.positions, base.grid_hw, tuple(base.region) == (0.0, 0.0, 1.0, 1.0)


ADAPTERS: dict[str, Family] = {}


def register(cls):
    """Class decorator: one instance of ``cls`` serves every model type it names."""
    instance = cls()
    for t in cls.model_types:
        ADAPTERS[t] = instance
    return cls


def supported() -> tuple[str, ...]:
    return tuple(sorted(ADAPTERS))


def adapter(config, what: str = "") -> Family:
    """The adapter of a model config (or a model_type string); a clear error for an unknown family."""
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    found = ADAPTERS.get(model_type)
    if found is None:
        raise GeometryError(
            f"{what + ': ' if what else ''}no image geometry for model_type {model_type!r}; supported: {', '.join(supported())}"
        )
    return found


def image_geometry(config, processor, image_size, input_ids: torch.Tensor, inputs: dict | None = None) -> ImageGeometry:
    """The geometry of the (single) image of one prompt, checked against the prompt's image tokens.

    config: the model config; processor: the checkpoint's processor (or its image processor);
    image_size: (W, H) of the image given to the processor; input_ids: (1, n); inputs: the
    processor's other outputs, for families whose layout needs them (``image_grid_thw``)."""
    family = adapter(config)
    where = (input_ids[0] == image_token_id(config)).nonzero().flatten().cpu()
    if where.numel() == 0:
        raise GeometryError("the prompt has no image token")
    size = tuple(int(v) for v in image_size)
    built = family.blocks(config, processor, size, int(where[0]), inputs or {})
    blocks, others = built if isinstance(built, tuple) else (built, torch.empty(0, dtype=torch.long))
    geo = ImageGeometry(config.model_type, size, tuple(blocks), others)
    expected = geo.all_positions()
    if expected.numel() != where.numel() or not torch.equal(expected, where):
        raise GeometryError(
            f"{config.model_type}: the prompt has {where.numel()} image tokens at {_span_text(where)}, but the config and "
            f"processor predict {expected.numel()} for a {size[0]}x{size[1]} image "
            f"({', '.join(f'{b.name} {b.rows}x{b.cols}' for b in blocks)}); one image per prompt is supported"
        )
    return geo


def _span_text(pos: torch.Tensor) -> str:
    contiguous = int(pos[-1] - pos[0]) + 1 == pos.numel()
    return f"{int(pos[0])}..{int(pos[-1])}" + ("" if contiguous else " (not contiguous)")


def scatter_image(m, input_ids: torch.Tensor, emb: torch.Tensor, pooled) -> torch.Tensor:
    """The image features put at the image tokens, as the models' forwards do (OneVision's and
    Qwen's placeholder masks come as (image, video))."""
    feats = torch.cat(list(pooled), dim=0).to(emb.device, emb.dtype)
    mask = m.get_placeholder_mask(input_ids, inputs_embeds=emb, image_features=feats)
    return emb.masked_scatter(mask[0] if isinstance(mask, tuple) else mask, feats)
