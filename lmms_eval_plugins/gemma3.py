"""The Gemma 3 wrappers: the techniques inside lmms-eval's own ``gemma3`` class (simple only in 0.7.3).

Everything family-independent is ``base.TechniqueMixin``'s; the family itself (geometry, embeddings,
its facts) is its adapter, methods/families/gemma3.py. This module fills in the seams:

- the class: lmms-eval 0.7.3's ``gemma3`` (``lmms_eval.models.simple.gemma3.Gemma3``), which hands each
  image to ``self.processor.apply_chat_template`` as a JPEG data URL (``RecordingProcessor`` loads and
  records it the way the processor does); its ``loglikelihood`` raises, so these names bring their own
  (``base.chat_loglikelihood``: llava_hf's convention, the prompt built as the class's generation builds it);
- the checkpoint check: ``model_type == "gemma3"``;
- ``trust_remote_code``: lmms-eval's class defaults it to true for the tokenizer; these names keep it off
  unless asked (``trust_remote_code=true``);
- ``dtype``: the class always loads bfloat16; ``dtype=float32`` (or ``float16``, ``auto``) loads the
  weights in that dtype instead (the class still casts pixel_values to bfloat16; SigLIP casts them back
  to its own dtype). The default stays bfloat16, so an idle wrapper equals stock ``gemma3``;
- batches: the class pads every prompt (batch size 1 too) to a multiple of 8 on the tokenizer's side; Gemma's
  own tokenizers pad left, and with ``batch_size`` > 1 these names make any other tokenizer pad left too.
"""

from __future__ import annotations


from .base import (
    Bfloat16ClassMixin,
    TechniqueSpec,
    chat_loglikelihood,
    read_family_config,
    refuse_family,
    wrapper_classes,
)

FAMILY = "gemma3"

# lmms-eval 0.7.3 gemma3's own constructor arguments, passed through untouched.
GEMMA3_ARGS = (
    "device",
    "device_map",
    "batch_size",
    "trust_remote_code",
    "use_cache",
    "attn_implementation",
    "min_pixels",
    "max_pixels",
    "max_num_frames",
    "interleave_visuals",
    "system_prompt",
    "reasoning_prompt",
)


def check_gemma3(pretrained: str, revision=None, trust_remote_code: bool = False):
    """The checkpoint's config; a ModelArgsError for anything but a Gemma 3 (image-text) checkpoint."""
    need = "a Gemma 3 image-text checkpoint (model_type gemma3), e.g. google/gemma-3-4b-it"
    return read_family_config(pretrained, FAMILY, FAMILY, need, revision, trust_remote_code)


class Gemma3TechniqueMixin(Bfloat16ClassMixin):
    """TechniqueMixin in front of lmms-eval's gemma3; only the family seams differ."""

    # lmms-eval's gemma3 batches itself: one apply_chat_template call per batch, padded to a multiple of 8 on the
    # tokenizer's side (Gemma's own tokenizers pad left; ``__init__`` makes any other pad left in a batch). The
    # model's forward builds each row's sliding windows and bidirectional image block under the padding.
    batch_families = {"gemma3": None}
    class_batches = True

    family = FAMILY
    family_args = GEMMA3_ARGS
    default_pretrained = "google/gemma-3-27b-it"  # lmms-eval's own default
    processor_attr = "processor"
    loads = ("lmms_eval.models.simple.gemma3", "Gemma3ForConditionalGeneration")

    def __init__(self, pretrained: str | None = None, **kwargs):
        kwargs.setdefault("trust_remote_code", False)  # lmms-eval's class would default it to true
        super().__init__(pretrained=pretrained, **kwargs)
        if self.batch_size_per_gpu > 1:  # a batch is left-padded (right padding would sit between prompt and answer)
            self.processor.tokenizer.padding_side = "left"

    def check_checkpoint(self, pretrained: str, revision, trust_remote_code: bool) -> None:
        config = check_gemma3(pretrained, revision, trust_remote_code)
        refuse_family(self.spec, config.model_type, pretrained)

    def score_continuations(self, requests) -> list:
        """lmms-eval's gemma3 has no loglikelihood; ours (``chat_loglikelihood``) builds the prompt as its
        generation does: system message, the images (as its JPEG data URLs), the context."""
        return chat_loglikelihood(self, requests, self._encode_continuation)

    def _encode_continuation(self, context: str, continuation: str, visuals: list):
        from transformers.image_utils import load_image

        images = [load_image(self._encode_image_data_url(v)) for v in visuals]  # what its processor loads
        messages = [
            {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]},
            {"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": context}]},
        ]
        prompt = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        encoded = [
            self.processor(text=[t], images=[images] if images else None, return_tensors="pt")
            for t in (prompt, prompt + continuation)
        ]
        return encoded[0], encoded[1]


def gemma3_wrapper_classes(spec: TechniqueSpec, module: str):
    """The simple lmms-eval class of one gemma3_* name (lmms-eval 0.7.3 has no chat gemma3 class)."""
    from lmms_eval.models.simple.gemma3 import Gemma3

    simple, _ = wrapper_classes(spec, module, mixin=Gemma3TechniqueMixin, bases=(Gemma3, Gemma3))
    return simple
