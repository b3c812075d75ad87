"""Perception Magnifier (PM; Mao, Zhang and Cai, 2025): magnify what the model looks at, answer again.

At the first decoding step the last query's attention over the image tokens, in the deep
layers (l >= L, 1-based; L = 12 of 32), gives a token map: max over heads, sum over layers.
Iterative refinement: split the current map with a 1-D 2-means, hide the high cluster from the
model (a key mask), re-forward, and repeat until the remaining attention (map sum / number of
deep layers) is at most ``beta`` or after ``max_iter`` passes. The perception map H* is the sum
of the maps divided by the number of passes in which each token was visible. Post-processing
(min-max, standardise, x alpha, sigmoid, k x k box filter), upsampling to the square view of
the original image (padded with the mean colour, as LLaVA-1.5 preprocesses), and magnification
by inverse-transform sampling of the row/column max marginals (bilinear) give a new image, on
which the answer is generated again.

The arithmetic is pure numpy/torch, tested on hand-made inputs: the map and the search in
methods/pm_search.py, the magnified image in methods/pm_magnify.py; the view, pixels, embeddings and
positions on any family in methods/pm_view.py (from the family adapters, methods/families/). This module holds
``PerceptionMagnifier``, which runs them on a model.
It imports no lmms-eval.

Where the defaults differ from the reference code (github ShunqiM/PM @ 58c2c0f), on purpose;
each difference is a named option, and ``preset=official_pope`` / ``official_mme`` (``OFFICIAL``)
switch them all to the reference's arithmetic, checked against its fixtures
(tests/test_parity_pm.py; the parity table is in docs/pm.md):
- ``layer_map``: the exit test and H* divide the layer sum by the number of deep layers
  actually summed (21 of 32); the reference divides by n_layers - L = 20 (``official``);
- ``map_quant``: the perception map stays float until sampling (the reference quantises it to
  8 bits by truncation first, then resizes the 8-bit map: ``uint8``);
- ``sampler``: inverse-CDF sampling works on pixel cells and samples at pixel centres, so a
  uniform map is the identity (the reference's ``linspace(0, 1, N)`` over ``cumsum`` shifts by
  about a pixel, zooms by N/(N-1), and samples outside the image as black: ``official``);
- ``two_means``: iterates until the assignment is stable; a constant map has no high cluster,
  so nothing is blocked (the reference stops after 10 steps or a 1e-4 shift, and a constant
  map whose mean is exact blocks every token: ``official``);
- ``block_rows``: in the refreshing modes, later rows are not masked at the first step
  (the reference masks every row at the first step: ``first_all``).

Cost per sample with ``refresh=once`` (the reference's QA path): one map pass on the original
image, ``k`` refinement passes (1 <= k <= max_iter), then ordinary generation on the magnified
image (one prefill plus one step per further token). Refinement passes reuse the pass-0 KV
cache up to the first blocked image token and the image embeddings (no vision tower), and
read only the captured rows (never ``output_attentions``); none computes logits. Each recomputes
exactly the rows its ``block_rows`` mask can change (all: from the first blocked token; text: the text
after the image; last: the last row alone). ``refine=fast`` (never preset; not the reference's search)
recomputes only the last row, the one the map reads, whatever the mask: one decode step per pass.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import families, hooks
from .kv_cache import with_cache
from . import pm_view
from .pm_magnify import (
    VIEWS,
    magnify,
    official_enhance,
    official_magnify,
    official_quantise,
    official_upsample,
    perception_density,
    to_rgb,
)
from .pm_search import Search, deep_layers, official_layer_sum, refine, token_map
from .technique import Batch, Request, RequestError, Technique

# Paper settings (Sec. 4 and the reference scripts): POPE alpha 15, k 5, beta 0.4; MME alpha 10, k 3, beta 0.3.
PRESETS = {
    "pope": {"alpha": 15.0, "kernel": 5, "beta": 0.4},
    "mme": {"alpha": 10.0, "kernel": 3, "beta": 0.3},
}
# The official code's arithmetic (ShunqiM/PM @ 58c2c0f), checked against its fixtures
# (tests/test_parity_pm.py); each switch is one documented difference (docs/pm.md, parity table).
OFFICIAL = {
    "layer_map": "official",
    "two_means": "official",
    "map_quant": "uint8",
    "sampler": "official",
    "block_rows": "first_all",
    "max_iter": 8,
    "precision": "official",
}
PRESETS["official_pope"] = {**PRESETS["pope"], **OFFICIAL}  # scripts/pope/run_llava_pm.sh
PRESETS["official_mme"] = {**PRESETS["mme"], **OFFICIAL}  # scripts/mme/run_llava_pm.sh
DEFAULTS = {
    "deep_layer": None,  # 1-based first deep layer; None: 12 of 32 scaled to the model's depth
    **PRESETS["pope"],
    "max_iter": 8,
    "refresh": "once",  # once | every_token | every_n
    "refresh_n": 8,
    "block_rows": "auto",  # auto | all | text | last | first_all
    "refine": "exact",  # exact | fast (refinement passes recompute only the last row; not the reference's)
    "view": "pad",  # pad (LLaVA-1.5) | crop (what a centre-cropping processor shows)
    "layer_map": "mean",  # mean (divide by the layers summed) | official (float32 sum / (n_layers - L))
    "two_means": "stable",  # stable (until the assignment is stable) | official (10 steps or a 1e-4 shift)
    "map_quant": "float",  # float | uint8 (the official x255 truncation, bicubic on the 8-bit map)
    "sampler": "centres",  # centres (pixel centres, identity on a flat map) | official (linspace(0,1,N) over cumsum)
    "single_layer": False,  # the official --single_layer: the map of layer L alone
    "resample_cd": 0.0,  # the official --resample_cd: logits + cd * (logits - original-image logits)
    "temperature": None,  # None: the task's decoding; a value: sample at it, top_k 50 (official: T=1, no top-k)
    "precision": "fp32",  # fp32 | official (layer_map=official's sums in numpy float16, as the fp16 reference)
}
REFRESH = ("once", "every_token", "every_n")
BLOCK_ROWS = ("auto", "all", "text", "last", "first_all")
REFINE = ("exact", "fast")
LAYER_MAPS = ("mean", "official")
TWO_MEANS = ("stable", "official")
MAP_QUANT = ("float", "uint8")
SAMPLERS = ("centres", "official")
PRECISIONS = ("fp32", "official")


def contrast(magnified: torch.Tensor, original: torch.Tensor, cd: float) -> torch.Tensor:
    """resample_cd (model_generate.py:572-574): magnified + cd * (magnified - original)."""
    return magnified + cd * (magnified - original)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions (-100 ignored), in float32."""
    v = logits.shape[-1]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, v), labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100
    )


