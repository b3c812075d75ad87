"""The InternVL (HF-native) wrappers: the techniques inside lmms-eval's own ``internvl_hf`` class.

Everything family-independent is ``base.TechniqueMixin``'s; the family itself (tiles, thumbnail, pixel
shuffle, embeddings) is its adapter, methods/families/internvl.py. This module fills in the seams:

- the classes: lmms-eval 0.7.3 has only a chat ``internvl_hf`` (``lmms_eval.models.chat.internvl_hf``,
  registered for the name ``internvl_hf``), which builds each prompt with the processor's chat template
  from the task's messages and calls ``self.processor(images=..., text=..., min_patches=..., max_patches=...)``.
  Each internvl_hf_* name sits on it (the default); its simple class (``--force_simple``) is that same
  class answering lmms-eval's simple requests: a generation request's context and images become the one
  user turn lmms-eval's chat tasks build (images first, then the text), and loglikelihood, which the class
  lacks, is ``base.chat_loglikelihood`` with the prompt built the same way. Loglikelihood tasks (first-token
  POPE) need ``--force_simple``: lmms-eval builds chat tasks for generation only;
- the checkpoint check: ``model_type == "internvl"`` (HF-native checkpoints, e.g. OpenGVLab/InternVL3_5-8B-HF;
  the remote-code ones go to lmms-eval's internvl/internvl2/internvl3 classes, which our hooks cannot see);
- the tiling: the class's ``min_patches``/``max_patches`` are copied onto the image processor, so the geometry
  (and PM's magnified image) tile the image exactly as the class's processor calls do;
- batches: the class asserts ``batch_size == 1`` in its constructor, so it is given 1 and ``batching.py`` batches
  for it (as for llava_hf), each request's prompt built as the class builds it alone (``batch_prompt``);
- ``trust_remote_code`` stays off (the class's own default); ``dtype``: the class always loads bfloat16,
  ``dtype=float32`` (or ``float16``, ``auto``) loads the weights in that dtype instead (the default stays
  bfloat16, so an idle wrapper equals stock ``internvl_hf``).
"""

from __future__ import annotations

import dataclasses
import functools


from .base import (
    Bfloat16ClassMixin,
    TechniqueSpec,
    chat_loglikelihood,
    read_family_config,
    refuse_family,
    wrapper_classes,
)

FAMILY = "internvl_hf"
MODEL_TYPE = "internvl"

# lmms-eval 0.7.3 internvl_hf's own constructor arguments, passed through untouched.
INTERNVL_ARGS = (
    "revision",
    "device",
    "device_map",
    "batch_size",
    "min_patches",
    "max_patches",
    "num_frames",
    "fps",
    "trust_remote_code",
    "low_cpu_mem_usage",
    "attn_implementation",
    "use_cache",
)


def check_internvl(pretrained: str, revision=None, trust_remote_code: bool = False):
    """The checkpoint's config; a ModelArgsError for anything but an HF-native InternVL checkpoint."""
    need = (
        "an HF-native InternVL checkpoint (model_type internvl), e.g. OpenGVLab/InternVL3_5-8B-HF "
        "(remote-code InternVL checkpoints are not supported)"
    )
    return read_family_config(pretrained, MODEL_TYPE, FAMILY, need, revision, trust_remote_code)


def user_turn(context: str, visuals: list) -> list[dict]:
    """The one user turn lmms-eval's chat tasks build from a document: its images, then its text."""
    content = [{"type": "image", "url": v} for v in visuals]
    return [{"role": "user", "content": content + [{"type": "text", "text": context.replace("<image>", "")}]}]


def _flat(visuals) -> list:
    return [v for group in visuals or [] for v in (group if isinstance(group, list) else [group])]


