"""The Qwen3-VL wrappers: the techniques inside lmms-eval's own ``qwen3_vl`` classes.

Everything family-independent is ``base.TechniqueMixin``'s, and what Qwen3-VL shares with Qwen2.5-VL
(the request with ``image_grid_thw``, the min/max pixels warning, loglikelihood) is ``qwen.QwenTechniqueMixin``'s;
the family itself (geometry, positions, DeepStack) is its adapter, methods/families/qwen3_vl.py. This module
fills in the seams:

- the classes: lmms-eval 0.7.3's ``qwen3_vl`` (simple) and ``qwen3_vl_chat`` (chat), which resize every image
  with ``qwen_vl_utils`` (``image_patch_size=16``) at their ``min_pixels``/``max_pixels`` (defaults 200704 /
  1605632, not the checkpoint's saved ones) and call ``self.processor`` with ``do_resize=False``;
- the simple class prepares the *next* request in a worker thread while the model answers the current one,
  so the processor's last call would be the next request's: our simple classes prepare each request when
  its turn comes (``one_request_at_a_time``), so a technique reads its own request's image;
- the checkpoint check: ``model_type == "qwen3_vl"`` (dense Qwen3-VL; MoE and Qwen3.5 are not adapted);
- ``trust_remote_code``: lmms-eval's class reads the config with it on to pick the model class; these names
  pick ``Qwen3VLForConditionalGeneration`` themselves from a config read without remote code;
- ``dtype``: the class always loads bfloat16; ``dtype=float32`` (or ``float16``, ``auto``) loads the weights in
  that dtype instead. The default stays bfloat16, so an idle wrapper equals stock ``qwen3_vl``;
- loglikelihood: lmms-eval's class raises NotImplementedError; ours is Qwen2.5-VL's (``base.chat_loglikelihood``)
  with the class's image path (patch 16, no second resize) and chat template (``enable_thinking``).
"""

from __future__ import annotations

import contextlib
import sys


from .base import TechniqueSpec, read_family_config, refuse_family, wrapper_classes
from .qwen import QwenTechniqueMixin

FAMILY = "qwen3_vl"
SIMPLE_MODULE = "lmms_eval.models.simple.qwen3_vl"

# lmms-eval 0.7.3 qwen3_vl's own constructor arguments, passed through untouched.
QWEN3_ARGS = (
    "device",
    "device_map",
    "batch_size",
    "use_cache",
    "attn_implementation",
    "min_pixels",
    "max_pixels",
    "total_pixels",
    "max_num_frames",
    "fps",
    "system_prompt",
    "interleave_visuals",
    "enable_thinking",
    "reasoning_prompt",
)


def check_qwen3_vl(pretrained: str):
    """The checkpoint's config (read without remote code); a ModelArgsError for anything but a Qwen3-VL checkpoint."""
    need = "a dense Qwen3-VL checkpoint (model_type qwen3_vl), e.g. Qwen/Qwen3-VL-4B-Instruct"
    return read_family_config(pretrained, FAMILY, FAMILY, need)


@contextlib.contextmanager
def resolving_model_class(dtype: str):
    """lmms-eval's qwen3_vl picks its model class from a config read with trust_remote_code=True and loads it in
    bfloat16: for the duration of the constructor it gets Qwen3VLForConditionalGeneration (the checkpoint was
    checked without remote code), loading in ``dtype``."""
    from transformers import Qwen3VLForConditionalGeneration

    module = sys.modules[SIMPLE_MODULE]
    real = module._resolve_model_class

    class _Loader:
        @staticmethod
        def from_pretrained(name, **kwargs):
            kwargs["dtype"] = dtype
            return Qwen3VLForConditionalGeneration.from_pretrained(name, **kwargs)

    module._resolve_model_class = lambda pretrained, is_moe: (_Loader, "dtype")
    try:
        yield
    finally:
        module._resolve_model_class = real


class _WhenAsked:
    """An executor whose work runs when its result is asked for, in the caller's thread."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args, **kwargs):
        future = type("Deferred", (), {})()
        future.result = lambda: fn(*args, **kwargs)
        return future


@contextlib.contextmanager
def one_request_at_a_time():
    """lmms-eval's simple qwen3_vl prepares request i+1 (processor call included) in a thread while request i is
    generated; with this, request i+1 is prepared when its turn comes, so the processor's last call is always
    the request being answered. Same inputs, same answers; only the overlap goes."""
    module = sys.modules[SIMPLE_MODULE]
    real = module.ThreadPoolExecutor
    module.ThreadPoolExecutor = _WhenAsked
    try:
        yield
    finally:
        module.ThreadPoolExecutor = real


class Qwen3TechniqueMixin(QwenTechniqueMixin):
    """TechniqueMixin in front of lmms-eval's qwen3_vl (simple or chat); only the family seams differ."""

    # lmms-eval's qwen3_vl batches itself like qwen2_5_vl (left padding; the model's forward places each row's
    # M-RoPE positions and DeepStack features), one image per request here
    batch_families = {"qwen3_vl": None}
    family = FAMILY
    family_args = QWEN3_ARGS
    default_pretrained = "Qwen/Qwen3-VL-4B-Instruct"  # lmms-eval's own default
    vision_info_kwargs = {"image_patch_size": 16}
    processor_kwargs = {"do_resize": False}

    def loading(self, dtype: str):
        return resolving_model_class(dtype)

    def check_checkpoint(self, pretrained: str, revision, trust_remote_code: bool) -> None:
        self._pretrained_path = pretrained
        config = check_qwen3_vl(pretrained)
        refuse_family(self.spec, config.model_type, pretrained)

    def generate_until(self, requests):
        with one_request_at_a_time():
            return super().generate_until(requests)

    def _chat_prompt(self, messages: list) -> str:
        return self._apply_chat_template([messages])[0]


def qwen3_vl_wrapper_classes(spec: TechniqueSpec, module: str):
    """The (simple, chat) lmms-eval classes of one qwen3_vl_* name."""
    from lmms_eval.models.chat.qwen3_vl import Qwen3_VL as Qwen3Chat
    from lmms_eval.models.simple.qwen3_vl import Qwen3_VL as Qwen3Simple

    return wrapper_classes(spec, module, mixin=Qwen3TechniqueMixin, bases=(Qwen3Simple, Qwen3Chat))
