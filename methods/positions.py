"""Token positions: 1-D RoPE or M-RoPE, as the family adapter (methods/families/) says.

A prompt's positions are ``(n,)`` for 1-D RoPE (``0..n-1``: LLaVA) or ``(3, n)`` for M-RoPE
(Qwen2.5-VL: temporal/height/width rows from ``model.model.get_rope_index``; an image's tokens
sit at its merged grid's rows and columns, and the text after it resumes at
``start + max(h, w) / merge``, not at the next slot).

A model infers positions from what it holds: LLaVA from the number of cached entries, Qwen2.5-VL
from ``mm_token_type_ids``/``image_grid_thw`` or, while decoding, from the ``rope_deltas`` it
cached for the last image prompt. Both are wrong once entries leave the KV cache, and Qwen's is
wrong for any other prompt decoded after that image prompt (PAI's image-free CFG pass). So a
technique that cuts a cache or runs a prompt of its own passes positions explicitly, from here.
With 1-D RoPE, a pass over a whole prompt is left to infer them (``explicit`` returns nothing),
so LLaVA's calls stay exactly what they were.
"""

from __future__ import annotations

import torch

from . import families


def is_mrope(model) -> bool:
    """Whether the model's family adapter (methods/families/) says it uses multi-axis positions."""
    family = families.ADAPTERS.get(getattr(model.config, "model_type", None))
    return family is not None and family.mrope


def prompt_positions(model, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of every token of a (1, n) prompt: (n,) for 1-D RoPE, (3, n) for M-RoPE.

    M-RoPE: the model's own ``get_rope_index``, image tokens found by ``config.image_token_id``
    (one image, no video), ``image_grid_thw`` its grid; a prompt without image tokens gets
    ``0..n-1`` on all three rows."""
    n = input_ids.shape[1]
    if not is_mrope(model):
        return torch.arange(n, device=input_ids.device)
    has_image = bool((input_ids == model.config.image_token_id).any())
    if image_grid_thw is None and has_image:
        raise ValueError("M-RoPE positions of a prompt with image tokens need its image_grid_thw")
    return families.adapter(model.config).rope_index(model, input_ids, image_grid_thw if has_image else None)


def next_position(positions: torch.Tensor) -> int:
    """Where a text token appended after these positions goes (get_rope_index: max + 1 on every row)."""
    return int(positions.max()) + 1


def extend(positions: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """``positions`` followed by n text tokens at start, start + 1, ... (the same on every M-RoPE row)."""
    new = start + torch.arange(n, device=positions.device)
    return torch.cat([positions, new.expand(*positions.shape[:-1], n)], dim=-1)


def position_ids(positions: torch.Tensor, batch: int = 1) -> torch.Tensor:
    """The model's ``position_ids`` argument: (batch, n) for 1-D RoPE, (3, batch, n) for M-RoPE."""
    if positions.dim() == 1:
        return positions[None].expand(batch, -1)
    return positions[:, None].expand(-1, batch, -1)


def explicit(model, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None, start: int = 0) -> dict:
    """``{"position_ids": ...}`` for a pass over ``input_ids`` (a whole prompt, or its text continuing at
    ``start`` when ``start > 0``) on an M-RoPE model; ``{}`` with 1-D RoPE, where the model's own
    inference (from the cache length) is already right for such a pass."""
    if not is_mrope(model):
        return {}
    batch = input_ids.shape[0]
    if start:
        pos = start + torch.arange(input_ids.shape[1], device=input_ids.device).expand(3, -1)
    else:
        pos = prompt_positions(model, input_ids, image_grid_thw)
    return {"position_ids": position_ids(pos, batch)}


def padded(model, attention_mask: torch.Tensor, n: int) -> dict:
    """``{"position_ids": ...}`` for the last ``n`` tokens of left-padded rows of text (a batch's image-free
    prompts): each row counts its own tokens from 0, as it would alone; padding gets position 0 (masked)."""
    pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -n:]
    return {"position_ids": pos[None].expand(3, -1, -1) if is_mrope(model) else pos}
