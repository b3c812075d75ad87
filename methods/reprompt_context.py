"""The compressed context of re-prompting: a KV cache cut down to the entries kept, each at the rotary
position it was computed at, and generation or a forward appended after it.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import DynamicCache

from . import positions
from .families import IMAGE_KEYS, TOKEN_INPUTS
from .kv_cache import with_cache

# What a prefill needs of lmms-eval's inputs: per-token ones (cut to the prompt; ``families.TOKEN_INPUTS``:
# Qwen's mm_token_type_ids, Gemma 3's token_type_ids) and per-image ones (``families.IMAGE_KEYS``: pixels and
# each family's layout inputs). Generating after a context, the context stands for them all.
TOKEN_KEYS = ("input_ids", "attention_mask", *TOKEN_INPUTS)
FORWARD_KEYS = TOKEN_KEYS + IMAGE_KEYS


@dataclasses.dataclass
class CompressedContext:
    """Kept KV entries of one context, with the positions they were computed at."""

    keys: list[torch.Tensor]  # per LM layer: (batch, kv_heads, kept, head_dim)
    values: list[torch.Tensor]
    positions: torch.Tensor  # (kept,) original positions; (3, kept) with M-RoPE (methods/positions.py)
    next_position: int  # position of the first appended token (on every M-RoPE row)
    full_entries: int  # entries of the same context uncompressed
    image_kept: int
    image_total: int

    @property
    def entries(self) -> int:
        return int(self.positions.shape[-1])

    def cache(self) -> DynamicCache:
        """A fresh DynamicCache holding copies of the kept entries (generation appends to it)."""
        cache = DynamicCache()
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            cache.update(k.clone(), v.clone(), layer)
        return cache


def compress(
    cache,
    keep_positions: torch.Tensor,
    next_position: int,
    full_entries: int,
    image_kept: int,
    image_total: int,
    prompt_positions: torch.Tensor | None = None,
):
    """Keep the cache entries at ``keep_positions`` (ascending cache slots). ``prompt_positions``: the rotary
    positions of every slot ((n,) or M-RoPE's (3, n)); default: a slot's index is its position."""
    keep = keep_positions.to(torch.long)
    keys, values = [], []
    for layer in cache.layers:
        idx = keep.to(layer.keys.device)
        keys.append(layer.keys.index_select(-2, idx).clone())
        values.append(layer.values.index_select(-2, idx).clone())
    kept_positions = keep.cpu() if prompt_positions is None else prompt_positions.cpu()[..., keep.cpu()]
    return CompressedContext(keys, values, kept_positions, next_position, full_entries, image_kept, image_total)


def official_context(
    cache,
    query_positions: torch.Tensor,
    kept: dict,
    strategy: str,
    image_total: int,
    prompt_positions: torch.Tensor | None = None,
) -> CompressedContext:
    """llava_wrapper.py ``chat_step_by_step_from_cache``: per layer, the describe pass's cache cut to
    ``qs`` = [system prompt, that layer's kept image entries (ascending), user prompt], ``q`` = the query
    entries only, ``s`` = the kept image entries only. The system prompt is the query positions before
    the first gap (the image). New tokens continue at ``max(query) + 1`` (q, qs) or ``max(kept) + 1`` (s).
    kept: {layer: absolute positions}; query_positions: ascending non-image prompt positions (cache slots).
    prompt_positions: the describe prompt's rotary positions when they are not its slots (M-RoPE's (3, n)):
    new tokens then continue at the largest kept position + 1."""
    q = query_positions.to(torch.long).cpu()
    gap = int(((q[1:] - q[:-1]) != 1).nonzero()[0][0])
    system, user = q[: gap + 1], q[gap + 1 :]
    keys, values = [], []
    for layer, entry in enumerate(cache.layers):
        image = torch.sort(kept[layer].to(torch.long).cpu()).values
        idx = {"qs": torch.cat([system, image, user]), "q": q, "s": image}[strategy].to(entry.keys.device)
        keys.append(entry.keys.index_select(-2, idx).clone())
        values.append(entry.values.index_select(-2, idx).clone())
    last = q if strategy != "s" else torch.cat([k.to(torch.long).cpu() for k in kept.values()])
    n = keys[0].shape[-2]
    if prompt_positions is None:
        nxt, placeholders = int(last.max()) + 1, torch.arange(n)
    else:
        nxt, placeholders = (
            positions.next_position(prompt_positions.cpu()[..., last]),
            torch.arange(n).expand(prompt_positions.shape[0], n),
        )
    # per-layer entries differ in position (image part); ``positions`` only sizes the placeholders
    return CompressedContext(
        keys,
        values,
        placeholders,
        nxt,
        int(cache.layers[0].keys.shape[-2]),
        0 if strategy == "q" else int(next(iter(kept.values())).numel()),
        image_total,
    )


def generate_from(model, ctx: CompressedContext, suffix_ids: torch.Tensor, **gen_kwargs) -> torch.Tensor:
    """Generate after ``suffix_ids`` appended to the compressed context; returns the new tokens only.

    The cached slots are represented in ``input_ids`` by placeholders that are never embedded
    (generate prefills only the uncached tail); ``position_ids`` carry the original positions.
    """
    n, s = ctx.entries, suffix_ids.shape[1]
    device = suffix_ids.device
    pad = model.generation_config.pad_token_id or 0
    ids = torch.cat([torch.full((1, n), pad, dtype=suffix_ids.dtype, device=device), suffix_ids], dim=1)
    pos = positions.position_ids(positions.extend(ctx.positions.to(device), ctx.next_position, s))
    for k in FORWARD_KEYS:
        gen_kwargs.pop(k, None)
    gen_kwargs["use_cache"] = True  # the compressed context IS a cache
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        position_ids=pos,
        **with_cache(ctx.cache()),
        **gen_kwargs,
    )
    return out[:, n + s :]


def forward_from(model, ctx: CompressedContext, suffix_ids: torch.Tensor):
    """One forward of ``suffix_ids`` after the compressed context (logits of the suffix rows)."""
    pos = positions.extend(ctx.positions[..., :0].to(suffix_ids.device), ctx.next_position, suffix_ids.shape[1])
    return model(
        input_ids=suffix_ids, position_ids=positions.position_ids(pos), use_cache=True, **with_cache(ctx.cache())
    )
