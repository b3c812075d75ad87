"""Which image tokens re-prompting keeps: attention scores over the image and their top-k (pure), and the
official selections (OmriKaduri/vlm-interp @ 8f38051): the describe-the-image pass and its per-layer
rankings (mllm/utils/attention_store.py), and FastV's pick. methods/reprompt.py runs the prefills.
"""

from __future__ import annotations

import torch

from . import hooks
from .kv_cache import cache_of


def n_keep(n_image: int, keep_ratio: float) -> int:
    """How many image tokens survive: round(keep_ratio * n), at least one."""
    return min(n_image, max(1, round(keep_ratio * n_image)))


def attention_scores(maps: dict[int, torch.Tensor]) -> torch.Tensor:
    """(layers, keys): each layer's (batch, heads, rows, keys) map averaged over batch, heads and rows,
    layers in ascending order."""
    return torch.stack([maps[layer].float().mean(dim=(0, 1, 2)) for layer in sorted(maps)])


def top_tokens(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Indices (ascending) of the top keep_ratio of a 1-D score vector; ties go to the earlier token."""
    k = n_keep(scores.numel(), keep_ratio)
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def select(
    maps: dict[int, torch.Tensor], keep_ratio: float, selection: str = "pooled"
) -> dict[int | None, torch.Tensor]:
    """Kept image-token indices: {None: indices} pooled over the captured layers, or {layer: indices}."""
    scores = attention_scores(maps)
    if selection == "pooled":
        return {None: top_tokens(scores.mean(0), keep_ratio)}
    return {layer: top_tokens(scores[i], keep_ratio) for i, layer in enumerate(sorted(maps))}


# ---------------------------------------------------------------------------------------
# The official selection (OmriKaduri/vlm-interp @ 8f38051, run_on_coco.py with -k):
# a describe-the-image generation, then per-layer top-k (mllm/utils/attention_store.py)
# ---------------------------------------------------------------------------------------


def official_count(k: float, n_image: int) -> int:
    """Tokens kept: ``int(k * n)`` for a fraction (``*_percentage`` methods and ``random``), ``int(k)`` for a count.

    attention_store.py get_top_k_indices_attn_over_gen / get_top_k_indices_norm / get_k_random_indices.
    """
    return int(k * n_image) if k < 1 else int(k)


def describe_pass(model, ids, pixel_values, image_pos, n_tokens: int, **image_kwargs):
    """attention_store.py ``__call__`` over run_on_coco.py's describe generation: per layer, the newest
    query row of every forward call over the image keys, stacked (steps, heads, image tokens); the
    prefill's hidden states (``set_hidden_states``: the first call's, embeddings first); the new ids; and
    the cache after the last call (``set_kv``, what run_on_coco_from_cache.py compresses).
    Greedy, at most ``n_tokens`` steps, stopping at EOS as chat_step_by_step's ``generate`` does
    (``max_new_tokens=300``): the mean over steps is over the description only."""
    n_layers = hooks.num_layers(model)
    cap = hooks.Capture(layers=range(n_layers), rows=hooks.Rows.last(), keys=image_pos)
    with torch.no_grad(), hooks.edited(model, cap):
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixel_values,
            **image_kwargs,
            do_sample=False,
            num_beams=1,
            max_new_tokens=n_tokens,
            output_hidden_states=True,
            return_dict_in_generate=True,
        )
    rows = {l: torch.cat([m[0, :, -1:, :] for m in cap.maps[l]], dim=1).transpose(0, 1) for l in cap.maps}
    hidden = out.hidden_states[0]
    return rows, hidden, out.sequences[:, ids.shape[1] :], cache_of(out)


def rank_per_layer(scores: torch.Tensor, count: int) -> list[torch.Tensor]:
    """Per layer ``argsort(descending=True)[:count]`` (image-relative indices, ranked), attention_store.py."""
    return [scores[l].argsort(descending=True)[:count] for l in range(scores.shape[0])]


def attn_over_gen(rows: dict, count: int) -> list[torch.Tensor]:
    """get_top_k_indices_attn_over_gen: mean over the generation steps, then over heads; top-k per layer."""
    mean = torch.stack([rows[l].float().mean(dim=0).mean(dim=0) for l in sorted(rows)])
    return rank_per_layer(mean, count)


def attn_over_query(rows: dict, count: int) -> list[torch.Tensor]:
    """get_top_k_indices_attn_over_query: the first call's row only (the last prompt row), mean over heads."""
    return rank_per_layer(torch.stack([rows[l][0].float().mean(dim=0) for l in sorted(rows)]), count)


def hidden_norm(hidden, image_pos, n_layers: int, count: int) -> list[torch.Tensor]:
    """get_top_k_indices_norm: L2 norm of the prefill's image hidden states; layer l reads hidden_states[l]
    (the input of layer l: embeddings for layer 0), as LlamaModel indexes ``topk_indices[layer_idx]``."""
    norms = torch.stack([hidden[l][0, image_pos].float().norm(dim=-1) for l in range(n_layers)])
    return rank_per_layer(norms, count)


def random_tokens(n_image: int, n_layers: int, count: int, seed: int) -> list[torch.Tensor]:
    """get_k_random_indices: an independent ``randperm(n)[:count]`` per layer (ours from a seeded generator)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n_image, generator=g)[:count] for _ in range(n_layers)]


def fastv_kept(last_row: torch.Tensor, ratio: float) -> torch.Tensor:
    """FastV as vlm-interp's LlamaModel.forward selects (``fastv_ratio``/``fastv_layer`` block): layer K-1's
    last prompt row over the image, mean over heads, ``topk(int(n * ratio))``; the last image token is
    always kept too (``arange(img_max, seq_len)`` starts at it). last_row: (heads, n_image).
    Image-relative indices, ascending, each once (the official keeps a duplicate when the last token ranks too)."""
    n = last_row.shape[-1]
    top = last_row.float().mean(dim=0).topk(int(n * ratio)).indices
    return torch.unique(torch.cat([top, torch.tensor([n - 1])]))
