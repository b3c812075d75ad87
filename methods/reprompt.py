"""Attention-based image-token pruning and re-prompting from a compressed context
(the "efficient visual processing" application of "What's in the image?", Kaduri et al. 2025).

A prompt is ``[prefix][image tokens][query text]`` (positions ``0..img_start``,
``img_start..img_end``, ``img_end..prompt_len``). Image tokens are scored by the attention
they receive from the query rows (``score_rows="query"``: every prompt row after the image;
``"last"``: the last prompt row only), averaged over heads and those rows, then either
averaged over a layer range (``selection="pooled"``, one kept set for all layers) or kept
per layer (``"per_layer"``, prune mode only). The top ``keep_ratio`` of the image tokens are
kept (at least one).

- ``mode=prune``: one scoring prefill, then the answer with the dropped image tokens masked as
  keys (``hooks.Block``) for every row after the image, in every layer. The image tokens'
  own rows are untouched: the kept tokens are the same vectors as in the full forward.
  For generation (pooled selection) the masks are realised by cutting the scoring prefill's
  cache down to [prefix, kept image tokens] and re-prefilling the query after it: the same
  answer (tested against the masks), with decoding over the kept entries only.
- ``mode=compressed``: the KV cache of a first pass over the image is cut down to the prefix,
  the kept image tokens and (``keep_query``) the query tokens of that pass, and stored under
  the image's content hash. Later requests on the same image are answered from that cache,
  without the image: only their own query text is prefilled.

Positions: every kept entry keeps the rotary position it was computed at (its keys carry
it already), and appended tokens continue after the original context (``next_position``:
the first pass's prompt length with ``keep_query``, else ``img_end``, which is exactly where
a fresh prompt's query starts). The causal mask is built over cache slots, and RoPE over
these explicit ``position_ids``, so the model sees the same relative distances as in the
full context. On Qwen2.5-VL the positions are M-RoPE's three rows (methods/positions.py):
the kept entries keep their (t, h, w) positions, appended text continues at the context's
largest position + 1 (after the image: start + max(h, w) / merge), and every prefill of a
prompt we build (scoring, describe, primer) passes them explicitly. Hence: keep_ratio=1 reproduces the full-context answer, and the compressed
answer equals a full forward of the same token sequence with the dropped image keys blocked
for the appended rows (both are tested).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from . import hooks, positions
from .technique import Request, RequestError, Technique, layer_range

MODES = ("prune", "compressed", "fastv")
SELECTIONS = ("pooled", "per_layer", "describe")
SCORE_ROWS = ("query", "last")
DESCRIBE_SCORES = ("attn_over_gen", "attn_over_query", "norm", "random")  # run_on_coco.py -k_selection_method
PRUNE_ROWS = ("after_image", "decode", "all")
DEFAULTS = {
    "mode": "prune",
    "keep_ratio": 0.05,
    "score_from_layer": 0,
    "score_to_layer": None,
    "score_rows": "query",
    "selection": "pooled",
    "keep_query": True,
    "primer": "",
    "cache_size": 32,
    "describe_score": "attn_over_gen",
    "describe": "\n describe the image ASSISTANT:",
    "describe_tokens": 300,
    "prune_rows": "after_image",
    "seed": 0,
    "fastv_layer": 2,
    "fastv_ratio": 0.5,
    "cache_strategy": "",
}
# What a prefill needs of lmms-eval's inputs: per-token ones (cut to the prompt; mm_token_type_ids:
# Qwen2.5-VL under transformers 5) and per-image ones (image_sizes: LLaVA-NeXT/OneVision tiling;
# image_grid_thw: Qwen2.5-VL's patch grid).
TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")
IMAGE_KEYS = ("pixel_values", "image_sizes", "image_grid_thw")
FORWARD_KEYS = TOKEN_KEYS + IMAGE_KEYS

# ---------------------------------------------------------------------------------------
# Scoring and selection (pure)
# ---------------------------------------------------------------------------------------


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


def image_extras(kwargs: dict) -> dict:
    """The processor outputs besides pixel_values that a forward over the image needs (image_sizes: anyres
    tiling; image_grid_thw: Qwen2.5-VL's grid)."""
    return {k: kwargs[k] for k in IMAGE_KEYS[1:] if kwargs.get(k) is not None}


def prefill_inputs(model, kwargs: dict, prompt_len: int) -> dict:
    """lmms-eval's inputs for one forward over the first ``prompt_len`` tokens, with explicit positions where
    the family needs them (M-RoPE: so that a cache cut afterwards keeps the positions its entries were made at)."""
    out = {k: kwargs[k][:, :prompt_len] for k in TOKEN_KEYS if kwargs.get(k) is not None}
    out.update({k: kwargs[k] for k in IMAGE_KEYS if kwargs.get(k) is not None})
    return {**out, **positions.explicit(model, out["input_ids"], kwargs.get("image_grid_thw"))}


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
    return rows, hidden, out.sequences[:, ids.shape[1] :], out.past_key_values


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


def image_hash(images) -> str:
    """Content hash of the request's original images (mode, size and pixels)."""
    h = hashlib.sha1()
    for im in images:
        if isinstance(im, torch.Tensor):  # pixel tensors (tests, harness)
            h.update(f"{tuple(im.shape)}".encode())
            h.update(im.detach().cpu().contiguous().numpy().tobytes())
            continue
        h.update(f"{im.mode}{im.size}".encode())
        h.update(im.tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# The compressed context
# ---------------------------------------------------------------------------------------


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


CACHE_STRATEGIES = ("qs", "q", "s")


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
        past_key_values=ctx.cache(),
        **gen_kwargs,
    )
    return out[:, n + s :]


def forward_from(model, ctx: CompressedContext, suffix_ids: torch.Tensor):
    """One forward of ``suffix_ids`` after the compressed context (logits of the suffix rows)."""
    pos = positions.extend(ctx.positions[..., :0].to(suffix_ids.device), ctx.next_position, suffix_ids.shape[1])
    return model(
        input_ids=suffix_ids, position_ids=positions.position_ids(pos), past_key_values=ctx.cache(), use_cache=True
    )


class FirstTokenClock(LogitsProcessor):
    """Records when the first logits arrive (time to first token), changes nothing."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first = time.perf_counter() - self.start
        return scores


def _query_text(req: Request) -> str:
    """The prompt text after the image (to match a report line to its document)."""
    if not req.text:
        return ""
    token = getattr(req.processor, "image_token", None) or "<image>"
    return req.text.rsplit(token, 1)[-1][:300]


def _with_clock(kwargs) -> FirstTokenClock:
    clock = FirstTokenClock()
    kwargs["logits_processor"] = LogitsProcessorList([*kwargs.get("logits_processor", []), clock])
    return clock


# ---------------------------------------------------------------------------------------
# The technique
# ---------------------------------------------------------------------------------------


class Reprompt(Technique):
    """mode=prune or mode=compressed (see the module docstring)."""

    name = "reprompt"

    def __init__(self, n_layers: int, **params):
        super().__init__(**{**DEFAULTS, **params})
        p = self.params
        if p["mode"] not in MODES:
            raise ValueError(f"reprompt: mode={p['mode']!r} is not one of {', '.join(MODES)}")
        count = p["selection"] == "describe" and p["keep_ratio"] >= 1 and float(p["keep_ratio"]).is_integer()
        if not (0 < p["keep_ratio"] <= 1 or count):  # describe: a whole number is a count (official -k 28)
            raise ValueError(f"reprompt: keep_ratio={p['keep_ratio']} must be in (0, 1] (the paper keeps 0.02-0.05)")
        if p["cache_strategy"] and (p["cache_strategy"] not in CACHE_STRATEGIES or p["mode"] != "compressed"):
            raise ValueError(
                f"reprompt: cache_strategy={p['cache_strategy']!r} needs mode=compressed and one of {', '.join(CACHE_STRATEGIES)}"
            )
        if p["selection"] in ("per_layer", "describe") and p["mode"] == "compressed" and not p["cache_strategy"]:
            raise ValueError(
                f"reprompt: selection={p['selection']} needs mode=prune (a compressed cache keeps one token set for all layers)"
            )
        if p["describe_score"] not in DESCRIBE_SCORES:
            raise ValueError(
                f"reprompt: describe_score={p['describe_score']!r} is not one of {', '.join(DESCRIBE_SCORES)}"
            )
        if p["prune_rows"] not in PRUNE_ROWS:
            raise ValueError(f"reprompt: prune_rows={p['prune_rows']!r} is not one of {', '.join(PRUNE_ROWS)}")
        self.selections: collections.OrderedDict[str, dict] = collections.OrderedDict()  # image hash -> per-layer kept
        self.n_layers = n_layers
        self.score_layers = layer_range(
            p["score_from_layer"], p["score_to_layer"], n_layers, default_start=0, name="reprompt scoring"
        )
        self.contexts: collections.OrderedDict[tuple, CompressedContext] = collections.OrderedDict()
        self.records: list[dict] = []
        self.stats_path: Path | None = None  # JSON summary (+ .jsonl per request), written after every request
        self.log = None  # optional callable(str): a summary line every `log_every` requests
        self.log_every = 50

    # --- scoring ---

    def _score_rows(self, img_end: int, prompt_len: int) -> hooks.Rows:
        if self.params["score_rows"] == "last" or img_end >= prompt_len:
            return hooks.Rows.span(prompt_len - 1, prompt_len)
        return hooks.Rows.span(img_end, prompt_len)

    def _capture(self, req: Request, prompt_len: int) -> hooks.Capture:
        layers = range(self.n_layers) if self.params["selection"] == "per_layer" else self.score_layers
        pos = req.image_pos
        return hooks.Capture(layers=layers, rows=self._score_rows(int(pos[-1]) + 1, prompt_len), keys=pos)

    def kept_image_tokens(self, model, req: Request, inputs: dict) -> dict[int | None, torch.Tensor]:
        """One scoring prefill of the prompt; kept image-token indices (pooled: key None)."""
        p = req.prompt_len
        prefill = prefill_inputs(model, inputs, p)
        cap = self._capture(req, p)
        with torch.no_grad(), hooks.edited(model, cap):
            model(**prefill, use_cache=False)
        return select(cap.latest(), self.params["keep_ratio"], self.params["selection"])

    # --- the official selection: a describe pass per image, reused for every question on it ---

    def describe_ids(self, req: Request) -> torch.Tensor:
        """[prefix, image] + the describe text (run_on_coco.py: "<image>\\n describe the image" in the chat)."""
        tok = req.processor.tokenizer if req.processor is not None else None
        if tok is None:
            raise RequestError("reprompt selection=describe needs the request's processor (tokenizer)")
        img_end = int(req.image_pos[-1]) + 1
        text = tok(self.params["describe"], add_special_tokens=False, return_tensors="pt")["input_ids"].to(
            req.input_ids.device
        )
        return torch.cat([req.input_ids[:, :img_end], text], dim=1)

    def official_selection(
        self, model, ids, pixel_values, image_pos, image_kwargs: dict | None = None
    ) -> dict[int, torch.Tensor]:
        """{layer: kept image-relative indices} from one describe pass (attention_store.get_top_k_indices)."""
        p, n_layers, n = self.params, self.n_layers, image_pos.numel()
        count = official_count(p["keep_ratio"], n)
        if p["describe_score"] == "random":
            return dict(enumerate(random_tokens(n, n_layers, count, p["seed"])))
        rows, hidden, _, _ = describe_pass(
            model, ids, pixel_values, image_pos, p["describe_tokens"], **(image_kwargs or {})
        )
        if p["describe_score"] == "attn_over_gen":
            kept = attn_over_gen(rows, count)
        elif p["describe_score"] == "attn_over_query":
            kept = attn_over_query(rows, count)
        else:
            kept = hidden_norm(hidden, image_pos, n_layers, count)
        return dict(enumerate(kept))

    def describe_selection(self, model, req: Request, inputs: dict) -> dict[int, torch.Tensor]:
        key = image_hash(req.images)
        if key not in self.selections:
            ids = self.describe_ids(req)
            extras = {**image_extras(inputs), **positions.explicit(model, ids, inputs.get("image_grid_thw"))}
            self.selections[key] = self.official_selection(model, ids, inputs["pixel_values"], req.image_pos, extras)
            while len(self.selections) > self.params["cache_size"]:
                self.selections.popitem(last=False)
        return self.selections[key]

    # --- FastV ---

    def fastv_edits(self, model, req: Request, kwargs) -> list[hooks.AttnEdit]:
        """One scoring prefill (layer K-1, last prompt row), then the dropped image tokens removed from
        layer K on for every row from the image on: their keys are gone, so their own rows are never read,
        which equals cutting them out of the sequence with the kept tokens' positions unchanged."""
        K, pos, p = self.params["fastv_layer"], req.image_pos, req.prompt_len
        if not 1 <= K < self.n_layers:
            raise ValueError(f"reprompt: fastv_layer={K} must be in [1, {self.n_layers - 1}]")
        cap = hooks.Capture(layers=[K - 1], rows=hooks.Rows.span(p - 1, p), keys=pos)
        prefill = prefill_inputs(model, kwargs, p)
        with torch.no_grad(), hooks.edited(model, cap):
            model(**prefill, use_cache=False)
        kept = fastv_kept(cap.latest()[K - 1][0, :, -1], self.params["fastv_ratio"])
        dropped = torch.ones(pos.numel(), dtype=torch.bool)
        dropped[kept] = False
        if not dropped.any():
            return []
        return [hooks.Block(layers=range(K, self.n_layers), rows=hooks.Rows.span(int(pos[0])), keys=pos[dropped])]

    # --- prune ---

    def _prune_rows(self, req: Request) -> hooks.Rows:
        """after_image: every row after the image (ours); decode: rows >= prompt_len, i.e. decode steps only
        (official default min_token_for_i2t_attn_masking=1); all: every row from the image on (official 0)."""
        pos = req.image_pos
        return {
            "after_image": hooks.Rows.span(int(pos[-1]) + 1),
            "decode": hooks.Rows.span(req.prompt_len),
            "all": hooks.Rows.span(int(pos[0])),
        }[self.params["prune_rows"]]

    def prune_edits(self, req: Request, kept: dict) -> list[hooks.AttnEdit]:
        pos = req.image_pos
        rows = self._prune_rows(req)
        edits = []
        for layer, idx in kept.items():
            dropped = torch.ones(pos.numel(), dtype=torch.bool)
            dropped[idx] = False
            if not dropped.any():
                continue  # keep_ratio=1: nothing to mask
            layers = range(self.n_layers) if layer is None else [layer]
            edits.append(hooks.Block(layers=layers, rows=rows, keys=pos[dropped]))
        return edits

    def _kept(self, model, req: Request, kwargs) -> dict:
        if self.params["selection"] == "describe":
            return self.describe_selection(model, req, kwargs)
        return self.kept_image_tokens(model, req, kwargs)

    def _prune_forward(self, model, req: Request, kwargs):
        kept = self._kept(model, req, kwargs)
        with hooks.edited(model, *self.prune_edits(req, kept)):
            return model(**kwargs)

    def _prune_generate(self, model, req: Request, kwargs):
        """Pooled selection: the scoring prefill's cache cut to [prefix, kept image tokens], and the query
        re-prefilled after it, which equals masking the dropped keys (tested) but decodes over the kept
        entries only. Per-layer selection: the key masks."""
        if self.params["selection"] in ("per_layer", "describe") or self.params["prune_rows"] != "after_image":
            kept = self._kept(model, req, kwargs)
            with hooks.edited(model, *self.prune_edits(req, kept)):
                return model.generate(**kwargs)
        clock = _with_clock(kwargs)
        p = req.prompt_len
        cap = self._capture(req, p)
        prefill = prefill_inputs(model, kwargs, p)
        with torch.no_grad(), hooks.edited(model, cap):
            out = model(**prefill, use_cache=True)
        kept = select(cap.latest(), self.params["keep_ratio"])[None]
        ctx = self.build_context(model, req, out.past_key_values, kept, p, keep_query=False)
        img_end = int(req.image_pos[-1]) + 1
        new = generate_from(model, ctx, req.input_ids[:, img_end:p], **kwargs)
        suffix = p - img_end
        self._log(
            {
                "image": "",
                "compressed": True,
                "query": _query_text(req),
                "kv_entries": ctx.entries + suffix,
                "kv_full": p,
                "image_kept": ctx.image_kept,
                "ttft_s": clock.first,
            }
        )
        return torch.cat([req.input_ids, new.to(req.input_ids.device)], dim=1)

    # --- compressed ---

    def context_key(self, req: Request) -> tuple:
        img_start = int(req.image_pos[0])
        return image_hash(req.images), tuple(req.input_ids[0, :img_start].tolist())

    def build_context(
        self, model, req: Request, cache, kept: torch.Tensor, query_end: int, keep_query=None
    ) -> CompressedContext:
        """Compress a cache over [prefix, image, query up to query_end)."""
        keep_query = self.params["keep_query"] if keep_query is None else keep_query
        pos = req.image_pos
        img_start, img_end = int(pos[0]), int(pos[-1]) + 1
        parts = [torch.arange(img_start), pos[kept].cpu()]
        if keep_query:
            parts.append(torch.arange(img_end, query_end))
        full = query_end if keep_query else img_end
        # each slot's rotary position (M-RoPE: three rows); appended text continues after the context's largest
        rotary = positions.prompt_positions(model, req.input_ids[:, :query_end], req.inputs.get("image_grid_thw")).cpu()
        next_position = positions.next_position(rotary[..., :full])
        return compress(cache, torch.cat(parts), next_position, full, int(kept.numel()), int(pos.numel()), rotary)

    def _remember(self, key, ctx: CompressedContext):
        self.contexts[key] = ctx
        self.contexts.move_to_end(key)
        while len(self.contexts) > self.params["cache_size"]:
            self.contexts.popitem(last=False)

    def _primer_context(self, model, req: Request, kwargs) -> CompressedContext:
        """Prefill [prefix, image, primer] with the image, score on the primer rows, compress."""
        tok = req.processor.tokenizer if req.processor is not None else None
        if tok is None:
            raise RequestError("reprompt: primer needs the request's processor (tokenizer)")
        img_end = int(req.image_pos[-1]) + 1
        primer = tok(self.params["primer"], add_special_tokens=False, return_tensors="pt")["input_ids"].to(
            req.input_ids.device
        )
        ids = torch.cat([req.input_ids[:, :img_end], primer], dim=1)
        primed = Request(
            input_ids=ids,
            image_token_id=req.image_token_id,
            prompt_len=ids.shape[1],
            images=req.images,
            config=req.config,
            inputs=req.inputs,
        )
        cap = self._capture(primed, ids.shape[1])
        extras = {**image_extras(kwargs), **positions.explicit(model, ids, kwargs.get("image_grid_thw"))}
        with torch.no_grad(), hooks.edited(model, cap):
            out = model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=kwargs["pixel_values"],
                use_cache=True,
                **extras,
            )
        kept = select(cap.latest(), self.params["keep_ratio"])[None]
        return self.build_context(model, primed, out.past_key_values, kept, ids.shape[1])

    def _official_compressed_generate(self, model, req: Request, kwargs):
        """run_on_coco.py + run_on_coco_from_cache.py: one describe pass per image (per-layer top-k of
        ``describe_score``, its cache compressed by ``cache_strategy``); EVERY question, the first included,
        is answered from that context without the image: [BOS] + the request's text after the image."""
        key = self.context_key(req)
        record = {"image": key[0][:12], "compressed": True, "query": _query_text(req)}
        ctx = self.contexts.get(key)
        if ctx is None:
            t0 = time.perf_counter()
            ids, pos = self.describe_ids(req), req.image_pos
            grid = kwargs.get("image_grid_thw")
            extras = {**image_extras(kwargs), **positions.explicit(model, ids, grid)}
            rows, hidden, _, cache = describe_pass(
                model, ids, kwargs["pixel_values"], pos, self.params["describe_tokens"], **extras
            )
            count = official_count(self.params["keep_ratio"], pos.numel())
            kept = {
                "attn_over_gen": lambda: attn_over_gen(rows, count),
                "attn_over_query": lambda: attn_over_query(rows, count),
                "norm": lambda: hidden_norm(hidden, pos, self.n_layers, count),
                "random": lambda: random_tokens(pos.numel(), self.n_layers, count, self.params["seed"]),
            }[self.params["describe_score"]]()
            in_image = torch.zeros(ids.shape[1], dtype=torch.bool)
            in_image[pos.cpu()] = True
            query = (~in_image).nonzero().flatten()
            rotary = positions.prompt_positions(model, ids, grid) if positions.is_mrope(model) else None
            ctx = official_context(
                cache,
                query,
                {l: pos[i].cpu() for l, i in enumerate(kept)},
                self.params["cache_strategy"],
                pos.numel(),
                rotary,
            )
            self._remember(key, ctx)
            record["describe_s"] = time.perf_counter() - t0
        self.contexts.move_to_end(key)
        img_end = int(req.image_pos[-1]) + 1
        bos = getattr(model.config, "bos_token_id", None)
        bos = model.generation_config.bos_token_id if bos is None else bos
        suffix = req.input_ids[:, img_end : req.prompt_len]
        if (
            bos is not None and int(req.input_ids[0, 0]) == bos
        ):  # tokenizer_image_token puts BOS before f"{question} ASSISTANT:"
            suffix = torch.cat([torch.full((1, 1), bos, dtype=suffix.dtype, device=suffix.device), suffix], dim=1)
        clock = _with_clock(kwargs)
        new = generate_from(model, ctx, suffix, **kwargs)
        record.update(kv_entries=ctx.entries, kv_full=ctx.full_entries, image_kept=ctx.image_kept, ttft_s=clock.first)
        self._log(record)
        return torch.cat([req.input_ids, new.to(req.input_ids.device)], dim=1)

    def _compressed_generate(self, model, req: Request, kwargs):
        if self.params["cache_strategy"]:
            return self._official_compressed_generate(model, req, kwargs)
        key = self.context_key(req)
        img_end = int(req.image_pos[-1]) + 1
        ctx = self.contexts.get(key)
        record = {
            "image": key[0][:12],
            "compressed": ctx is not None or bool(self.params["primer"]),
            "query": _query_text(req),
        }
        t0 = time.perf_counter()
        if ctx is None and self.params["primer"]:
            ctx = self._primer_context(model, req, kwargs)
            self._remember(key, ctx)
            record["primer_s"] = time.perf_counter() - t0
        if ctx is not None:  # answer from the compressed context, without the image
            self.contexts.move_to_end(key)
            clock = _with_clock(kwargs)
            new = generate_from(model, ctx, req.input_ids[:, img_end : req.prompt_len], **kwargs)
            record.update(
                kv_entries=ctx.entries, kv_full=ctx.full_entries, image_kept=ctx.image_kept, ttft_s=clock.first
            )
            self._log(record)
            return torch.cat([req.input_ids, new.to(req.input_ids.device)], dim=1)
        # first question on this image: the full-context answer, and its cache compressed for the next ones
        cap = self._capture(req, req.prompt_len)
        clock = _with_clock(kwargs)
        with hooks.edited(model, cap):
            out = model.generate(**{**kwargs, "use_cache": True}, return_dict_in_generate=True)
        kept = select({layer: maps[0] for layer, maps in cap.maps.items()}, self.params["keep_ratio"])[None]
        self._remember(key, self.build_context(model, req, out.past_key_values, kept, req.prompt_len))
        record.update(
            kv_entries=req.prompt_len, kv_full=req.prompt_len, image_kept=int(req.image_pos.numel()), ttft_s=clock.first
        )
        self._log(record)
        return out.sequences

    # --- bookkeeping ---

    def _log(self, record: dict) -> None:
        self.records.append(record)
        if self.stats_path is not None:
            self.stats_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.stats_path.with_suffix(".jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            self.stats_path.write_text(json.dumps({"config": self.describe(), **self.summary()}, indent=1))
        if self.log is not None and len(self.records) % self.log_every == 1:
            self.log(f"reprompt after {len(self.records)} requests: {json.dumps(self.summary())}")

    def summary(self) -> dict:
        """KV entries kept vs full and time to first token, compressed answers vs full-context ones."""
        comp = [r for r in self.records if r["compressed"]]
        full = [r for r in self.records if not r["compressed"]]

        def mean(rs, k):
            vals = [r[k] for r in rs if r.get(k) is not None]
            return sum(vals) / len(vals) if vals else None

        out = {"requests": len(self.records), "compressed_answers": len(comp), "full_answers": len(full)}
        out["kv_entries_compressed"] = mean(comp, "kv_entries")
        out["kv_entries_full"] = mean(comp, "kv_full")
        if out["kv_entries_compressed"]:
            out["kv_reduction"] = out["kv_entries_full"] / out["kv_entries_compressed"]
        out["ttft_compressed_s"] = mean(comp, "ttft_s")
        out["ttft_full_s"] = mean(full, "ttft_s")
        if out["ttft_compressed_s"] and out["ttft_full_s"]:
            out["ttft_ratio"] = out["ttft_compressed_s"] / out["ttft_full_s"]
        return out

    # --- entry points ---

    def generate(self, model, req: Request, **kwargs):
        req.require_one_image(self.name)
        if self.params["mode"] == "fastv":
            with hooks.edited(model, *self.fastv_edits(model, req, kwargs)):
                return model.generate(**kwargs)
        if self.params["mode"] == "prune":
            return self._prune_generate(model, req, kwargs)
        return self._compressed_generate(model, req, kwargs)

    def forward(self, model, req: Request, **kwargs):
        req.require_one_image(self.name)
        if self.params["mode"] == "compressed":
            raise RequestError(
                "reprompt mode=compressed answers generate_until tasks (it reuses one cache across questions); "
                "for loglikelihood / multiple_choice tasks use mode=prune"
            )
        if self.params["mode"] == "fastv":
            with hooks.edited(model, *self.fastv_edits(model, req, kwargs)):
                return model(**kwargs)
        return self._prune_forward(model, req, kwargs)

    def describe(self):
        d = {**super().describe(), "score_layers": f"{self.score_layers.start}..{self.score_layers.stop - 1}"}
        if self.params["mode"] == "prune":
            d.pop("keep_query"), d.pop("primer"), d.pop("cache_size")
        return d


def kv_bytes(ctx: CompressedContext) -> int:
    return sum(t.numel() * t.element_size() for t in (*ctx.keys, *ctx.values))
