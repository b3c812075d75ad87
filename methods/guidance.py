"""Classifier-free guidance against an image-free pass (PAI's optional step, shared with PAINT).

guided = (1 + gamma) * logits(with image) - gamma * logits(without image), restricted to the
tokens whose probability with the image is at least ``cutoff`` times the top token's
(the adaptive plausibility constraint): the image-free pass can only re-rank plausible
tokens, never promote a token the image makes implausible.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from . import hooks


def guide(cond: torch.Tensor, uncond: torch.Tensor, gamma: float, cutoff: float) -> torch.Tensor:
    """Combine logits over the last dimension (any leading shape)."""
    probs = torch.softmax(cond.float(), dim=-1)
    keep = probs >= cutoff * probs.max(dim=-1, keepdim=True).values
    guided = (1 + gamma) * cond.float() - gamma * uncond.float()
    return guided.masked_fill(~keep, float("-inf")).to(cond.dtype)


def drop_image_tokens(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    return input_ids[:, input_ids[0] != image_token_id]


class ImageFreeGuidance(LogitsProcessor):
    """A logits processor that runs the image-free prompt alongside generation, with its own KV cache.

    The image-free pass runs with every hook-layer edit suspended: the edits' positions refer
    to the sequence with the image.
    """

    def __init__(self, model, text_ids: torch.Tensor, gamma: float, cutoff: float):
        self.model, self.text_ids, self.gamma, self.cutoff = model, text_ids, gamma, cutoff
        self.cache = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        with hooks.without_edits(self.model), torch.no_grad():
            if self.cache is None:
                out = self.model(input_ids=self.text_ids, use_cache=True)
            else:
                out = self.model(input_ids=input_ids[:, -1:], past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return guide(scores, out.logits[:, -1], self.gamma, self.cutoff)


def guided_forward(model, input_ids, out, prompt_len: int, image_token_id: int, gamma: float, cutoff: float, labels=None):
    """CFG for a full forward (loglikelihood): guide the answer rows, recompute the loss.

    ``out`` is the forward with the image; the image-free forward sees the same tokens minus
    the image tokens, so its answer rows are shifted left by the number of image tokens.
    """
    text_ids = drop_image_tokens(input_ids, image_token_id)
    with hooks.without_edits(model), torch.no_grad():
        uncond = model(input_ids=text_ids).logits
    n_img = input_ids.shape[1] - text_ids.shape[1]
    logits = out.logits.clone()
    start = prompt_len - 1
    logits[:, start:] = guide(logits[:, start:], uncond[:, start - n_img :], gamma, cutoff)
    out.logits = logits
    if labels is not None:
        shift = logits[:, :-1].float().flatten(0, 1)
        target = labels[:, 1:].flatten()
        out.loss = torch.nn.functional.cross_entropy(shift, target, ignore_index=-100)
    return out
