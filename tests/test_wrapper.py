"""The base wrapper around lmms-eval's llava_hf: validation, defaults, and loud failures."""

import json

import pytest
import torch
from conftest import make_inputs

from lmms_eval_plugins.base import TechniqueError, TechniqueModel
from methods.params import ModelArgsError


def _pai(**kw):
    from lmms_eval_plugins.models.pai import LlavaPai

    return LlavaPai(**kw)


def test_wrapper_loads_hooks_and_defaults_device_map(tiny_ckpt):
    lm = _pai(pretrained=str(tiny_ckpt), alpha=0.3, start_layer=1.0)  # 1.0: how lmms-eval hands over "1"
    assert lm.device_map == "cpu" and str(lm.device) == "cpu"
    assert lm._model.config._attn_implementation == "hooked_sdpa"
    assert isinstance(lm.model, TechniqueModel)
    assert lm.technique.describe()["layers"] == "1..3"
    assert lm.model.dtype == torch.float32  # everything else is the real model


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"alhpa": 0.1}, "unknown model_args alhpa"),
        ({"alpha": -1}, "alpha=-1.0 is out of range"),
        ({"start_layer": 10}, r"layer range \[10, 4\) is outside the model's 4 language-model layers"),
        ({"end_layer": 9}, r"layer range \[2, 9\) is outside"),
        ({"batch_size": 0}, "batch_size=0 is not supported"),
    ],
)
def test_bad_model_args_fail_at_construction(tiny_ckpt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _pai(pretrained=str(tiny_ckpt), **kwargs)


def test_non_llava_checkpoints_are_refused(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        tmp_path / "llama"
    )
    with pytest.raises(ModelArgsError, match="'llama' checkpoint; these techniques need an interleaved LLaVA"):
        _pai(pretrained=str(tmp_path / "llama"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelArgsError, match="directory without config.json"):
        _pai(pretrained=str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ModelArgsError, match="cannot read its config"):
        _pai(pretrained=str(tmp_path / "broken"))


def test_request_without_image_raises_instead_of_empty_answer(tiny_ckpt):
    lm = _pai(pretrained=str(tiny_ckpt), alpha=0.3)
    text = "USER: is there a red square? ASSISTANT:"
    inputs = lm._image_processor(images=[], text=text, return_tensors="pt")
    with pytest.raises(TechniqueError, match="needs exactly one image per request, but this request has 0"):
        lm.model.generate(**inputs, max_new_tokens=2)
    assert not issubclass(TechniqueError, Exception)  # escapes llava_hf's `except Exception`


def test_two_images_are_refused(tiny_ckpt):
    lm = _pai(pretrained=str(tiny_ckpt), alpha=0.3)
    inputs, image, prompt = make_inputs(lm._image_processor)
    two = lm._image_processor(
        images=[image, image], text=prompt.replace("<image>", "<image> <image>"), return_tensors="pt"
    )
    with pytest.raises(TechniqueError, match="this request has 2"):
        lm.model.generate(**two, max_new_tokens=2)


def test_recipe_is_logged_in_full(tiny_ckpt):
    lm = _pai(pretrained=str(tiny_ckpt), preset="paper")
    recipe = lm.technique.describe()
    assert recipe["use_cfg"] is True and recipe["gamma"] == 1.1 and recipe["alpha"] == 0.2
    json.dumps(recipe)


def test_baseline_is_the_stock_class_on_the_same_pixels(tiny_ckpt):
    """baseline=true with pad_to_square and image_backend=pil (what compare --run runs beside such a technique):
    no technique is built and the preprocessing applies, so pixels, answer and logits equal, bit for bit, stock
    llava_hf's on the image padded by hand through the CLIP processor put on PIL by hand; the same model_args
    without baseline=true run PAI (a strong boost) and change the logits."""
    from _parity_wrappers import pil_backend
    from lmms_eval.models.simple.llava_hf import LlavaHf

    from methods.technique import mean_colour, pad_to_square

    stock = LlavaHf(pretrained=str(tiny_ckpt), device="cpu", device_map="cpu")
    stock._image_processor.image_processor = pil_backend(stock._image_processor.image_processor)
    _, image, prompt = make_inputs(stock._image_processor)  # 40 x 30: the pad matters
    square, _ = pad_to_square(image, mean_colour(stock._image_processor.image_processor))
    args = dict(pretrained=str(tiny_ckpt), alpha=5.0, start_layer=0, use_cfg=False, pad_to_square=True)
    outputs = []
    for lm, seen in (
        (stock, square),
        (_pai(**args, image_backend="pil", baseline=True), image),
        (_pai(**args, image_backend="pil"), image),
    ):
        inputs = lm._image_processor(images=[seen], text=prompt, return_tensors="pt")
        with torch.no_grad():
            outputs.append((inputs, lm.model.generate(**inputs, max_new_tokens=4, do_sample=False), lm.model(**inputs)))
    (want, answer, logits), (got, base_answer, base_logits), (_, _, pai_logits) = outputs
    assert torch.equal(got["pixel_values"], want["pixel_values"]) and torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(base_answer, answer) and torch.equal(base_logits.logits, logits.logits)
    assert not torch.allclose(pai_logits.logits, logits.logits, atol=1e-3)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"image_backend": "torchvision"}, "image_backend='torchvision' is not one of default, pil"),
        ({"baseline": "maybe"}, "baseline='maybe' is not a valid bool"),
    ],
)
def test_bad_preprocessing_args_fail_at_construction(tiny_ckpt, kwargs, message):
    with pytest.raises(ModelArgsError, match=message):
        _pai(pretrained=str(tiny_ckpt), **kwargs)


def test_image_backend_pil_names_a_processor_without_a_pil_backend():
    from transformers import CLIPImageProcessor
    from transformers.image_processing_backends import TorchvisionBackend

    from lmms_eval_plugins.base import pil_image_processor, use_image_backend

    clip = CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    pil = pil_image_processor(clip)
    assert type(pil).__name__ == "CLIPImageProcessorPil" and pil.to_dict() | {"image_processor_type": None} == (
        clip.to_dict() | {"image_processor_type": None}
    )

    class Custom(TorchvisionBackend):  # e.g. a trust_remote_code processor with no PIL sibling
        pass

    with pytest.raises(ModelArgsError, match="image processor Custom has no PIL backend .* use image_backend=default"):
        pil_image_processor(Custom())
    with pytest.raises(ModelArgsError, match="processor object has no image_processor; use image_backend=default"):
        use_image_backend(object(), "pil")
