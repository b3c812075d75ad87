"""The Qwen2.5-VL wrappers: the techniques inside lmms-eval's own ``qwen2_5_vl`` classes.

Everything family-independent (parameters, presets, recipe logging, TechniqueError,
cache/resume, accelerate sharding) is ``base.TechniqueMixin``'s; this module fills in its
family seams only:

- the classes: lmms-eval 0.7.3's ``qwen2_5_vl`` (simple) and ``qwen2_5_vl_chat`` (chat), which
  resize every image with ``qwen_vl_utils`` at their ``min_pixels``/``max_pixels`` (defaults
  200704 / 1605632, *not* the checkpoint's saved ones) and call ``self.processor``;
- the checkpoint check: ``model_type == "qwen2_5_vl"``;
- the request: ``image_grid_thw`` travels with it (the family adapter, methods/families/qwen2_5_vl.py,
  names it), so the geometry is one non-square merged grid; the image a technique sees is the one the processor got (already
  resized by qwen_vl_utils), and every map or box is in fractions of it (= of the original:
  Qwen resizes without cropping or padding);
- ``dtype``: lmms-eval's class always loads bfloat16 (also on CPU); ``dtype=float32`` (or
  ``float16``, ``auto``) loads the weights in that dtype instead. The default stays bfloat16,
  so an idle wrapper equals stock ``qwen2_5_vl`` with the same ``--model_args``.

Which technique runs on this family and which refuses (and why) is in each spec's ``refused``,
the README's support matrix and docs/qwen.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from loguru import logger

from .base import (
    Bfloat16ClassMixin,
    TechniqueSpec,
    chat_loglikelihood,
    read_family_config,
    refuse_family,
    wrapper_classes,
)

FAMILY = "qwen2_5_vl"

# lmms-eval 0.7.3 qwen2_5_vl's own constructor arguments, passed through untouched.
QWEN_ARGS = (
    "device",
    "device_map",
    "batch_size",
    "use_cache",
    "attn_implementation",
    "min_pixels",
    "max_pixels",
    "max_num_frames",
    "fps",
    "system_prompt",
    "interleave_visuals",
    "reasoning_prompt",
)


def check_qwen(pretrained: str):
    """The checkpoint's config; a ModelArgsError for anything but a Qwen2.5-VL checkpoint."""
    need = "a Qwen2.5-VL checkpoint (model_type qwen2_5_vl), e.g. Qwen/Qwen2.5-VL-7B-Instruct or shapeworld-tiny-qwen"
    return read_family_config(pretrained, FAMILY, FAMILY, need)


def saved_pixels(pretrained: str) -> tuple[int, int] | None:
    """(min_pixels, max_pixels) saved with a local checkpoint's image processor, if any."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = Path(pretrained) / name
        if path.is_file():
            cfg = json.loads(path.read_text())
            cfg = cfg.get("image_processor", cfg)
            size = cfg.get("size") or {}
            lo, hi = size.get("shortest_edge", cfg.get("min_pixels")), size.get("longest_edge", cfg.get("max_pixels"))
            if lo and hi:
                return int(lo), int(hi)
    return None


class QwenTechniqueMixin(Bfloat16ClassMixin):
    """TechniqueMixin in front of lmms-eval's qwen2_5_vl (simple or chat); only the family seams differ."""

    family = FAMILY
    family_args = QWEN_ARGS
    default_pretrained = "Qwen/Qwen2.5-VL-3B-Instruct"  # lmms-eval's own default
    processor_attr = "processor"
    # lmms-eval's qwen2_5_vl batches itself (left padding when batch_size > 1; one image per request here)
    batch_families = {"qwen2_5_vl": None}
    class_batches = True
    loads = ("lmms_eval.models.simple.qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration")
    # how the class's generation calls qwen_vl_utils.process_vision_info and the processor (loglikelihood builds
    # its prompts alike; Qwen3-VL's class passes image_patch_size=16 and do_resize=False)
    vision_info_kwargs: dict = {}
    processor_kwargs: dict = {}

    def __init__(self, pretrained: str | None = None, **kwargs):
        super().__init__(pretrained=pretrained, **kwargs)
        self._warn_pixels()

    def _warn_pixels(self) -> None:
        saved = saved_pixels(self._pretrained_path)
        using = (int(self.min_pixels), int(self.max_pixels))
        if saved and saved != using:
            logger.warning(
                f"{self.spec.name}: the checkpoint was saved with min_pixels={saved[0]}, max_pixels={saved[1]} but lmms-eval "
                f"resizes images with min_pixels={using[0]}, max_pixels={using[1]}: pass "
                f"--model_args ...,min_pixels={saved[0]},max_pixels={saved[1]} to see what it was trained on"
            )

    def check_checkpoint(self, pretrained: str, revision, trust_remote_code: bool) -> None:
        self._pretrained_path = pretrained
        config = check_qwen(pretrained)
        refuse_family(self.spec, config.model_type, pretrained)

    def score_continuations(self, requests) -> list:
        """lmms-eval's qwen2_5_vl has no loglikelihood; ours (``chat_loglikelihood``) builds the prompt as its
        generation does: system message, the images (as its data URLs, at min/max_pixels through
        qwen_vl_utils), the context."""
        return chat_loglikelihood(self, requests, self._encode_continuation)

    def _encode_continuation(self, context: str, continuation: str, visuals: list):
        from qwen_vl_utils import process_vision_info

        encode = getattr(self, "_encode_image_data_url", lambda image: image)
        images = [
            {"type": "image", "image": encode(v), "max_pixels": self.max_pixels, "min_pixels": self.min_pixels}
            for v in visuals
        ]
        messages = [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": images + [{"type": "text", "text": context}]},
        ]
        prompt = self._chat_prompt(messages)
        image_inputs, _ = process_vision_info([messages], **self.vision_info_kwargs)
        encoded = [
            self.processor(text=[t], images=image_inputs, return_tensors="pt", **self.processor_kwargs)
            for t in (prompt, prompt + continuation)
        ]
        return encoded[0], encoded[1]

    def _chat_prompt(self, messages: list) -> str:
        """The generation prompt of one conversation, as the class's generation builds it."""
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def qwen_wrapper_classes(spec: TechniqueSpec, module: str):
    """The (simple, chat) lmms-eval classes of one qwen2_5_vl_* name."""
    from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL as QwenChat
    from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL as QwenSimple

    return wrapper_classes(spec, module, mixin=QwenTechniqueMixin, bases=(QwenSimple, QwenChat))