class InternVLTechniqueMixin(Bfloat16ClassMixin):
    """TechniqueMixin in front of lmms-eval's internvl_hf (chat, or its simple twin); only the family seams differ."""

    # lmms-eval's internvl_hf asserts batch_size == 1: it gets 1, and batching.py batches for it (left padding;
    # each image's tiles and thumbnail in the tower's batch, each row's tokens where its prompt puts them)
    batch_families = {"internvl": None}

    family = FAMILY
    family_args = INTERNVL_ARGS
    default_pretrained = "OpenGVLab/InternVL3_5-8B-HF"  # lmms-eval's own default
    processor_attr = "processor"
    loads = ("lmms_eval.models.chat.internvl_hf", "InternVLForConditionalGeneration")

    def __init__(self, pretrained: str | None = None, **kwargs):
        super().__init__(pretrained=pretrained, **kwargs)
        self.batch_size_per_gpu = self.check_batch_size(kwargs.get("batch_size", 1))  # the class was given 1
        image_processor = self.processor.image_processor
        image_processor.min_patches, image_processor.max_patches = int(self.min_patches), int(self.max_patches)

    def device_args(self, base: dict) -> dict:
        return {**super().device_args(base), "batch_size": 1}  # the class asserts it; our batches are batching.py's

    def batch_prompt(self, args) -> tuple[str, list]:
        """The simple twin's request as the chat request it becomes (``simple_internvl_hf``)."""
        if not self.is_simple:
            return super().batch_prompt(args)
        ctx, _, doc_to_visual, doc_id, task, split = args
        visuals = _flat(doc_to_visual(self.task_dict[task][split][doc_id]))
        text = self.processor.apply_chat_template(user_turn(ctx, visuals), tokenize=False, add_generation_prompt=True)
        return text, visuals

    def check_checkpoint(self, pretrained: str, revision, trust_remote_code: bool) -> None:
        config = check_internvl(pretrained, revision, trust_remote_code)
        refuse_family(self.spec, config.model_type, pretrained)

    def score_continuations(self, requests) -> list:
        """lmms-eval's internvl_hf has no loglikelihood; ours (``chat_loglikelihood``) builds the prompt as its
        generation does: the user turn (images, then the context) through the chat template and processor."""
        return chat_loglikelihood(self, requests, self._encode_continuation)

    def _encode_continuation(self, context: str, continuation: str, visuals: list):
        prompt = self.processor.apply_chat_template(
            user_turn(context, visuals), tokenize=False, add_generation_prompt=True
        )
        patches = {"min_patches": self.min_patches, "max_patches": self.max_patches}
        encoded = [
            self.processor(images=list(visuals) or None, text=t, return_tensors="pt", **patches)
            for t in (prompt, prompt + continuation)
        ]
        return encoded[0], encoded[1]


@functools.cache
def simple_internvl_hf():
    """lmms-eval's internvl_hf answering simple requests (``--force_simple``): each (context, gen_kwargs,
    doc_to_visual, ...) request becomes the chat request of the user turn a chat task would build."""
    from lmms_eval.models.chat.internvl_hf import InternVLHf

    class InternVLHfSimple(InternVLHf):
        is_simple = True

        def generate_until(self, requests):
            chat = []
            for r in requests:
                ctx, gen_kwargs, doc_to_visual, doc_id, task, split = r.args
                messages = functools.partial(_simple_messages, ctx, doc_to_visual)
                chat.append(dataclasses.replace(r, arguments=(ctx, messages, gen_kwargs, doc_id, task, split)))
            return super().generate_until(chat)

    return InternVLHfSimple


def _simple_messages(ctx: str, doc_to_visual, doc) -> list[dict]:
    return user_turn(ctx, _flat(doc_to_visual(doc)))


def internvl_wrapper_classes(spec: TechniqueSpec, module: str):
    """The (simple, chat) lmms-eval classes of one internvl_hf_* name."""
    from lmms_eval.models.chat.internvl_hf import InternVLHf

    return wrapper_classes(spec, module, mixin=InternVLTechniqueMixin, bases=(simple_internvl_hf(), InternVLHf))