def _cache_prefix(kv: list, length: int, config):
    """A fresh cache holding the first ``length`` positions of ``kv`` (one (keys, values) per layer)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(k[..., :length, :], v[..., :length, :]) for k, v in kv], config=config)


def _cache_tensors(cache) -> list:
    return [(layer.keys, layer.values) for layer in cache.layers]


@dataclasses.dataclass
class Magnified:
    """One application of PM: the magnified view, its pixel values, and how it was found."""

    view: Image.Image
    image: Image.Image
    pixel_values: torch.Tensor
    search: Search
    grid_map: np.ndarray  # enhanced map over the token grid
    density: np.ndarray  # at the view's resolution
    map_forwards: int  # language-model passes spent on the map (1 + refinement passes)
    pass_starts: list = dataclasses.field(default_factory=list)  # first position each of those passes recomputed


# PM's own language-model passes (methods/pm.py ``_LanguageModel``) build a causal mask and reuse the KV
# prefix up to the first blocked image token; where image tokens attend to each other in both directions,
# both are wrong. Measured on the tiny random Gemma 3 of tests/test_gemma3.py: such a pass differs from the
# model's own forward by 0.107 in the logits (0.014 on the answer row), and a prefix cut inside the image
# by 0.013 even with the model's own mask mapping.
BIDIRECTIONAL_MEASURED = (
    "its language model lets image tokens attend to each other in both directions, and PM's own passes "
    "(a causal mask; the KV prefix reused up to the first blocked image token) do not reproduce that: "
    "0.107 max logit difference from the model's own forward on a tiny random Gemma 3 (tests/test_gemma3.py)"
)
REFUSED = {t: BIDIRECTIONAL_MEASURED for t, f in families.ADAPTERS.items() if f.bidirectional_image}


class PerceptionMagnifier(Technique):
    """PM on any family with an adapter (methods/families/): ``generate`` (lmms-eval's generation)
    and ``forward`` (loglikelihood). ``grid``: LLaVA-1.5's square side, for the recipe log (None when
    it depends on the image); each request's grid is ``req.geometry``'s."""

    name = "pm"

    def __init__(
        self,
        n_layers: int,
        grid: int | None = None,
        visuals_dir: str | None = None,
        max_visuals: int = 8,
        visuals_prefix: str = "",
        **params,
    ):
        super().__init__(**{**DEFAULTS, **params})
        p = self.params
        for key, choices in (
            ("refresh", REFRESH),
            ("block_rows", BLOCK_ROWS),
            ("refine", REFINE),
            ("view", VIEWS),
            ("layer_map", LAYER_MAPS),
            ("two_means", TWO_MEANS),
            ("map_quant", MAP_QUANT),
            ("sampler", SAMPLERS),
            ("precision", PRECISIONS),
        ):
            if p[key] not in choices:
                raise ValueError(f"{key}={p[key]!r}: use one of {', '.join(choices)}")
        if p["precision"] == "official" and p["layer_map"] != "official":
            raise ValueError("precision=official is the fp16 arithmetic of layer_map=official; set layer_map=official")
        if p["kernel"] < 1 or p["kernel"] % 2 == 0:
            raise ValueError(f"kernel={p['kernel']} must be a positive odd number (a centred k x k box filter)")
        self.layers = deep_layers(n_layers, p["deep_layer"])
        # the exit test's divisor: the layers summed, or the reference's n_layers - L (model_generate.py:353,385)
        self.divisor = n_layers - self.layers.start - 1 if p["layer_map"] == "official" else len(self.layers)
        if p["single_layer"]:  # attention_resampler.py:226: the first deep layer alone (the divisor stays)
            self.layers = range(self.layers.start, self.layers.start + 1)
            self.divisor = self.divisor if p["layer_map"] == "official" else 1
        if self.divisor < 1:
            raise ValueError(
                f"layer_map=official needs deep_layer < n_layers ({n_layers}): n_layers - L would be {self.divisor}"
            )
        self.n_layers, self.grid = n_layers, grid
        self.visuals_dir = Path(visuals_dir) if visuals_dir else None
        self.max_visuals, self.visuals_prefix = max_visuals, visuals_prefix
        self.samples = 0  # requests served with an image
        self.image_free = 0  # requests without an image (served as plain generation)
        self.last: dict = {}  # the last request's trace: iterations, sums, forwards
        self.last_magnified: Magnified | None = None
        self.keep_steps = False  # tests: keep every refresh's Magnified in self.steps
        self.steps: list[Magnified] = []

    def describe(self):
        return {**super().describe(), "deep_layers": f"{self.layers.start}..{self.layers.stop - 1}", "grid": self.grid}

    # --- the map, the search, the magnified image -------------------------------------

    def block_rows(self, first: bool = True) -> str:
        """Who cannot see the blocked tokens in a refinement pass. first_all: the reference's
        per-token path, whose first step re-forwards the whole prompt with the mask on every row
        and later steps only the newest token (pm_sample.py:180-194); its QA path masks every row.
        refine=fast: always the last row (what the map reads), whatever ``block_rows`` says."""
        rows = self.params["block_rows"]
        if self.params["refine"] == "fast":  # only the row the map reads, against the unmasked cache
            return "last"
        if rows == "first_all":
            return "all" if first or self.params["refresh"] == "once" else "last"
        if rows != "auto":
            return rows
        return "all" if self.params["refresh"] == "once" else "last"

    def layer_map(self, probs: torch.Tensor) -> np.ndarray:
        """(layers, heads, tokens) attention of the last query -> the layer-summed token map."""
        if self.params["layer_map"] == "official":
            dtype = np.float16 if self.params["precision"] == "official" else np.float32
            return official_layer_sum([p.amax(dim=0).float().cpu().numpy() for p in probs], dtype)
        return token_map(probs)

    def perceive(self, search: Search, view: Image.Image, grid_hw: tuple[int, int]):
        """H* over a rows x cols grid -> (grid map, density at the view's size, magnified view)."""
        p = self.params
        if p["map_quant"] == "uint8":  # model_generate.py:402-408
            grid_map = official_enhance(search.h_star.reshape(grid_hw), p["alpha"], p["kernel"]).numpy()
            density = official_upsample(official_quantise(torch.from_numpy(grid_map)), view.size)
        else:
            grid_map, density = perception_density(search.h_star, grid_hw, view.size, p["alpha"], p["kernel"])
        image = official_magnify(view, density) if p["sampler"] == "official" else magnify(view, density)
        return grid_map, density, image

    def magnify_at(
        self, model, req: Request, view: Image.Image, emb: torch.Tensor, cache, run, start: int, first: bool = True
    ) -> Magnified:
        """Run PM for the query at the end of ``emb``.

        ``cache`` holds the unmasked original-image stream up to ``start``; ``run`` runs the
        language model (with the family's positions). Pass 0 forwards emb[start:] (capturing the
        last row), then each refinement pass re-forwards from the first position the blocked
        tokens can change. The map is over ``req.geometry``'s one block (rows x cols).
        """
        n = emb.shape[1]
        pos = req.geometry.base.positions.to(
            req.input_ids.device
        )  # the mapped block (every image token but anyres' high-res part)
        img_end = req.geometry.span[1]
        capture = hooks.Capture(layers=self.layers, keys=pos)
        run(emb[:, start:], cache, capture=capture)
        first_map = self.layer_map(capture.stacked()[:, 0, :, 0])
        kv = _cache_tensors(cache)
        rows = self.block_rows(first)
        forwards = [1]
        starts = [start]

        def forward_blocked(blocked: np.ndarray) -> np.ndarray:
            hidden = pos[torch.as_tensor(blocked, device=pos.device)]
            if rows == "all":  # the blocked tokens change every position after the first of them
                frm = int(hidden.min()) if hidden.numel() else n - 1
            elif rows == "text":
                frm = img_end if img_end < n else n - 1
            else:
                frm = n - 1
            mask = torch.ones((1, n), dtype=torch.long, device=emb.device)
            mask[0, hidden] = 0
            cap = hooks.Capture(layers=self.layers, keys=pos)
            run(emb[:, frm:], _cache_prefix(kv, frm, model.config.text_config), capture=cap, attention_mask=mask)
            forwards[0] += 1
            starts.append(frm)
            return self.layer_map(cap.stacked()[:, 0, :, 0])

        p = self.params
        official = p["two_means"] == "official"
        search = refine(first_map, forward_blocked, self.divisor, p["beta"], p["max_iter"], official=official)
        grid_map, density, image = self.perceive(search, view, req.geometry.base.grid_hw)
        pv = pm_view.pixels(req, image)
        mag = Magnified(view, image, pv, search, grid_map, density, forwards[0], starts)
        if self.keep_steps:
            self.steps.append(mag)
        return mag

    def _check(self, req: Request) -> None:
        """A RequestError unless the request is one image whose tokens are all grid cells."""
        req.require_one_image(self.name)
        if req.config is not None and req.adapter.bidirectional_image:
            raise RequestError(f"{self.name} does not support {req.family}: {BIDIRECTIONAL_MEASURED}")
        if self.params["view"] not in pm_view.views(req):
            raise RequestError(
                f"{self.name}: view={self.params['view']} does not apply to {req.family} (its grid covers the whole image); leave view at its default"
            )
        geo = req.geometry
        if geo.others.numel():
            raise RequestError(
                f"{self.name}: {geo.others.numel()} image token(s) of no grid cell (a kept CLS token: "
                "vision_feature_select_strategy=full); the map needs every image token to be a cell"
            )

    def _view(self, req: Request) -> Image.Image:
        """The image the map pass and the magnification see (the family's view)."""
        return pm_view.view(req, self.params["view"])

    def _view_pixels(self, req: Request, view: Image.Image, given: torch.Tensor) -> torch.Tensor:
        if view is req.images[0]:  # what lmms-eval already processed
            return given
        return pm_view.pixels(req, view).to(given.device, given.dtype)

    # --- lmms-eval entry points ---------------------------------------------------------

    def decoding(self, kwargs: dict) -> dict:
        """``temperature`` set replaces the task's decoding with sampling at it, top_k=50, top_p=1.0.

        Not the official sampler: the official runs sample at T=1 (model_generate.py:698) with
        ``top_k=args.top_k`` = None (model_generate.py:644, not set by the scripts), which transformers
        4.37 copies into the generation config, so it adds no top-k warper and samples from the full
        vocabulary."""
        t = self.params["temperature"]
        if t is None:
            return kwargs
        return {**kwargs, "do_sample": True, "temperature": float(t), "top_k": 50, "top_p": 1.0}

    def batch_refusal(self, family=None) -> str | None:
        p = self.params
        if p["refresh"] != "once":
            return (
                f"refresh={p['refresh']} decodes token by token with its own passes per request (not written for a "
                "batch); use refresh=once"
            )
        if p["temperature"] is not None:
            return f"temperature={p['temperature']} samples, and a batch draws its random numbers in another order"
        if family is not None and not family.batch_pixels:
            return f"its magnified images are not yet put into a batch of {family.display_name} pixel_values"
        return None  # each request's search alone, then one batched generate on the magnified images

    @torch.no_grad()
    def generate(self, model, req: Request | Batch, **kwargs):
        kwargs = self.decoding(kwargs)
        if isinstance(req, Batch):
            return self._generate_batch(model, req, kwargs)
        if not req.images and req.image_pos.numel() == 0:
            self.image_free += 1  # nothing to magnify: the base model's answer
            return model.generate(**kwargs)
        self._check(req)
        if self.params["refresh"] == "once":
            pv = self._magnified_pixels(model, req, kwargs["pixel_values"])
            out = model.generate(**{**kwargs, "pixel_values": pv})
            self.last["generated"] = _new_positions(out, req.input_ids.shape[1])
            return out
        self.samples += 1
        view = self._view(req)
        return self._generate_refreshing(model, req, view, self._view_pixels(req, view, kwargs["pixel_values"]), kwargs)

    def _magnified_pixels(self, model, req: Request, given: torch.Tensor) -> torch.Tensor:
        """``refresh=once``: the search on the request's prompt (``given``: its pixel_values), recorded; the
        magnified image's pixel_values."""
        self.samples += 1
        view = self._view(req)
        pv_view = self._view_pixels(req, view, given)
        mag = self._magnify_prompt(model, req, view, pv_view, req.input_ids)
        return mag.pixel_values.to(pv_view.device, pv_view.dtype)

    def _generate_batch(self, model, batch: Batch, kwargs):
        """``refresh=once`` on a left-padded batch: each request's search on that request alone (its own ids and
        pixel values, as at batch size 1), then one batched ``generate`` on the requests' magnified images."""
        self.check_batch(batch)
        if int(kwargs.get("num_beams") or 1) > 1:
            raise RequestError(f"{self.name}: beam search in a batch is not supported; use batch_size=1")
        for req in batch.requests:
            self._check(req)
        family, given = batch.adapter, kwargs["pixel_values"]
        own = family.split_pixels(given, {k: kwargs[k] for k in family.request_inputs if kwargs.get(k) is not None})
        magnified = [self._magnified_pixels(model, req, pv) for req, pv in zip(batch.requests, own)]
        out = model.generate(**{**kwargs, "pixel_values": family.join_pixels(magnified, given)})
        self.last["generated"] = _new_positions(out, batch.prompt_len)  # the batch's: rows that end early are padded
        return out

    @torch.no_grad()
    def forward(self, model, req: Request, **kwargs):
        """Loglikelihood: the map at the first answer position (the last prompt token), then a
        teacher-forced forward on the magnified image. One request at a time (lmms-eval's loglikelihood
        calls the model per request)."""
        if isinstance(req, Batch):
            raise RequestError(f"{self.name}: a loglikelihood forward takes one request at a time; use batch_size=1")
        if not req.images and req.image_pos.numel() == 0:
            self.image_free += 1
            return model(**kwargs)
        self._check(req)
        self.samples += 1
        view = self._view(req)
        pv_view = self._view_pixels(req, view, kwargs["pixel_values"])
        mag = self._magnify_prompt(model, req, view, pv_view, req.input_ids[:, : req.prompt_len])
        out = model(**{**kwargs, "pixel_values": mag.pixel_values.to(pv_view.device, pv_view.dtype)})
        cd = self.params["resample_cd"]
        if cd:  # model_generate.py:572-574: scores + cd * (scores - original_scores)
            original = model(**{**kwargs, "pixel_values": pv_view}).logits
            out.logits = contrast(out.logits, original, cd)
            if kwargs.get("labels") is not None:  # lmms-eval's loglikelihood reads the loss
                out.loss = causal_lm_loss(out.logits, kwargs["labels"])
        return out

    def _magnify_prompt(self, model, req, view, pv_view, prompt_ids) -> Magnified:
        from transformers import DynamicCache

        emb, extras = pm_view.lm_inputs(model, req, prompt_ids, pv_view)
        run = _LanguageModel(model, pm_view.pass_positions(model, req, prompt_ids.shape[1]), extras)
        mag = self.magnify_at(model, req, view, emb, DynamicCache(config=model.config.text_config), run, 0)
        self._record(mag, refreshes=1)
        return mag

    def _record(self, mag: Magnified, refreshes: int) -> None:
        s = mag.search
        self.last_magnified = mag
        self.last = {
            "iterations": s.iterations,
            "sums": s.sums,
            "map_forwards": mag.map_forwards,
            "pass_starts": mag.pass_starts,
            "refreshes": refreshes,
        }
        if self.visuals_dir is not None and refreshes == 1:
            self.visuals_dir.mkdir(parents=True, exist_ok=True)
            with open(self.visuals_dir / f"{self.visuals_prefix}pm_trace.jsonl", "a") as f:  # every sample, one line
                f.write(json.dumps({"sample": self.samples - 1, "iterations": s.iterations, "sums": s.sums}) + "\n")
            if self.samples <= self.max_visuals:
                save_visuals(self.visuals_dir, f"{self.visuals_prefix}{self.samples - 1:04d}", mag)

    # --- open-ended generation with a refreshed map ---------------------------------------

    def _generate_refreshing(self, model, req: Request, view, pv_view, kwargs):
        """Decode token by token; every ``refresh_n`` tokens (1 for every_token) the map is recomputed
        from the original-image stream at the newest query and the image magnified anew."""
        from transformers import DynamicCache

        if (kwargs.get("num_beams") or 1) != 1:
            raise RequestError(
                f"{self.name}: refresh={self.params['refresh']} decodes greedily or by sampling; num_beams must be 1"
            )
        every = 1 if self.params["refresh"] == "every_token" else self.params["refresh_n"]
        max_new = kwargs.get("max_new_tokens") or model.generation_config.max_new_tokens or 20
        eos = kwargs.get("eos_token_id", model.generation_config.eos_token_id)
        eos = sorted(set([eos] if isinstance(eos, int) else (eos or [])))
        min_new = kwargs.get("min_new_tokens") or 0
        pick = _token_picker(kwargs)
        run = _LanguageModel(model, pm_view.pass_positions(model, req, req.input_ids.shape[1] + max_new))
        embed_tokens = model.model.get_input_embeddings()
        ids = req.input_ids
        emb_orig, extras_orig = pm_view.lm_inputs(model, req, ids, pv_view)
        run_orig, run_mag = run.with_image(extras_orig), None
        cache_orig, orig_len = DynamicCache(config=model.config.text_config), 0
        cache_mag = None
        forwards = refreshes = iterations = 0
        for step in range(max_new):
            if step % every == 0:
                mag = self.magnify_at(model, req, view, emb_orig, cache_orig, run_orig, orig_len, first=refreshes == 0)
                orig_len = emb_orig.shape[1]
                refreshes += 1
                iterations += mag.search.iterations
                forwards += mag.map_forwards
                if refreshes == 1:
                    self._record(mag, refreshes=1)
                prompt, extras_mag = pm_view.lm_inputs(
                    model, req, req.input_ids, mag.pixel_values.to(pv_view.device, pv_view.dtype)
                )
                run_mag = run.with_image(extras_mag)
                emb_mag = torch.cat(
                    [prompt, embed_tokens(ids[:, prompt.shape[1] :])], dim=1
                )  # answer tokens: plain embeddings
                cache_mag = DynamicCache(config=model.config.text_config)
                hidden = run_mag(emb_mag, cache_mag)
            else:
                hidden = run_mag(embed_tokens(ids[:, -1:]), cache_mag)
            forwards += 1
            logits = model.lm_head(hidden[:, -1]).float()
            if step < min_new and eos:
                logits[:, eos] = float("-inf")  # as generate's min_new_tokens
            token = pick(ids, logits)
            ids = torch.cat([ids, token[:, None]], dim=1)
            emb_orig = torch.cat([emb_orig, embed_tokens(token[:, None])], dim=1)
            if int(token) in eos:
                break
        self.last.update(
            refreshes=refreshes,
            iterations_total=iterations,
            forwards=forwards,
            generated=ids.shape[1] - req.input_ids.shape[1],
        )
        return ids


def replay_passes(model, req: Request, pixel_values: torch.Tensor, mag: Magnified) -> None:
    """The language-model passes of one ``refresh=once`` search, replayed on ``model`` without PM: the
    image embeddings, the map pass over the prompt, then each refinement pass from the position it
    recomputed (``mag.pass_starts``), on the same KV prefix and with the same key mask, but with no
    capture, no search, no magnification. What the passes alone cost (the bench's reference for PM's
    overhead); give it a plain model (sdpa, no hook layer) and the search of the same request."""
    from transformers import DynamicCache

    config = model.config.text_config
    lm = model.model.language_model
    ids = req.input_ids[:, : req.prompt_len]
    emb = pm_view.embed(model, req, ids, pixel_values)
    n = emb.shape[1]
    positions = pm_view.pass_positions(model, req, n)

    def run(frm, cache, mask=None):
        kw = {} if positions is None else {"position_ids": positions[..., frm:n]}
        lm(inputs_embeds=emb[:, frm:], **with_cache(cache), use_cache=True, attention_mask=mask, **kw)

    cache = DynamicCache(config=config)
    run(0, cache)
    kv = _cache_tensors(cache)
    pos = req.geometry.base.positions.to(emb.device)
    for frm, blocked in zip(mag.pass_starts[1:], mag.search.blocked):
        mask = torch.ones((1, n), dtype=torch.long, device=emb.device)
        mask[0, pos[torch.as_tensor(blocked, device=pos.device)]] = 0
        run(frm, _cache_prefix(kv, frm, config), mask)


class _LanguageModel:
    """The language model alone (no vision tower, no lm_head), filling a KV cache.

    positions: None (the model's own 1-D arange after the cache: LLaVA), or the family's position
    ids of the whole stream, (3, 1, length) for M-RoPE; each call takes the slice after the cache.
    extras: the language model's other image inputs for the stream's image (the adapter's ``lm_inputs``:
    Qwen3-VL's DeepStack features), sliced the same way by the adapter's ``lm_slice``; {} for most families."""

    def __init__(self, model, positions: torch.Tensor | None = None, extras: dict | None = None):
        self.model = model
        self.lm = model.model.language_model
        self.modules = hooks.attention_modules(model)
        self.positions = positions
        self.extras = extras or {}
        self.family = families.adapter(model.config)

    def with_image(self, extras: dict) -> "_LanguageModel":
        """The same language model for a stream over another image (its own ``lm_inputs`` extras)."""
        run = copy.copy(self)
        run.extras = extras or {}
        return run

    def __call__(self, embeds, cache, capture: hooks.Capture | None = None, attention_mask=None):
        edits = [capture] if capture is not None else []
        kw = {}
        if self.positions is not None:
            past = cache.get_seq_length()
            if past + embeds.shape[1] > self.positions.shape[-1]:
                raise RequestError(
                    f"pm: positions for {self.positions.shape[-1]} tokens, asked for {past + embeds.shape[1]}"
                )
            kw["position_ids"] = self.positions[..., past : past + embeds.shape[1]]
        if self.extras:
            past = cache.get_seq_length()
            kw.update(self.family.lm_slice(self.extras, past, past + embeds.shape[1]))
        with hooks.edited(self.model, *edits, modules=self.modules):
            out = self.lm(
                inputs_embeds=embeds, **with_cache(cache), use_cache=True, attention_mask=attention_mask, **kw
            )
        return out.last_hidden_state


def _new_positions(out, prompt_len: int) -> int:
    """Tokens ``generate`` added after the prompt (its output: the ids, or a dict with ``sequences``)."""
    return getattr(out, "sequences", out).shape[1] - prompt_len


def _token_picker(kwargs):
    """Greedy, or sampling with temperature / top-k / top-p as generate would do it."""
    if not kwargs.get("do_sample"):
        return lambda ids, logits: logits.argmax(dim=-1)
    from transformers.generation import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList()
    if kwargs.get("temperature") not in (None, 1.0):
        warpers.append(TemperatureLogitsWarper(float(kwargs["temperature"])))
    if kwargs.get("top_k"):
        warpers.append(TopKLogitsWarper(int(kwargs["top_k"])))
    if kwargs.get("top_p") not in (None, 1.0):
        warpers.append(TopPLogitsWarper(float(kwargs["top_p"])))

    def pick(ids, logits):
        probs = torch.softmax(warpers(ids, logits), dim=-1)
        return torch.multinomial(probs, 1)[:, 0]

    return pick


# ---------------------------------------------------------------------------------------
# Saved visuals
# ---------------------------------------------------------------------------------------


def heat_overlay(image: Image.Image, density: np.ndarray, opacity: float = 0.55) -> Image.Image:
    """The map in a black-red-yellow-white ramp, blended over the image."""
    d = np.asarray(density, dtype=np.float64)
    span = d.max() - d.min()
    d = (d - d.min()) / span if span > 0 else np.zeros_like(d)
    stops = np.array([0.0, 0.35, 0.7, 1.0])
    ramp = [np.interp(d, stops, ch) for ch in ([0, 200, 255, 255], [0, 30, 200, 255], [0, 0, 40, 255])]
    heat = np.stack(ramp, axis=-1)
    base = np.asarray(to_rgb(image), dtype=np.float64)
    return Image.fromarray(np.clip((1 - opacity) * base + opacity * heat, 0, 255).astype(np.uint8))


def save_visuals(directory: Path, stem: str, mag: Magnified) -> list[Path]:
    """original, perception-map overlay and magnified image as PNG; the search trace as JSON."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "original": mag.view,
        "perception_map": heat_overlay(mag.view, mag.density),
        "magnified": mag.image,
    }
    paths = []
    for name, img in files.items():
        path = directory / f"{stem}_{name}.png"
        img.save(path, format="PNG")
        paths.append(path)
    trace = {
        "iterations": mag.search.iterations,
        "sums": mag.search.sums,
        "h_star": np.round(mag.search.h_star, 6).tolist(),
    }
    (directory / f"{stem}_search.json").write_text(json.dumps(trace))
    return paths
