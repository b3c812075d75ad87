"""The registered lmms-eval wrappers on the parity harnesses' tiny model, driven as lmms-eval drives them.

``Wrappers`` builds each wrapper class as lmms-eval's evaluator does
(``lmms_eval.models.get_model(name, force_simple=True).create_from_arg_string("pretrained=DIR,<model_args>",
{"batch_size": 1, "device": "cpu"})``) on a checkpoint directory of the tiny LLaVA-1.5-shaped model
(``tiny_llava15.save_lmms_checkpoint``: the fixtures' weights, fingerprint checked, and a word-level
tokenizer and chat template under which a prompt tokenizes to a harness's fixed ids). ``generate`` and
``loglikelihood`` send lmms-eval ``Instance``s through the class's own ``generate_until`` /
``loglikelihood`` and return, besides lmms-eval's answers, what the technique was called with and
returned (recorded around ``technique.generate`` / ``forward``, nothing else changed).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

TASK, SPLIT = "parity", "test"


class Wrappers:
    """Registered wrapper instances per (name, prompt, model_args), built once per test module."""

    def __init__(self, tiny, provenance: dict, root: Path):
        torch.set_num_threads(1)
        self.tiny, self.root = tiny, Path(root)
        self.model = tiny.model_of(provenance)  # fails unless it is the fixtures' model
        self.model_seed, self.fingerprint = provenance["model"]["seed"], tiny.fingerprint(self.model)
        self.checkpoints: dict = {}
        self.built: dict = {}
        self.stock: dict = {}  # the image processor each built class loaded

    def check(self, provenance: dict) -> None:
        """Another fixture's provenance names the same model (same seed and fingerprint)."""
        assert provenance["model"]["seed"] == self.model_seed
        assert self.tiny.matches(self.fingerprint, provenance["model"]["fingerprint"]), "not the fixtures' model"

    def checkpoint(self, before, suffix) -> Path:
        key = (tuple(before), tuple(suffix))
        if key not in self.checkpoints:
            out = self.root / f"prompt{len(self.checkpoints)}"
            self.checkpoints[key] = self.tiny.save_lmms_checkpoint(out, list(before), suffix, model=self.model)
        return self.checkpoints[key]

    def get(self, name: str, model_args: str, before, suffix=None, pixels=None):
        """The ``name`` class (simple, as ``--force_simple``) with ``pretrained=`` the prompt's checkpoint.

        ``pixels``: a tensor for fixed pixels whatever the image, replacing the image processor the class calls
        after construction (the PAI fixtures were made on pixel tensors, not images); None: the image processor
        the wrapper set up (the official presets' ``image_backend=pil``: transformers' PIL backend of the
        checkpoint's CLIP processor, which gives the official stack's pixels bit for bit)."""
        suffix = self.tiny.ASSISTANT_IDS if suffix is None else suffix
        key = (name, model_args, tuple(before), tuple(suffix))
        if key not in self.built:
            from lmms_eval import models

            cls = models.get_model(name, force_simple=True)
            self.built[key] = cls.create_from_arg_string(
                f"pretrained={self.checkpoint(before, suffix)},{model_args}", {"batch_size": 1, "device": "cpu"}
            )
            self.stock[key] = self.built[key]._image_processor.image_processor
        lm, stock = self.built[key], self.stock[key]
        recording = lm._image_processor  # the wrapper's RecordingProcessor around the checkpoint's processor
        recording.image_processor = stock if pixels is None else FixedPixels(stock, pixels)
        return lm


def pil_backend(image_processor):
    """The same CLIP image processor on transformers' PIL backend (PIL bicubic on 8 bits, as 4.37), built by hand:
    the reference for the wrappers' ``image_backend=pil`` (tests/test_wrapper.py)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    keys = ("size", "crop_size", "image_mean", "image_std", "resample", "do_resize", "do_center_crop")
    keys += ("do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb")
    return CLIPImageProcessorPil(**{k: getattr(image_processor, k) for k in keys})


class FixedPixels:
    """The checkpoint's image processor, except that every image's pixels are ``pixels``."""

    def __init__(self, image_processor, pixels: torch.Tensor):
        self.image_processor, self.pixels = image_processor, pixels

    def __getattr__(self, name):
        return getattr(self.image_processor, name)

    def __call__(self, images=None, *args, **kwargs):
        from transformers import BatchFeature

        n = len(images) if isinstance(images, (list, tuple)) else 1
        return BatchFeature({"pixel_values": self.pixels.expand(n, *self.pixels.shape[1:]).clone()})


class Recorded:
    """Records each call of ``lm.technique.<method>`` (the request and the output) while in use.

    ``generate_scores``: the technique's generate is asked for its scores and raw logits too
    (``output_scores``, ``output_logits``, ``return_dict_in_generate``) and lmms-eval still gets the
    sequences alone."""

    def __init__(self, lm, method: str, generate_scores: bool = False):
        self.technique, self.method, self.calls = lm.technique, method, []
        self.scores = generate_scores

    def __enter__(self):
        real = getattr(self.technique, self.method)

        def recording(model, req, **kwargs):
            if self.scores:
                kwargs = {**kwargs, "output_scores": True, "output_logits": True, "return_dict_in_generate": True}
            out = real(model, req, **kwargs)
            self.calls.append((req, out, getattr(self.technique, "last_magnified", None)))
            return out.sequences if self.scores else out

        setattr(self.technique, self.method, recording)
        return self

    def __exit__(self, *exc):
        delattr(self.technique, self.method)  # the class's method again


def _instances(lm, request_type: str, image, arguments: list[tuple]) -> list:
    from lmms_eval.api.instance import Instance

    lm.task_dict = {TASK: {SPLIT: [{"image": image}]}}
    return [
        Instance(
            request_type=request_type,
            arguments=args,
            idx=i,
            metadata={"task": TASK, "doc_id": 0, "repeats": 1},
        )
        for i, args in enumerate(arguments)
    ]


def _visual(doc):
    return [doc["image"]]


def loglikelihood(lm, image: Image.Image, context: str, continuations) -> tuple[list, list]:
    """A multiple_choice task's loglikelihood requests (context, continuation, doc_to_visual, doc_id, task,
    split): lmms-eval's (loss, is_greedy) per continuation, and the technique's forward calls."""
    requests = _instances(lm, "loglikelihood", image, [(context, c, _visual, 0, TASK, SPLIT) for c in continuations])
    with Recorded(lm, "forward") as rec:
        results = [r.text if hasattr(r, "text") else r for r in lm.loglikelihood(requests)]
    return results, rec.calls


def generate(lm, image: Image.Image, context: str, gen_kwargs: dict, scores: bool = False) -> tuple[str, list]:
    """A generate_until request (context, gen_kwargs, doc_to_visual, doc_id, task, split): lmms-eval's answer
    text and the technique's generate calls (with the step scores when ``scores``)."""
    (request,) = _instances(lm, "generate_until", image, [(context, dict(gen_kwargs), _visual, 0, TASK, SPLIT)])
    with Recorded(lm, "generate", generate_scores=scores) as rec:
        (answer,) = lm.generate_until([request])
    return (answer.text if hasattr(answer, "text") else answer), rec.calls
