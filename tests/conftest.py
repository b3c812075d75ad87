import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "tasks"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A random LLaVA with grouped-query attention (4 query heads, 2 kv heads)."""
    from lmms_eval_plugins.testing import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="session")
def tiny_mha_ckpt(tmp_path_factory):
    """The same geometry with plain multi-head attention."""
    from lmms_eval_plugins.testing import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava_mha"), kv_heads=4, seed=1)


def load(ckpt, attn="sdpa"):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(ckpt, attn_implementation=attn).eval()
    return model, AutoProcessor.from_pretrained(ckpt)


def make_inputs(processor, text="is there a red circle in the image?", size=(40, 30), color=(200, 30, 30)):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    image = Image.new("RGB", size, color)
    # a little structure, so attention is not uniform
    for x in range(size[0] // 2):
        image.putpixel((x, x % size[1]), (10, 200, 10))
    return processor(images=[image], text=prompt, return_tensors="pt"), image, prompt


@pytest.fixture
def tiny(tiny_ckpt):
    torch.manual_seed(0)
    model, processor = load(tiny_ckpt)
    inputs, image, prompt = make_inputs(processor)
    return model, processor, inputs
