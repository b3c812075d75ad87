"""What every technique shares: the request it sees, and how it runs generation or a forward.

A technique is a recipe (a list of hook-layer edits built from its parameters and the
request) plus, when it needs more than one pass, its own ``generate``/``forward``.
This module imports no lmms-eval: the lmms-eval wrappers build a ``Request`` and call
``Technique.generate`` or ``Technique.forward``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from . import hooks


class RequestError(ValueError):
    """The request cannot be served by the technique (no image, several images, ...)."""


@dataclasses.dataclass
class Request:
    """One lmms-eval request as a technique sees it (batch size 1).

    input_ids: (1, n) prompt ids (with the continuation, for a loglikelihood forward);
    prompt_len: number of prompt tokens; rows >= prompt_len - 1 predict answer tokens;
    images: the original visuals given to the processor (PIL images, full resolution);
    text: the prompt text given to the processor; processor: to re-process an image.
    """

    input_ids: torch.Tensor
    image_token_id: int
    prompt_len: int
    images: list = dataclasses.field(default_factory=list)
    text: str | None = None
    processor: Any = None
    doc_key: str | None = None  # optional stable id of the document (for saved visuals)

    def __post_init__(self):
        if self.input_ids.shape[0] != 1:
            raise RequestError(f"one request at a time (batch_size=1); got a batch of {self.input_ids.shape[0]}")

    @property
    def image_pos(self) -> torch.Tensor:
        """Absolute positions of the image tokens, from config.image_token_id."""
        return hooks.image_positions(self.input_ids, self.image_token_id)

    @property
    def answer_rows(self) -> hooks.Rows:
        """The query rows that predict answer tokens: the last prompt token and every later one."""
        return hooks.Rows.span(self.prompt_len - 1)

    def require_one_image(self, technique: str) -> None:
        n_img = len(self.images)
        if n_img != 1:
            raise RequestError(
                f"{technique} needs exactly one image per request, but this request has {n_img}; "
                "use a single-image task (or llava_hf for text-only and multi-image tasks)"
            )
        if self.image_pos.numel() == 0:
            raise RequestError(f"{technique}: the prompt has no image token; is this an interleaved LLaVA checkpoint?")
        pos = self.image_pos
        if int(pos[-1] - pos[0]) + 1 != pos.numel():
            raise RequestError(f"{technique}: the image tokens are not contiguous; one image per prompt is supported")


class Technique:
    """Base: install ``recipe`` for one generate/forward call. Override for multi-pass methods."""

    name = "technique"

    def __init__(self, **params):
        self.params = params

    def recipe(self, model, req: Request) -> list[hooks.AttnEdit]:
        return []

    def describe(self) -> dict:
        """The full recipe configuration, logged with results."""
        return {"technique": self.name, **self.params}

    def generate(self, model, req: Request, **kwargs):
        req.require_one_image(self.name)
        with hooks.edited(model, *self.recipe(model, req)):
            return model.generate(**kwargs)

    def forward(self, model, req: Request, **kwargs):
        req.require_one_image(self.name)
        with hooks.edited(model, *self.recipe(model, req)):
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
