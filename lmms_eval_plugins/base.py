"""The base wrapper every technique reuses: lmms-eval's ``llava_hf``, with a technique inside.

``wrapper_classes(spec)`` returns the simple and chat classes for one model name. They
subclass lmms-eval's own ``llava_hf`` classes and change only this:

- ``--model_args`` are parsed and validated against the technique's declared parameters
  (plus llava_hf's own), with presets; bad values fail at construction;
- ``device_map`` defaults to the device (llava_hf's empty default fails on transformers 5),
  and under ``accelerate launch`` each process takes its own device and its share of requests;
- the checkpoint must be an interleaved LLaVA model; ``batch_size`` > 1 runs a left-padded batch per
  generate call where the technique and family can (each request's answer equals batch size 1; llava_hf
  itself generates one request at a time, so ``lmms_eval_plugins/batching.py`` batches for it) and is refused
  with the reason where they cannot;
- the model is switched to the hooked attention implementation (bit-identical while idle),
  and ``self.model`` hands lmms-eval a thin view whose ``generate`` and ``__call__`` run the
  technique; everything else is the real model;
- the preprocessing model_args (``pad_to_square``, ``image_backend``) apply in one place, the processor the
  class calls (``RecordingProcessor``, ``use_image_backend``); ``baseline=true`` keeps them and builds no
  technique: the family's own class on the same pixels (``lmms-plugins compare --run``'s baseline);
- an error inside the technique is raised as ``TechniqueError``, which lmms-eval's blanket
  ``except Exception`` around generation cannot turn into a silent empty answer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import types
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from loguru import logger

from methods import families, hooks
from methods.technique import Batch, Request, RequestError, Technique, left_offsets, mean_colour, pad_to_square

from methods.params import ModelArgsError, Param, parse_params

# llava_hf's own constructor arguments, passed through untouched (except the defaults noted).
LLAVA_HF_ARGS = (
    "revision",
    "device",
    "dtype",
    "batch_size",
    "trust_remote_code",
    "attn_implementation",
    "device_map",
    "chat_template",
    "use_cache",
    "max_frames_num",
)

COMMON_PARAMS = (
    Param("save_visuals", str, "", "directory for PNG visuals of the first samples (empty: none)"),
    Param("max_visuals", int, 8, "how many samples get saved visuals", low=0),
    Param("cache_chunk", int, 16, "with --use_cache: answers are made durable every this many requests", low=1),
    Param(
        "pad_to_square",
        bool,
        False,
        "pad each image to a centred square of the processor's mean colour before the processor (original LLaVA-1.5's expand2square; llava-hf's processor alone centre-crops)",
    ),
    Param(
        "image_backend",
        str,
        "default",
        "the image processor's backend: default (the checkpoint's processor as the family's lmms-eval class loads it: "
        "transformers 5's torchvision backend) | pil (the same processor and settings on transformers' PIL backend: "
        "PIL resampling on 8-bit images, as transformers 4.x's processors that the official code runs)",
        choices=("default", "pil"),
    ),
    Param(
        "baseline",
        bool,
        False,
        "run as the family's own class: the technique is neither built nor applied (the hook layer stays idle); "
        "pad_to_square and image_backend still apply (compare --run's baseline for a technique that preprocesses)",
    ),
)
# The common args that change the pixels the model sees; a baseline must share them (commands/compare.py).
PREPROCESSING = {p.name: p.default for p in COMMON_PARAMS if p.name in ("pad_to_square", "image_backend")}


class TechniqueError(BaseException):
    """A technique failed on a request. Derives from BaseException on purpose: lmms-eval's
    llava_hf catches every Exception in generation and records an empty answer, which would
    hide a broken technique inside the scores."""


@dataclasses.dataclass(frozen=True)
class TechniqueSpec:
    """A registered model name: its parameters, presets, and how to build the technique."""

    name: str
    params: Sequence[Param]
    build: Callable[[dict, Any], Technique]  # (params, model) -> Technique
    presets: dict = dataclasses.field(default_factory=dict)
    aliases: tuple = ()
    doc: str = ""
    refused: dict = dataclasses.field(default_factory=dict)  # model_type -> why this technique refuses that family


def resolve_pretrained(name: str) -> str:
    """Map project-shipped checkpoint names (``shapeworld-tiny``) to their directory."""
    try:
        from .shapeworld import resolve_pretrained as resolve_shapeworld
    except ImportError:  # the testbed package is optional at import time
        return name
    return str(resolve_shapeworld(name))


# The model types lmms-eval's llava_hf loads whose image tokens are interleaved with the text
# (one image_token_id per token): the family adapters that sit on llava_hf (methods/families/).
LLAVA_FAMILIES = tuple(sorted(t for t, f in families.ADAPTERS.items() if f.lmms_eval_model == "llava_hf"))


def read_config(pretrained: str, revision: str | None = None, trust_remote_code: bool = False):
    """The checkpoint's config, or a ModelArgsError saying why it cannot be read."""
    from transformers import AutoConfig

    if os.path.isdir(pretrained) and not (Path(pretrained) / "config.json").exists():
        raise ModelArgsError(
            f"pretrained={pretrained} is a directory without config.json: not a transformers checkpoint"
        )
    try:
        return AutoConfig.from_pretrained(pretrained, revision=revision or "main", trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelArgsError(f"pretrained={pretrained}: cannot read its config ({e})") from e


def check_interleaved_llava(pretrained: str, revision: str | None = None, trust_remote_code: bool = False):
    """The checkpoint's config; refuse, with a message, checkpoints that are not interleaved LLaVA models
    (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision HF ports)."""
    config = read_config(pretrained, revision, trust_remote_code)
    if getattr(config, "model_type", None) not in LLAVA_FAMILIES or getattr(config, "image_token_id", None) is None:
        raise ModelArgsError(
            f"pretrained={pretrained} is a {getattr(config, 'model_type', 'unknown')!r} checkpoint; these techniques need "
            f"an interleaved LLaVA checkpoint (model_type {' / '.join(LLAVA_FAMILIES)} with image_token_id), "
            "e.g. llava-hf/llava-1.5-7b-hf, llava-hf/llava-v1.6-mistral-7b-hf, "
            f"llava-hf/llava-onevision-qwen2-7b-ov-hf or shapeworld-tiny; {other_families('llava_hf')}"
        )
    return config


def other_families(lmms_eval_model: str) -> str:
    """Where the other families' checkpoints go (a message's tail): "Qwen2.5-VL checkpoints go to the qwen2_5_vl_* names, ..."."""
    names = {}
    for _, fam in sorted(families.ADAPTERS.items()):
        if fam.lmms_eval_model != lmms_eval_model:
            names.setdefault(fam.name_prefix, []).append(fam.display_name)
    return ", ".join(f"{' / '.join(shown)} checkpoints go to the {prefix}_* names" for prefix, shown in names.items())


def read_family_config(
    pretrained: str,
    model_type: str,
    lmms_eval_model: str,
    need: str,
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """The checkpoint's config; a ModelArgsError unless its model_type is ``model_type`` (a family's
    checkpoint check): "the <lmms_eval_model>_* wrappers need <need>", then where other families go."""
    config = read_config(pretrained, revision, trust_remote_code)
    if getattr(config, "model_type", None) != model_type:
        raise ModelArgsError(
            f"pretrained={pretrained} is a {getattr(config, 'model_type', 'unknown')!r} checkpoint; the "
            f"{lmms_eval_model}_* wrappers need {need}; {other_families(lmms_eval_model)}"
        )
    return config


@contextlib.contextmanager
def loading_dtype(module_name: str, class_name: str, dtype: str):
    """lmms-eval classes that hard-code ``torch_dtype=torch.bfloat16`` (qwen2_5_vl, gemma3) load in ``dtype``
    instead, for the duration of their constructor: ``class_name`` as ``module_name`` imported it."""
    module = sys.modules[module_name]
    real = getattr(module, class_name)
    if dtype == "bfloat16":
        yield
        return

    class _Loader:
        @staticmethod
        def from_pretrained(name, **kwargs):
            kwargs.pop("torch_dtype", None)
            return real.from_pretrained(name, dtype=dtype, **kwargs)

    setattr(module, class_name, _Loader)
    try:
        yield
    finally:
        setattr(module, class_name, real)


def refuse_family(spec: TechniqueSpec, model_type: str | None, pretrained: str) -> None:
    """ModelArgsError when ``spec`` refuses checkpoints of ``model_type`` (the README support matrix's reasons)."""
    why = spec.refused.get(model_type)
    if why:
        raise ModelArgsError(f"{spec.name} does not support {model_type} checkpoints (pretrained={pretrained}): {why}")


def check_layers_routed(name: str, model, pretrained: str) -> None:
    """ModelArgsError when a layer the technique edits or reads does not go through AttentionInterface
    (hooks.UnroutedLayers: a hybrid linear-attention stack), naming the technique and the layer type."""
    try:
        hooks.attention_modules(model)
    except hooks.UnroutedLayers as e:
        raise ModelArgsError(f"{name} cannot run on pretrained={pretrained}: {e}") from None


# The image options a class may call its processor with (lmms-eval's qwen3_vl: do_resize=False), recorded so
# that a technique re-processes an image as the prompt's was.
IMAGE_CALL_KEYS = ("do_resize", "size", "min_pixels", "max_pixels")


def pil_image_processor(image_processor):
    """``image_processor`` with its settings on transformers' PIL backend (``image_backend=pil``): the class that
    transformers' image-processor mapping pairs with it, built from its ``to_dict()``; ModelArgsError when there is
    none. An image processor already on the PIL backend is returned as it is."""
    import transformers
    from transformers.image_processing_backends import PilBackend
    from transformers.models.auto import image_processing_auto as auto

    if isinstance(image_processor, PilBackend):
        return image_processor
    name = type(image_processor).__name__
    pil = next((m.get("pil") for m in auto.IMAGE_PROCESSOR_MAPPING_NAMES.values() if name in m.values()), None)
    cls = auto.get_image_processor_class_from_name(pil) if pil else None
    if cls is None:
        raise ModelArgsError(
            f"image_backend=pil: the checkpoint's image processor {name} has no PIL backend in transformers "
            f"{transformers.__version__}; use image_backend=default"
        )
    return cls.from_dict(image_processor.to_dict())


def use_image_backend(processor, backend: str) -> None:
    """Put the processor's image processor on ``backend`` (the ``image_backend`` model_arg), in place."""
    if backend == "default":
        return
    if not hasattr(processor, "image_processor"):
        raise ModelArgsError(
            f"image_backend={backend}: the class's processor {type(processor).__name__} has no image_processor; "
            "use image_backend=default"
        )
    processor.image_processor = pil_image_processor(processor.image_processor)


class RecordingProcessor:
    """The processor as lmms-eval uses it, remembering the last call's images and text
    (a technique such as the Perception Magnifier needs the original full-resolution image)."""

    def __init__(self, processor, pad_to_square: bool = False):
        self.__dict__["_processor"] = processor
        self.__dict__["last_images"] = []
        self.__dict__["last_pads"] = []
        self.__dict__["last_text"] = None
        self.__dict__["last_texts"] = []  # every prompt of the last call (a batch: one per request)
        self.__dict__["last_image_kwargs"] = {}
        self.__dict__["_pad_fill"] = mean_colour(processor) if pad_to_square else None

    def _pad(self, images):
        """pad_to_square: every image on its mean-colour square (one place for every wrapper); records the pads."""
        flat = [im for group in images for im in (group if isinstance(group, list) else [group])]
        if self._pad_fill is None:
            self.__dict__["last_pads"] = []
            return images, flat
        padded = [pad_to_square(im, self._pad_fill) for im in flat]
        self.__dict__["last_pads"] = [p for _, p in padded]
        squares = iter([im for im, _ in padded])
        regrouped = [[next(squares) for _ in g] if isinstance(g, list) else next(squares) for g in images]
        return regrouped, [im for im, _ in padded]

    def __call__(self, *args, **kwargs):
        if "images" in kwargs:  # generation and the loglikelihood continuation call pass images
            images = kwargs["images"] or []
            if images:
                kwargs["images"], flat = self._pad(images)
            else:
                flat = []
            self.__dict__["last_images"] = flat
            self.__dict__["last_image_kwargs"] = {k: kwargs[k] for k in IMAGE_CALL_KEYS if k in kwargs}
            text = kwargs.get("text")
            self.__dict__["last_text"] = text[0] if isinstance(text, list) else text
            self.__dict__["last_texts"] = list(text) if isinstance(text, list) else [text]
            if not images:  # transformers 5 fails on images=[]; the technique reports "no image" itself
                kwargs["images"] = None
        elif self.last_images and _mentions_image(kwargs.get("text"), self._processor):
            # lmms-eval 0.7.3's simple llava_hf tokenizes the loglikelihood context with its
            # <image> but without the image, which transformers 5 refuses. The context is only
            # used for its length (to mask labels), so hand the request's image back.
            kwargs["images"] = self.last_images  # already padded
        return self._processor(*args, **kwargs)

    def apply_chat_template(self, conversation, *args, **kwargs):
        """Classes that hand images inside chat messages (lmms-eval's gemma3: JPEG data URLs) reach the
        processor through here: each image is loaded as the processor would load it, padded with
        pad_to_square, recorded, and handed on as that PIL image, so the processor sees what is recorded."""
        if not kwargs.get("tokenize"):
            return self._processor.apply_chat_template(conversation, *args, **kwargs)
        from transformers.image_utils import load_image

        batched = bool(conversation) and isinstance(conversation[0], list)
        copied, items = [], []
        for conv in conversation if batched else [conversation]:
            copied.append([dict(m) for m in conv])
            for m in copied[-1]:
                if isinstance(m.get("content"), list):
                    m["content"] = [dict(block) for block in m["content"]]
                    items += [block for block in m["content"] if block.get("type") == "image"]
        images = []
        for block in items:
            key = next(k for k in ("image", "url", "path", "base64") if k in block)
            images.append(load_image(block.pop(key)))
        padded, flat = self._pad(images)
        for block, image in zip(items, padded):
            block["image"] = image
        self.__dict__["last_images"] = flat
        self.__dict__["last_image_kwargs"] = {}
        text = self._processor.apply_chat_template(
            copied, add_generation_prompt=kwargs.get("add_generation_prompt", False), tokenize=False
        )
        self.__dict__["last_text"] = text[0] if isinstance(text, list) else text
        self.__dict__["last_texts"] = list(text) if isinstance(text, list) else [text]
        return self._processor.apply_chat_template(copied if batched else copied[0], *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def __setattr__(self, name, value):
        setattr(self._processor, name, value)


def _mentions_image(text, processor) -> bool:
    token = getattr(processor, "image_token", "<image>")
    texts = text if isinstance(text, list) else [text]
    return any(isinstance(t, str) and token in t for t in texts)


def prompt_length(input_ids, labels=None) -> int:
    """Prompt tokens of a request: all of them, or (loglikelihood) those before the first label."""
    if labels is not None:
        answer = (labels[0] != -100).nonzero()
        return int(answer[0]) if answer.numel() else input_ids.shape[1]
    return input_ids.shape[1]


def family_request(model, processor: RecordingProcessor, model_kwargs: dict) -> Request | Batch:
    """The ``Request`` of one generate/forward call, with the processor outputs the family's adapter
    names (``request_inputs``: ``image_sizes`` for anyres LLaVA, ``image_grid_thw`` for Qwen2.5-VL);
    a ``Batch`` of them for a call with several prompts (``family_batch``)."""
    geometry_inputs = families.adapter(model.config).request_inputs
    input_ids = model_kwargs["input_ids"]
    if input_ids.shape[0] > 1:
        return family_batch(model, processor, model_kwargs)
    return Request(
        input_ids=input_ids,
        image_token_id=model.config.image_token_id,
        prompt_len=prompt_length(input_ids, model_kwargs.get("labels")),
        images=list(processor.last_images),
        text=processor.last_text,
        processor=processor._processor,
        pads=list(processor.last_pads),
        config=model.config,
        inputs={k: model_kwargs[k] for k in geometry_inputs if model_kwargs.get(k) is not None},
        image_kwargs=dict(processor.last_image_kwargs),
    )


def family_batch(model, processor: RecordingProcessor, model_kwargs: dict) -> Batch:
    """A left-padded batch of prompts as a ``Batch``: each request exactly as ``family_request`` would build it for
    its prompt alone (its row without the padding, its image, its rows of the processor outputs); one image per
    prompt, in prompt order (how lmms-eval's classes hand them to the processor)."""
    ids, labels, mask = model_kwargs["input_ids"], model_kwargs.get("labels"), model_kwargs.get("attention_mask")
    n = ids.shape[0]
    offsets = left_offsets(mask) if mask is not None else [0] * n
    images, pads, texts = list(processor.last_images), list(processor.last_pads), list(processor.last_texts)
    if len(images) != n:
        raise RequestError(f"a batch of {n} prompts came with {len(images)} images; batches need one image per prompt")
    geometry_inputs = families.adapter(model.config).request_inputs
    requests = []
    for i, off in enumerate(offsets):
        row = ids[i : i + 1, off:]
        requests.append(
            Request(
                input_ids=row,
                image_token_id=model.config.image_token_id,
                prompt_len=prompt_length(row, None if labels is None else labels[i : i + 1, off:]),
                images=[images[i]],
                text=texts[i] if len(texts) == n else None,
                processor=processor._processor,
                pads=[pads[i]] if len(pads) == n else [],
                config=model.config,
                inputs={k: model_kwargs[k][i : i + 1] for k in geometry_inputs if model_kwargs.get(k) is not None},
                image_kwargs=dict(processor.last_image_kwargs),
            )
        )
    return Batch(requests, offsets, ids, mask)


class TechniqueModel:
    """What lmms-eval sees as ``self.model``: the real model, with generate/forward run by the technique.

    ``make_request(model, processor, model_kwargs) -> Request`` builds the request (``family_request``
    by default; see ``TechniqueMixin.build_request``)."""

    def __init__(self, model, technique: Technique, processor: RecordingProcessor, name: str, make_request=None):
        self.__dict__.update(
            _model=model,
            _technique=technique,
            _processor=processor,
            _name=name,
            _make_request=make_request or family_request,
        )

    def __getattr__(self, name):
        return getattr(self._model, name)

    def _request(self, input_ids, labels=None, **model_kwargs) -> Request:
        return self._make_request(
            self._model, self._processor, {"input_ids": input_ids, "labels": labels, **model_kwargs}
        )

    def _run(self, what: str, kwargs):
        try:
            req = self._make_request(self._model, self._processor, kwargs)
            fn = self._technique.generate if what == "generate" else self._technique.forward
            return fn(self._model, req, **kwargs)
        except TechniqueError:
            raise
        except Exception as e:
            raise TechniqueError(f"{self._name}: {type(e).__name__}: {e}") from e

    def generate(self, **kwargs):
        return self._run("generate", kwargs)

    def __call__(self, **kwargs):
        return self._run("forward", kwargs)


def _calling_response_cache():
    """The lmms-eval ResponseCache whose execute() is calling the model, if any.

    lmms-eval hands the cache to its evaluator only; its execute() calls
    ``getattr(lm, reqtype)(requests)``, so the caller's frame is the one place to find it.
    """
    frame = sys._getframe(1)
    for _ in range(4):
        frame = frame.f_back
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if frame.f_code.co_name == "execute" and type(owner).__name__ == "ResponseCache":
            return owner
    return None


def _with_copied_kwargs(request):
    args = tuple(dict(a) if isinstance(a, dict) else a for a in request.arguments)
    return dataclasses.replace(request, arguments=args)


def _publish(cache) -> None:
    """Merge this run's cached answers into <cache root>/cache.db now.

    lmms-eval merges a run into cache.db only when the run finishes, and a new run reads only
    cache.db: without this, the answers of a killed run would never be found again.
    """
    from lmms_eval.caching import response_cache as rc

    root = cache._cache_root
    with rc._merge_lock(os.path.join(root, rc._LAYERED_RUNS_DIRNAME, rc._LAYERED_LOCK_DIRNAME)):
        rc.ResponseCache.merge_shards([cache.db_path], os.path.join(root, "cache.db"))


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class TechniqueMixin:
    """Mixed in front of lmms-eval's LlavaHf (simple or chat). See the module docstring.

    Everything family-independent lives here (parameters, presets, recipe logging,
    TechniqueError, cache/resume, accelerate sharding). A second model family (e.g. a
    ``qwen2_5_vl`` wrapper base) subclasses this mixin and overrides only the family seams:
    ``family``, ``family_args``, ``default_pretrained``, ``processor_attr``, ``batch_families``,
    ``class_batches``, ``check_checkpoint``, ``device_args`` and ``build_request``.
    """

    spec: TechniqueSpec
    family = "llava_hf"  # the lmms-eval class this mixin sits in front of (named in messages)
    family_args: tuple = LLAVA_HF_ARGS  # that class's own constructor arguments, passed through
    default_pretrained = "llava-hf/llava-1.5-7b-hf"
    processor_attr = "_image_processor"  # where that class keeps the processor it calls on every request
    # model_type -> None (batch_size > 1 tested equal to batch size 1 per request) or why a batch is refused there
    batch_families: dict = {"llava": None, "llava_next": None, "llava_onevision": None}
    class_batches = False  # whether the lmms-eval class batches generation itself (llava_hf does not: batching.py)

    def __init__(self, pretrained: str | None = None, **kwargs):
        spec = self.spec
        base = {k: kwargs.pop(k) for k in list(kwargs) if k in self.family_args}
        all_params = (*spec.params, *COMMON_PARAMS)
        try:
            params = parse_params(all_params, kwargs, spec.presets, owner=spec.name)
        except ModelArgsError as e:
            raise ModelArgsError(f"{e}; {self.family} arguments also accepted: {', '.join(self.family_args)}") from None
        batch_size = self.check_batch_size(base.get("batch_size", 1))
        pretrained = resolve_pretrained(str(pretrained or self.default_pretrained))
        trust = bool(base.get("trust_remote_code", False))
        self.check_checkpoint(pretrained, base.get("revision"), trust)
        if batch_size > 1:  # the family's reason, before the class loads anything
            self.check_batching(
                batch_size, pretrained, self.family_batch_refusal(pretrained, base.get("revision"), trust)
            )
        base.update(self.device_args(base))
        super().__init__(pretrained=pretrained, **base)
        _shard_requests(self)
        hooks.install(self._model)
        check_layers_routed(spec.name, self._model, pretrained)
        self.technique_params = params
        processor = getattr(self, self.processor_attr)
        use_image_backend(processor, params["image_backend"])
        setattr(self, self.processor_attr, RecordingProcessor(processor, pad_to_square=params["pad_to_square"]))
        if params["baseline"]:  # the family's class with this preprocessing: no technique (``model`` is the model)
            self.technique = None
            logger.info(f"{spec.name} baseline: no technique; " + ", ".join(f"{k}={params[k]}" for k in PREPROCESSING))
            return
        self.technique = spec.build(params, self._model)
        if batch_size > 1:  # the technique's reason (``Technique.batch_refusal``: its parameters may decide)
            self.check_batching(
                batch_size, pretrained, self.technique.batch_refusal(families.adapter(self._model.config))
            )
        logger.info(f"{spec.name} recipe: {json.dumps(self.technique.describe(), default=str)}")

    # -- family seams ------------------------------------------------------------------

    def check_batch_size(self, batch_size) -> int:
        """The batch size as an int (ModelArgsError below 1); whether the technique can batch is ``check_batching``'s."""
        n = int(float(batch_size))
        if n < 1:
            raise ModelArgsError(f"{self.spec.name}: batch_size={batch_size} is not supported: use 1 or more")
        return n

    def check_batching(self, batch_size: int, pretrained: str, why: str | None) -> None:
        if why:
            raise ModelArgsError(
                f"{self.spec.name}: batch_size={batch_size} is not supported on pretrained={pretrained}: {why}. Use "
                "--batch_size 1 and scale out with `accelerate launch --num_processes N -m lmms_eval ...`"
            )

    def family_batch_refusal(self, pretrained: str, revision: str | None, trust_remote_code: bool) -> str | None:
        """Why the checkpoint's family cannot batch (``batch_families``), or None; read before the class loads it
        (some lmms-eval classes assert batch size 1 in their constructor)."""
        model_type = getattr(read_config(pretrained, revision, trust_remote_code), "model_type", None)
        return self.batch_families.get(
            model_type, f"batched generation is not yet tested equal to batch size 1 on {model_type}"
        )

    def check_checkpoint(self, pretrained: str, revision: str | None, trust_remote_code: bool) -> None:
        """Refuse, with a ModelArgsError naming why, checkpoints of another family (or of a family
        this technique refuses: ``TechniqueSpec.refused``)."""
        config = check_interleaved_llava(pretrained, revision, trust_remote_code)
        refuse_family(self.spec, getattr(config, "model_type", None), pretrained)

    def device_args(self, base: dict) -> dict:
        """The device arguments handed to the family's constructor (defaults and accelerate)."""
        return _device_args(base)

    def batch_prompt(self, args) -> tuple[str, list]:
        """(prompt text, visuals) of one request, as the class builds it alone, for ``batching.py``'s batches
        (classes that do not batch themselves: llava_hf's simple and chat prompts by default)."""
        from .batching import prompt_chat, prompt_simple

        return (prompt_simple if self.is_simple else prompt_chat)(self, args)

    def build_request(self, model, processor: RecordingProcessor, model_kwargs: dict) -> Request:
        """The ``Request`` a technique sees for one generate/forward call of the family's class
        (``model_kwargs``: what the class passed to ``model.generate`` / ``model(...)``)."""
        return family_request(model, processor, model_kwargs)

    def loglikelihood(self, requests):
        if _calling_response_cache() is not None:
            raise ModelArgsError(
                f"{self.spec.name}: --use_cache cannot hold loglikelihood responses in lmms-eval 0.7.3 (its cache "
                "turns (loglikelihood, is_greedy) pairs into text); run loglikelihood tasks without --use_cache"
            )
        # lmms-eval 0.7.3's evaluator passes each response through unwrap_generation_output,
        # which stringifies a bare (loglikelihood, is_greedy) pair; inside a GenerationResult
        # the pair reaches the task's process_results intact.
        from lmms_eval.api.instance import GenerationResult

        return [GenerationResult(text=r) for r in self.score_continuations(requests)]

    def score_continuations(self, requests) -> list:
        """(score, is_greedy) per loglikelihood request: the family class's own ``loglikelihood``; a family
        whose lmms-eval class has none overrides this with ``chat_loglikelihood``."""
        return super().loglikelihood(requests)

    def generate_until(self, requests):
        """With --use_cache, answer in chunks through the cache, so a killed run loses at most one chunk.

        lmms-eval 0.7.3's ResponseCache stores a request type's answers only once the whole
        generate_until call returns; sending it chunk by chunk makes every chunk durable.
        """
        cache = _calling_response_cache()
        chunk = self.technique_params["cache_chunk"]

        def run(reqs):
            # llava_hf adds image_sizes and defaults to each request's gen_kwargs in place, which
            # changes the response cache's key between lookup and store (no hit, ever): give it copies.
            reqs = [_with_copied_kwargs(r) for r in reqs]
            if self.batch_size_per_gpu > 1 and not self.class_batches:
                from .batching import generate_batched

                return generate_batched(self, reqs, super(TechniqueMixin, self).generate_until)
            return super(TechniqueMixin, self).generate_until(reqs)

        if cache is None or len(requests) <= chunk:
            return run(requests)
        direct = types.SimpleNamespace(generate_until=run)
        out = []
        for i in range(0, len(requests), chunk):
            out += cache.execute(direct, "generate_until", requests[i : i + chunk])
            _publish(cache)
        return out

    @property
    def model(self):
        model = super().model
        technique = self.__dict__.get("technique")
        if technique is None:  # still inside llava_hf's constructor, or baseline=true
            return model
        return TechniqueModel(model, technique, getattr(self, self.processor_attr), self.spec.name, self.build_request)


def chat_loglikelihood(lm, requests, encode) -> list[tuple[float, bool]]:
    """loglikelihood for lmms-eval classes that have none (0.7.3's qwen2_5_vl and gemma3), in the convention of
    its llava_hf, which the tasks here read (task_configs/pm_official): per request (score, is_greedy) with
    score = the continuation tokens' mean negative log-likelihood after the prompt (a loss: lower is more
    likely) and is_greedy = every continuation token is the argmax of the logits before it.

    ``encode(context, continuation, visuals) -> (prompt_inputs, full_inputs)``: the family's processor
    outputs for the prompt alone and for prompt + continuation, built as the class builds a generation
    prompt. The forward goes through ``lm.model`` (the technique, with ``labels`` marking the continuation)."""
    res = []
    for context, doc_to_target, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
        doc = lm.task_dict[task][split][doc_id]
        continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
        visuals = doc_to_visual(doc)
        visuals = [v for group in visuals for v in (group if isinstance(group, list) else [group])]
        prompt, full = encode(context.replace("<image>", ""), str(continuation), visuals)
        n = prompt["input_ids"].shape[1]
        full = {k: v.to(lm.device) if hasattr(v, "to") else v for k, v in full.items()}
        labels = full["input_ids"].clone()
        labels[:, :n] = -100
        with torch.inference_mode():
            logits = lm.model(**full, labels=labels).logits
        target = full["input_ids"][:, n:]
        pred = logits[:, n - 1 : -1].float()
        nll = -torch.log_softmax(pred, dim=-1).gather(-1, target[..., None]).mean()
        res.append((float(nll), bool((pred.argmax(-1) == target).all())))
    return res


class Bfloat16ClassMixin(TechniqueMixin):
    """For lmms-eval classes that always load bfloat16 (qwen2_5_vl, gemma3): a ``dtype`` model_arg loads the
    weights in another dtype instead (default bfloat16: an idle wrapper equals the stock class)."""

    loads: tuple[str, str] = ("", "")  # (module, model class name) whose from_pretrained the class calls
    DTYPES = ("bfloat16", "float32", "float16", "auto")

    def __init__(self, pretrained: str | None = None, dtype: str = "bfloat16", **kwargs):
        if str(dtype) not in self.DTYPES:
            raise ModelArgsError(f"{self.spec.name}: dtype={dtype!r}; valid: {', '.join(self.DTYPES)}")
        with self.loading(str(dtype)):
            super().__init__(pretrained=pretrained, **kwargs)

    def loading(self, dtype: str):
        """The context in which the class's constructor loads the weights in ``dtype`` (default: ``loads``' class
        patched by ``loading_dtype``; a class that resolves its model class otherwise overrides this)."""
        return loading_dtype(*self.loads, dtype)

    def device_args(self, base: dict) -> dict:
        return _device_args(base)


def _device_args(base: dict) -> dict:
    """Default device/device_map, one device per process under accelerate."""
    from accelerate import PartialState

    state = PartialState()
    device = str(base.get("device") or _default_device())
    if state.num_processes > 1 and device.startswith("cuda") and ":" not in device:
        device = f"cuda:{state.local_process_index}"
    device_map = base.get("device_map")
    if device_map in (None, ""):
        device_map = device
    return {"device": device, "device_map": device_map}


def _shard_requests(lm) -> None:
    """llava_hf only shards requests for GPU distributed types; do it for any backend (CPU/gloo too)."""
    acc = getattr(lm, "accelerator", None)  # gemma3 keeps one only with several processes
    if acc is not None and acc.num_processes > 1:
        lm._rank = acc.process_index
        lm._world_size = acc.num_processes


def wrapper_classes(spec: TechniqueSpec, module: str, mixin: type = TechniqueMixin, bases: tuple | None = None):
    """The (simple, chat) lmms-eval classes for one technique, defined in ``module``.

    mixin: the family's TechniqueMixin subclass; bases: the family's (simple, chat) lmms-eval
    classes (default: llava_hf's)."""
    if bases is None:
        from lmms_eval.models.chat.llava_hf import LlavaHf as LlavaHfChat
        from lmms_eval.models.simple.llava_hf import LlavaHf as LlavaHfSimple

        bases = (LlavaHfSimple, LlavaHfChat)
    simple_base, chat_base = bases
    camel = "".join(part.capitalize() for part in spec.name.split("_"))
    doc = spec.doc or f"lmms-eval model `{spec.name}`"
    simple = type(camel, (mixin, simple_base), {"spec": spec, "is_simple": True, "__doc__": doc, "__module__": module})
    chat = type(
        camel + "Chat", (mixin, chat_base), {"spec": spec, "is_simple": False, "__doc__": doc, "__module__": module}
    )
    return simple, chat
