"""Classifier-free guidance against an image-free pass (PAI's optional step, shared with PAINT).

The arithmetic is the official one (LALBJ/PAI @ 9bbd8bd, ``CFG.py``), one function per step:

- ``guide``: log-softmax both passes (CFG.py:29,51), return ``gamma*(c - u) + u`` (CFG.py:54-56),
  with every token whose guided-pass log-probability is below ``log(cutoff) + max`` set to
  ``-inf`` (CFG.py:53,57: the adaptive plausibility constraint, cutoff 0.1); at ``gamma == 1``
  the official code returns ``log_softmax(cond)`` before any of this (CFG.py:30-31), unmasked.
  At gamma 1.1 this is 1.1*c - 0.1*u on log-probabilities.
- ``ImageFreeGuidance``: the image-free prompt (the prompt minus its image tokens,
  model_loader.py:290) runs beside generation with its own KV cache (CFG.py:35-47), repeated once
  per beam (model_loader.py:291), with every attention edit off (CFG.py:32-33,48-49 switch PAI's
  boost off around this pass).
- Beams: the official image-free cache never follows beam search's reordering (CFG.py:43-47 feeds
  each row's newest token to the same cache row), so after a reorder a beam is guided by another
  beam's image-free history. ``follow_beams=True`` (our default) reorders the cache with the
  beams; ``False`` reproduces the official behaviour (preset=official).
- ``guided_forward``: the same formula, teacher-forced, for lmms-eval's loglikelihood requests
  (the official code has no such path; see docs/pai.md).
- Positions: the image-free prompt is a text-only prompt of its own. Under M-RoPE (Qwen2.5-VL)
  the model would decode it with the ``rope_deltas`` it cached for the image prompt, so the pass
  gets explicit positions (methods/positions.py): 0..n-1 on every row, then one more per step.
  With 1-D RoPE (LLaVA) the model's own positions are these already and nothing is passed.
"""

from __future__ import annotations

import math

import torch
from transformers import LogitsProcessor

from . import hooks, positions
from .kv_cache import cache_of, with_cache


def guide(cond: torch.Tensor, uncond: torch.Tensor, gamma: float, cutoff: float, fp16: bool = False) -> torch.Tensor:
    """Official CFG.py:28-58 on logits of any leading shape (last dim = vocabulary); float32 out.

    fp16=True (bench/precision.py; no model_arg, docs/pai.md "Precision"): every step in fp16 as the
    official fp16 runs do it on a GPU (``fp16_guide``); the result is returned as float32 holding fp16 values, so argmax ties stay ties."""
    if fp16:
        return fp16_guide(cond, uncond, gamma, cutoff).float()
    c = torch.log_softmax(cond.float(), dim=-1)  # CFG.py:29
    if gamma == 1:
        return c  # CFG.py:30-31: no guidance, no plausibility mask
    u = torch.log_softmax(uncond.float(), dim=-1)  # CFG.py:51
    threshold = math.log(cutoff) + c.max(dim=-1, keepdim=True).values if cutoff > 0 else None  # CFG.py:53
    out = gamma * (c - u) + u  # CFG.py:54-56
    if threshold is None:
        return out
    return out.masked_fill(c < threshold, float("-inf"))  # CFG.py:57


def _half(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16)


def fp16_guide(cond: torch.Tensor, uncond: torch.Tensor, gamma: float, cutoff: float) -> torch.Tensor:
    """CFG.py:28-58 as the official fp16 model runs it: the logits are fp16 (LLaVA's ``lm_head`` output,
    not upcast by PAI's llava_llama.py:90), ``log_softmax`` of fp16 accumulates in float32 and writes fp16,
    and each elementwise op (c - u, x gamma, + u, the cutoff's max + log 0.1) is one fp16 kernel: computed in
    float32, rounded to fp16. Written as explicit float32 ops with one rounding each, so that it gives the
    GPU's result on any device (CPU fp16 kernels round differently: the scalar gamma to fp16, for one)."""
    c = _half(torch.log_softmax(_half(cond).float(), dim=-1))  # CFG.py:29 on fp16 scores
    if gamma == 1:
        return c  # CFG.py:30-31
    u = _half(torch.log_softmax(_half(uncond).float(), dim=-1))  # CFG.py:51
    diff = _half(c.float() - u.float())  # CFG.py:55: scores - unconditional_logits
    out = _half(_half(torch.tensor(gamma, dtype=torch.float32) * diff.float()).float() + u.float())  # CFG.py:54-56
    if not cutoff > 0:
        return out
    # CFG.py:53: log(tensor(0.1)) (float32, 0-dim) + max (fp16) -> fp16
    log_cut = torch.log(torch.tensor(cutoff, dtype=torch.float32))
    threshold = _half(log_cut + c.max(dim=-1, keepdim=True).values.float())
    return out.masked_fill(c < threshold, float("-inf"))  # CFG.py:57


def drop_image_tokens(input_ids: torch.Tensor, image_token_id: int, attention_mask=None) -> torch.Tensor:
    """The image-free prompt: the same tokens without the image (model_loader.py:270-290), and without the left
    padding ``attention_mask`` marks (lmms-eval's gemma3 pads even a single prompt to a multiple of 8)."""
    if attention_mask is not None:
        input_ids = input_ids[:, int((attention_mask[0].cumsum(0) == 0).sum()) :]
    return input_ids[:, input_ids[0] != image_token_id]


