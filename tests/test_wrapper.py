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
