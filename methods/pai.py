"""PAI ("Paying more attention to image"): boost every image token for the answer rows.

The official code is LALBJ/PAI @ 9bbd8bd; each step cites its file:line, docs/pai.md has the
parity table.

- Boost (attention.py:90-94): in layers [start, end) (2..31 of 32: README.md:65, pope_eval.py:54-55),
  on the newest query row of each forward, the pre-softmax scores over the image tokens become
  a + alpha * |a| (alpha 0.2: pope_eval.py:50), after the causal mask is added (attention.py:67-75).
- Guidance (CFG.py, methods/guidance.py): gamma * (c - u) + u on log-probabilities against an
  image-free pass, gamma 1.1 (README.md:65, 82; the argparse default is 2, pope_eval.py:53).
- The two interact (``boost_rows``): ``llama_modify(use_cfg=True)`` sets ``use_cfg`` on every
  edited layer (attention.py:125), which switches the boost off (attention.py:90), so the prefill
  (the first answer token) is guided but not boosted; the first ``CFGLogits`` call sets it back
  to False (CFG.py:48-49), so every later token is boosted and guided.
"""

from __future__ import annotations

from transformers import LogitsProcessorList

from . import guidance, hooks
from .technique import Batch, Request, RequestError, Technique, layer_range

DEFAULTS = {
    "alpha": 0.2,
    "start_layer": 2,
    "end_layer": None,
    "use_cfg": True,
    "gamma": 1.1,
    "cutoff": 0.1,
    "boost_first_step": False,
    "official_quirks": False,
    "newlines": False,  # anyres models (LLaVA-NeXT/OneVision): boost the row-newline tokens too
}


class GuidedTechnique(Technique):
    """A technique whose attention edit may be combined with image-free guidance (PAI, PAINT).

    Parameters read here: use_cfg, gamma, cutoff, and (optional, defaults in brackets)
    boost_first_step [False]: boost the first answer token under CFG too (official: no);
    official_quirks [False]: reproduce two official behaviours we consider bugs: the image-free
    KV cache does not follow beam reordering (CFG.py:43-47), and at gamma == 1 the boost never
    turns on (CFG.py:30-31 returns before CFG.py:48-49); precision [unset]: "official" does the
    guidance (CFG.py) in fp16 as the official fp16 runs do (methods/guidance.py ``fp16_guide``): the
    instrument of bench/precision.py, not a model_arg (it changed no greedy id there, docs/pai.md).
    """

    batch_refused = None  # one pass with each request's own edits; the image-free pass is padded like the batch

    def boost_rows(self, req: Request) -> hooks.Rows | None:
        """The query rows that get the attention edit, or None for no edit."""
        p = self.params
        if not p.get("use_cfg"):
            return req.answer_rows  # attention.py:90: the last row of every forward
        if p.get("official_quirks") and p["gamma"] == 1:
            return None  # CFG.py:30-31: the boost stays off for the whole answer
        if p.get("boost_first_step"):
            return req.answer_rows
        return hooks.Rows.span(req.prompt_len)  # attention.py:125 + CFG.py:48-49: off for the prefill only

    def generate(self, model, req: Request, **kwargs):
        req.require_one_image(self.name)
        p = self.params
        if p.get("use_cfg"):
            follow, fp16 = not p.get("official_quirks", False), p.get("precision") == "official"
            if isinstance(req, Batch):
                pad = int(req.input_ids[req.offsets.index(max(req.offsets)), 0])
                ids, mask = guidance.image_free_batch([r.input_ids for r in req.requests], req.image_token_id, pad)
                cfg = guidance.ImageFreeGuidance(model, ids, p["gamma"], p["cutoff"], follow, text_mask=mask, fp16=fp16)
            else:
                text_ids = guidance.drop_image_tokens(req.input_ids, req.image_token_id, kwargs.get("attention_mask"))
                cfg = guidance.ImageFreeGuidance(
                    model, text_ids, p["gamma"], p["cutoff"], follow_beams=follow, fp16=fp16
                )
            kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), cfg])
        if isinstance(req, Batch) and int(kwargs.get("num_beams") or 1) > 1:
            raise RequestError(f"{self.name}: beam search in a batch is not supported; use batch_size=1")
        with hooks.edited(model, *self.edits(model, req)):
            return model.generate(**kwargs)

    def forward(self, model, req: Request, **kwargs):
        if isinstance(req, Batch) and self.params.get("use_cfg"):
            raise RequestError(f"{self.name}: a guided forward scores one request at a time; use batch_size=1")
        out = super().forward(model, req, **kwargs)
        if self.params.get("use_cfg"):
            p = self.params
            out = guidance.guided_forward(
                model,
                req.input_ids,
                out,
                req.prompt_len,
                req.image_token_id,
                p["gamma"],
                p["cutoff"],
                kwargs.get("labels"),
                fp16=p.get("precision") == "official",
            )
        return out


class Pai(GuidedTechnique):
    name = "pai"

    def __init__(self, n_layers: int, **params):
        super().__init__(**{**DEFAULTS, **params})
        p = self.params
        self.layers = layer_range(p["start_layer"], p["end_layer"], n_layers, default_start=2, name=self.name)

    def recipe(self, model, req: Request):
        rows = self.boost_rows(req)
        if self.params["alpha"] == 0 or rows is None:
            return []  # nothing to edit: stay on the fast path, bit-identical to the baseline
        # every block's grid tokens; anyres row newlines only with newlines=True (no pixels of their own)
        keys = req.image_keys(newlines=self.params["newlines"])
        return [hooks.Boost(layers=self.layers, rows=rows, keys=keys, alpha=self.params["alpha"])]

    def describe(self):
        return {**super().describe(), "layers": f"{self.layers.start}..{self.layers.stop - 1}"}