def image_free_batch(prompts: list[torch.Tensor], image_token_id: int, pad_id: int = 0):
    """The image-free prompts of a batch's requests ((1, n_i) each), left-padded as the batch is:
    ((B, n) ids, (B, n) attention mask)."""
    rows = [drop_image_tokens(p, image_token_id)[0] for p in prompts]
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=rows[0].dtype, device=rows[0].device)
    mask = torch.zeros((len(rows), n), dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        ids[i, n - len(r) :] = r
        mask[i, n - len(r) :] = 1
    return ids, mask


def parent_rows(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor | None:
    """For each row of ``current`` (sequences one token longer), the row of ``previous`` it extends.

    None when the rows are in the same order already (greedy, or beams that kept their slot)."""
    prefix = current[:, :-1]
    if prefix.shape != previous.shape:
        return None
    match = (prefix[:, None, :] == previous[None, :, :]).all(-1)  # (current rows, previous rows)
    parents = match.float().argmax(-1)
    if not bool(match.any(-1).all()):
        raise RuntimeError("image-free guidance: a beam does not extend any previous beam")
    if torch.equal(parents, torch.arange(len(parents), device=parents.device)):
        return None
    return parents


class ImageFreeGuidance(LogitsProcessor):
    """A logits processor that runs the image-free prompt alongside generation, with its own KV cache.

    With beam search the image-free prompt is repeated once per row (model_loader.py:291). The
    image-free pass runs with every hook-layer edit suspended (the official boost is off during
    it, CFG.py:32-33; our edits' positions refer to the sequence with the image anyway).
    """

    def __init__(
        self,
        model,
        text_ids: torch.Tensor,
        gamma: float,
        cutoff: float,
        follow_beams: bool = True,
        text_mask: torch.Tensor | None = None,
        fp16: bool = False,
    ):
        """text_mask: a batch's left-padded image-free prompts (``image_free_batch``): one row per request, the
        attention mask travels with every pass and positions count each row's own tokens. fp16: the guidance
        in fp16 as the official fp16 runs (``fp16_guide``)."""
        self.model, self.text_ids, self.gamma, self.cutoff, self.fp16 = model, text_ids, gamma, cutoff, fp16
        self.follow_beams = follow_beams
        self.mask = text_mask
        self.cache = None
        self.previous = None  # the sequences seen by the last call (to follow beam reordering)
        self.next_position = 0  # the image-free sequence's next position (its own, not the image prompt's)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.gamma == 1:
            return guide(scores, scores, 1, self.cutoff, self.fp16)  # CFG.py:30-31: the image-free pass never runs
        with hooks.without_edits(self.model), torch.no_grad():
            if self.mask is not None:
                out = self._padded_pass(input_ids)
            elif self.cache is None:
                text = self.text_ids.to(input_ids.device).repeat(input_ids.shape[0], 1)  # model_loader.py:291
                out = self.model(input_ids=text, use_cache=True, **positions.explicit(self.model, text))
                self.next_position = text.shape[1]
            else:
                if self.follow_beams:
                    parents = parent_rows(self.previous, input_ids)
                    if parents is not None:
                        self.cache.reorder_cache(parents.to(input_ids.device))
                new = input_ids[:, -1:]
                out = self.model(
                    input_ids=new,
                    use_cache=True,
                    **with_cache(self.cache),
                    **positions.explicit(self.model, new, start=self.next_position),
                )
                self.next_position += 1
        self.cache = cache_of(out)
        self.previous = input_ids
        return guide(scores, out.logits[:, -1], self.gamma, self.cutoff, self.fp16)

    def _padded_pass(self, input_ids: torch.Tensor):
        """One step of a batch's image-free pass: the padded prompts first, then each row's newest token."""
        if self.cache is None:
            new, cache = self.text_ids.to(input_ids.device), {}
            self.mask = self.mask.to(input_ids.device)
        else:
            new, cache = input_ids[:, -1:], with_cache(self.cache)
            self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        return self.model(
            input_ids=new,
            attention_mask=self.mask,
            use_cache=True,
            **cache,
            **positions.padded(self.model, self.mask, new.shape[1]),
        )


def guided_forward(
    model,
    input_ids,
    out,
    prompt_len: int,
    image_token_id: int,
    gamma: float,
    cutoff: float,
    labels=None,
    fp16: bool = False,
):
    """CFG for a full forward (loglikelihood), the teacher-forced form of generation under CFG.

    ``out`` is the forward with the image; rows >= prompt_len - 1 (those that predict answer
    tokens) become ``guide(cond row, image-free row)``, exactly the scores generation would see
    for the same tokens. The image-free forward sees the same tokens minus the image tokens, so
    its rows are shifted left by the number of image tokens. The loss (and lmms-eval's
    log-likelihood) is the cross-entropy of those scores, i.e. renormalised over the tokens that
    pass the plausibility cutoff (a masked continuation token scores -inf).
    """
    if input_ids.shape[0] != 1:
        raise ValueError("guided_forward scores one request at a time")
    text_ids = drop_image_tokens(input_ids, image_token_id)
    n_img = input_ids.shape[1] - text_ids.shape[1]
    start = prompt_len - 1
    with hooks.without_edits(model), torch.no_grad():
        uncond = model(input_ids=text_ids, **positions.explicit(model, text_ids)).logits if gamma != 1 else None
    logits = out.logits.float().clone()
    rows = logits[:, start:]
    logits[:, start:] = guide(rows, rows if uncond is None else uncond[:, start - n_img :], gamma, cutoff, fp16)
    out.logits = logits
    if labels is not None:
        shift = logits[:, :-1].flatten(0, 1)
        target = labels[:, 1:].flatten()
        out.loss = torch.nn.functional.cross_entropy(shift, target, ignore_index=-100)
    return out
