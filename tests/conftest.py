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


# ------------------------------------------------------------------------------------ test tiers
# Markers are declared in setup.cfg ([tool:pytest] markers) and applied here, by file or by test
# name, so the test files themselves carry no tier bookkeeping. docs/CONTRIBUTING.md has the
# commands; the fast tier is `python -m pytest -m "not cli and not parity and not slow"`.

# Files whose every test runs lmms-eval end to end (a subprocess of `python -m lmms_eval`, the
# in-process evaluator on a real task, or a training run launched as a command).
CLI_FILES = {
    "test_bf16_inference.py",
    "test_cli_batch.py",
    "test_cli_knockout_reprompt.py",
    "test_cli_pai.py",
    "test_cli_pm.py",
    "test_lochead_cli.py",
    "test_scaleout.py",
    "test_shapeworld_cli.py",
    "test_shapeworld_retrain.py",
}
# Files that mix unit tests with a few end-to-end runs: only the named tests are `cli`.
CLI_TESTS = {
    "test_llava_next.py": {"test_technique_through_the_cli", "test_lochead_through_the_cli"},
    "test_gemma3.py": {"test_cli_gemma3_names"},
    "test_internvl.py": {"test_cli_internvl_hf_names"},
    "test_lochead_families.py": {"test_qwen_heads_auto_through_the_cli"},
    "test_paint.py": {"test_cli_chat_and_simple", "test_cli_on_shapeworld_tiny"},
    "test_pm_families.py": {"test_cli_qwen2_5_vl_pm"},
    "test_qwen.py": {
        "test_cli_every_working_name_answers_like_stock_when_idle",
        "test_cli_active_techniques_and_a_refusal",
        "test_cli_first_token_pope_on_qwen_and_gemma3",
    },
    "test_qwen_reprompt.py": {"test_cli_reprompt_and_pai_cfg"},
    "test_qwen3_vl.py": {"test_cli_qwen3_vl_names"},
    "test_recipes.py": {"test_reproduce_on_the_testbed_through_the_cli_writes_the_table_and_resumes"},
    "test_shapeworld_llava.py": {"test_stock_llava_hf_and_a_wrapper_load_it_in_the_cli"},
    "test_viral_families.py": {"test_qwen2_5_vl_viral_through_the_lmms_eval_cli"},
    "test_viral_train.py": {"test_llava_viral_through_the_lmms_eval_cli"},
}
# Tests that run no lmms-eval evaluation but take far longer than the rest of the fast tier (tens of
# seconds each on 2 loaded cores, about a third of its time): head discovery over a real lmms-eval
# task (its task index is built each time), and a teacher test that builds a Depth Anything model.
SLOW_TESTS = {
    "test_lochead.py": {"test_discovery_killed_midway_resumes_from_the_partial_file"},
    "test_lochead_families.py": {
        "test_qwen_heads_file_from_discovery_loads_into_the_wrapper",
        "test_discover_heads_command_on_next_names_its_block",
    },
    "test_viral.py": {"test_other_local_teachers_load_and_give_patch_features[depth_anything]"},
}


def _named(item, table):
    names = table.get(item.path.name)
    if not names:
        return False
    # a renamed test must not silently change tier: every listed name has to exist in its module
    missing = sorted(n for n in names if not hasattr(item.module, n.split("[")[0]))
    if missing:
        raise pytest.UsageError(f"tests/conftest.py names tests that {item.path.name} does not define: {missing}")
    return item.originalname in names or item.name in names  # a name, or one parametrization: name[id]


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.path.name
        if name.startswith("test_parity_"):
            item.add_marker(pytest.mark.parity)
        if name in CLI_FILES or _named(item, CLI_TESTS):
            item.add_marker(pytest.mark.cli)
        if _named(item, SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
