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
- ``mode=fastv``: the FastV baseline: layer K-1's last prompt row scores the image, and from layer K
  on the dropped image tokens are gone as keys for every row from the image on.

Each mode is one subclass of ``Reprompt`` (``Prune``, ``Compressed``, ``FastV``), sharing its scorer
and records; ``Reprompt(n_layers, mode=...)`` builds the mode's class. The pure scoring and the
official selections are in methods/reprompt_scoring.py, the compressed context in
methods/reprompt_context.py.

Positions: every kept entry keeps the rotary position it was computed at (its keys carry
it already), and appended tokens continue after the original context (``next_position``:
the first pass's prompt length with ``keep_query``, else ``img_end``, which is exactly where
a fresh prompt's query starts). The causal mask is built over cache slots, and RoPE over
these explicit ``position_ids``, so the model sees the same relative distances as in the
full context. On Qwen2.5-VL the positions are M-RoPE's three rows (methods/positions.py):
the kept entries keep their (t, h, w) positions, appended text continues at the context's
largest position + 1 (after the image: start + max(h, w) / merge), and every prefill of a
prompt we build (scoring, describe, primer) passes them explicitly. Hence: keep_ratio=1 reproduces
the full-context answer, and the compressed answer equals a full forward of the same token sequence
with the dropped image keys blocked for the appended rows (both are tested).
"""

from __future__ import annotations

import collections
import hashlib
import json
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from . import hooks, positions
from . import reprompt_scoring as scoring
from .kv_cache import cache_of, full_cache, with_cache
from .reprompt_context import IMAGE_KEYS, TOKEN_KEYS, CompressedContext, compress, generate_from, official_context
from .technique import Batch, Request, RequestError, Technique, layer_range

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
CACHE_STRATEGIES = ("qs", "q", "s")


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
# The technique: one base (the scorer, the records), one subclass per mode
# ---------------------------------------------------------------------------------------


class Reprompt(Technique):
    """What every mode shares: the parameters, the scorer (which image tokens to keep, from one prefill's
    attention or from the official describe pass) and the per-request records. ``Reprompt(n_layers,
    mode=..., ...)`` builds the class registered for ``mode`` (as ``pathlib.Path()`` builds a ``PosixPath``):
    a new mode is one more ``class X(Reprompt, mode="x")`` with its own ``generate`` and ``forward``."""

    name = "reprompt"
    mode = ""
    modes: dict[str, type[Reprompt]] = {}  # mode -> its class, filled by ``class X(Reprompt, mode=...)``
    unused: tuple[str, ...] = ()  # parameters the mode never reads, left out of describe()
    cache_strategies: tuple[str, ...] = ()  # the official cache_strategy values the mode takes

    def __init_subclass__(cls, mode: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if mode is not None:  # a subclass of a mode's class (no mode=) does not take the mode over
            cls.mode = mode
            Reprompt.modes[mode] = cls

    def __new__(cls, *args, **params):
        if cls is Reprompt:
            mode = params.get("mode", DEFAULTS["mode"])
            if mode not in Reprompt.modes:
                raise ValueError(f"reprompt: mode={mode!r} is not one of {', '.join(Reprompt.modes)}")
            cls = Reprompt.modes[mode]
        return super().__new__(cls)

    def __init__(self, n_layers: int, **params):
        super().__init__(**{**DEFAULTS, **params, "mode": self.mode})
        self.check(self.params)
        self.n_layers = n_layers
        p = self.params
        self.score_layers = layer_range(
            p["score_from_layer"], p["score_to_layer"], n_layers, default_start=0, name="reprompt scoring"
        )
        self.records: list[dict] = []
        self.stats_path: Path | None = None  # JSON summary (+ .jsonl per request), written after every request
        self.log = None  # optional callable(str): a summary line every `log_every` requests
        self.log_every = 50

    def check(self, p: dict) -> None:
        """A ValueError for settings the mode cannot serve; a mode adds its own after these."""
        count = p["selection"] == "describe" and p["keep_ratio"] >= 1 and float(p["keep_ratio"]).is_integer()
        if not (0 < p["keep_ratio"] <= 1 or count):  # describe: a whole number is a count (official -k 28)
            raise ValueError(f"reprompt: keep_ratio={p['keep_ratio']} must be in (0, 1] (the paper keeps 0.02-0.05)")
        if p["cache_strategy"] and p["cache_strategy"] not in self.cache_strategies:
            raise ValueError(
                f"reprompt: cache_strategy={p['cache_strategy']!r} needs mode=compressed and one of {', '.join(CACHE_STRATEGIES)}"
            )
        if p["describe_score"] not in DESCRIBE_SCORES:
            raise ValueError(
                f"reprompt: describe_score={p['describe_score']!r} is not one of {', '.join(DESCRIBE_SCORES)}"
            )
        if p["prune_rows"] not in PRUNE_ROWS:
            raise ValueError(f"reprompt: prune_rows={p['prune_rows']!r} is not one of {', '.join(PRUNE_ROWS)}")

    def describe(self):
        d = {**super().describe(), "score_layers": f"{self.score_layers.start}..{self.score_layers.stop - 1}"}
        for key in self.unused:
            d.pop(key)
        return d

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
        return scoring.select(cap.latest(), self.params["keep_ratio"], self.params["selection"])

    def batch_captures(self, model, batch: Batch, inputs: dict, capture_of) -> list[hooks.Capture]:
        """One scoring prefill of a left-padded batch: ``capture_of(request)`` (as for the request alone) placed in
        each request's row. The model infers positions from the attention mask, as its generate's prefill does."""
        self.check_batch(batch)
        batch.require_one_image(self.name)
        caps = []
        for i, req in enumerate(batch.requests):
            cap = capture_of(req)
            cap.place([i], batch.offsets[i])
            caps.append(cap)
        fwd = {k: inputs[k] for k in (*TOKEN_KEYS, *IMAGE_KEYS) if inputs.get(k) is not None}
        with torch.no_grad(), hooks.edited(model, *caps):
            model(**fwd, use_cache=False)
        return caps

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
        if self.params["describe_score"] == "random":  # needs no describe pass
            return self.rank_described(None, None, image_pos)
        rows, hidden, _, _ = scoring.describe_pass(
            model, ids, pixel_values, image_pos, self.params["describe_tokens"], **(image_kwargs or {})
        )
        return self.rank_described(rows, hidden, image_pos)

    def rank_described(self, rows, hidden, image_pos) -> dict[int, torch.Tensor]:
        """{layer: kept image-relative indices} by ``describe_score`` from a describe pass's rows and hidden states."""
        p, n = self.params, image_pos.numel()
        count = scoring.official_count(p["keep_ratio"], n)
        rank = {
            "attn_over_gen": lambda: scoring.attn_over_gen(rows, count),
            "attn_over_query": lambda: scoring.attn_over_query(rows, count),
            "norm": lambda: scoring.hidden_norm(hidden, image_pos, self.n_layers, count),
            "random": lambda: scoring.random_tokens(n, self.n_layers, count, p["seed"]),
        }[p["describe_score"]]
        return dict(enumerate(rank()))

    # --- the compressed context (mode=compressed; mode=prune's generation cuts its cache too) ---

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


class Prune(Reprompt, mode="prune"):
    """mode=prune: the dropped image tokens masked as keys (see the module docstring)."""

    unused = ("keep_query", "primer", "cache_size")

    def __init__(self, n_layers: int, **params):
        super().__init__(n_layers, **params)
        self.selections: collections.OrderedDict[str, dict] = collections.OrderedDict()  # image hash -> per-layer kept

    def describe_selection(self, model, req: Request, inputs: dict) -> dict[int, torch.Tensor]:
        key = image_hash(req.images)
        if key not in self.selections:
            ids = self.describe_ids(req)
            extras = {**image_extras(inputs), **positions.explicit(model, ids, inputs.get("image_grid_thw"))}
            self.selections[key] = self.official_selection(model, ids, inputs["pixel_values"], req.image_pos, extras)
            while len(self.selections) > self.params["cache_size"]:
                self.selections.popitem(last=False)
        return self.selections[key]

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

    def batch_refusal(self, family=None) -> str | None:
        if self.params["selection"] == "describe":
            return "selection=describe runs a describe pass per image (not yet written for a batch)"
        return None  # one batched scoring prefill, then each request's masks placed in its row

    def batch_edits(self, model, batch: Batch, kwargs) -> list[hooks.AttnEdit]:
        """Each request's masks from its own scores (one batched scoring prefill), placed in its row. A batch
        always masks the dropped keys: the cache cut of ``generate`` is per request (it equals the masks, tested)."""
        caps = self.batch_captures(model, batch, kwargs, lambda r: self._capture(r, r.prompt_len))
        keep, selection = self.params["keep_ratio"], self.params["selection"]
        kept = [scoring.select(cap.latest(), keep, selection) for cap in caps]
        for req, k in zip(batch.requests, kept):
            n_kept = int(next(iter(k.values())).numel())
            record = {"image": "", "compressed": False, "query": _query_text(req), "kv_entries": req.prompt_len}
            self._log({**record, "kv_full": req.prompt_len, "image_kept": n_kept, "ttft_s": None, "batched": True})
        by_request = {id(r): k for r, k in zip(batch.requests, kept)}
        return batch.place_each(lambda r: self.prune_edits(r, by_request[id(r)]))

    def forward(self, model, req: Request, **kwargs):
        req.require_one_image(self.name)
        edits = (
            self.batch_edits(model, req, kwargs)
            if isinstance(req, Batch)
            else self.prune_edits(req, self._kept(model, req, kwargs))
        )
        with hooks.edited(model, *edits):
            return model(**kwargs)

    def generate(self, model, req: Request, **kwargs):
        """Pooled selection: the scoring prefill's cache cut to [prefix, kept image tokens], and the query
        re-prefilled after it, which equals masking the dropped keys (tested) but decodes over the kept
        entries only. Per-layer selection: the key masks. A batch: the key masks (``batch_edits``)."""
        req.require_one_image(self.name)
        if isinstance(req, Batch):
            with hooks.edited(model, *self.batch_edits(model, req, kwargs)):
                return model.generate(**kwargs)
        if self.params["selection"] in ("per_layer", "describe") or self.params["prune_rows"] != "after_image":
            kept = self._kept(model, req, kwargs)
            with hooks.edited(model, *self.prune_edits(req, kept)):
                return model.generate(**kwargs)
        clock = _with_clock(kwargs)
        p = req.prompt_len
        cap = self._capture(req, p)
        prefill = prefill_inputs(model, kwargs, p)
        with torch.no_grad(), hooks.edited(model, cap):
            out = model(**prefill, use_cache=True, **with_cache(full_cache()))
        kept = scoring.select(cap.latest(), self.params["keep_ratio"])[None]
        ctx = self.build_context(model, req, cache_of(out), kept, p, keep_query=False)
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


class Compressed(Reprompt, mode="compressed"):
    """mode=compressed: later questions on an image answered from its compressed context (see the module
    docstring); with ``cache_strategy``, the official context from a describe pass answers every question."""

    cache_strategies = CACHE_STRATEGIES

    def __init__(self, n_layers: int, **params):
        super().__init__(n_layers, **params)
        self.contexts: collections.OrderedDict[tuple, CompressedContext] = collections.OrderedDict()

    def check(self, p: dict) -> None:
        super().check(p)
        if p["selection"] in ("per_layer", "describe") and not p["cache_strategy"]:
            raise ValueError(
                f"reprompt: selection={p['selection']} needs mode=prune (a compressed cache keeps one token set for all layers)"
            )

    def forward(self, model, req: Request, **kwargs):
        req.require_one_image(self.name)
        raise RequestError(
            "reprompt mode=compressed answers generate_until tasks (it reuses one cache across questions); "
            "for loglikelihood / multiple_choice tasks use mode=prune"
        )

    def context_key(self, req: Request) -> tuple:
        img_start = int(req.image_pos[0])
        return image_hash(req.images), tuple(req.input_ids[0, :img_start].tolist())

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
                **with_cache(full_cache()),
                **extras,
            )
        kept = scoring.select(cap.latest(), self.params["keep_ratio"])[None]
        return self.build_context(model, primed, cache_of(out), kept, ids.shape[1])

    def _official_generate(self, model, req: Request, kwargs):
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
            rows, hidden, _, cache = scoring.describe_pass(
                model, ids, kwargs["pixel_values"], pos, self.params["describe_tokens"], **extras
            )
            in_image = torch.zeros(ids.shape[1], dtype=torch.bool)
            in_image[pos.cpu()] = True
            query = (~in_image).nonzero().flatten()
            rotary = positions.prompt_positions(model, ids, grid) if positions.is_mrope(model) else None
            ctx = official_context(
                cache,
                query,
                {l: pos[i].cpu() for l, i in self.rank_described(rows, hidden, pos).items()},
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

    def generate(self, model, req: Request, **kwargs):
        """Ours: the first question on an image answered in full and its cache compressed for the next ones
        (with ``primer``: the primer's context built first, and every question answered from it)."""
        req.require_one_image(self.name)
        if self.params["cache_strategy"]:
            return self._official_generate(model, req, kwargs)
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
            out = model.generate(
                **{**kwargs, "use_cache": True, **with_cache(full_cache())}, return_dict_in_generate=True
            )
        kept = scoring.select({layer: maps[0] for layer, maps in cap.maps.items()}, self.params["keep_ratio"])[None]
        self._remember(key, self.build_context(model, req, cache_of(out), kept, req.prompt_len))
        record.update(
            kv_entries=req.prompt_len, kv_full=req.prompt_len, image_kept=int(req.image_pos.numel()), ttft_s=clock.first
        )
        self._log(record)
        return out.sequences


class FastV(Reprompt, mode="fastv"):
    """mode=fastv: the FastV baseline (``fastv_layer`` K, ``fastv_ratio`` R; see ``fastv_edits``)."""

    batch_refused = None  # one batched scoring prefill, then each request's blocks placed in its row

    def _fastv_capture(self, req: Request) -> hooks.Capture:
        K, p = self.params["fastv_layer"], req.prompt_len
        if not 1 <= K < self.n_layers:
            raise ValueError(f"reprompt: fastv_layer={K} must be in [1, {self.n_layers - 1}]")
        return hooks.Capture(layers=[K - 1], rows=hooks.Rows.span(p - 1, p), keys=req.image_pos)

    def fastv_edits(self, model, req: Request | Batch, kwargs) -> list[hooks.AttnEdit]:
        """One scoring prefill (layer K-1, last prompt row), then the dropped image tokens removed from
        layer K on for every row from the image on: their keys are gone, so their own rows are never read,
        which equals cutting them out of the sequence with the kept tokens' positions unchanged. A batch: one
        scoring prefill, each request's blocks from its own row's scores, placed in its row."""
        if isinstance(req, Batch):
            caps = self.batch_captures(model, req, kwargs, self._fastv_capture)
            edits = {id(r): self._fastv_blocks(r, cap) for r, cap in zip(req.requests, caps)}
            return req.place_each(lambda r: edits[id(r)])
        cap = self._fastv_capture(req)
        prefill = prefill_inputs(model, kwargs, req.prompt_len)
        with torch.no_grad(), hooks.edited(model, cap):
            model(**prefill, use_cache=False)
        return self._fastv_blocks(req, cap)

    def _fastv_blocks(self, req: Request, cap: hooks.Capture) -> list[hooks.AttnEdit]:
        K, pos = self.params["fastv_layer"], req.image_pos
        kept = scoring.fastv_kept(cap.latest()[K - 1][0, :, -1], self.params["fastv_ratio"])
        dropped = torch.ones(pos.numel(), dtype=torch.bool)
        dropped[kept] = False
        if not dropped.any():
            return []
        return [hooks.Block(layers=range(K, self.n_layers), rows=hooks.Rows.span(int(pos[0])), keys=pos[dropped])]

    def generate(self, model, req: Request, **kwargs):
        req.require_one_image(self.name)
        with hooks.edited(model, *self.fastv_edits(model, req, kwargs)):
            return model.generate(**kwargs)

    def forward(self, model, req: Request, **kwargs):
        req.require_one_image(self.name)
        with hooks.edited(model, *self.fastv_edits(model, req, kwargs)):
            return model(**kwargs)


MODES = tuple(Reprompt.modes)
