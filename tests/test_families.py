"""The family adapters (methods/families/): the registry, what the techniques derive from them, and
the rule that no technique tests a family's name."""

import ast
import re
from pathlib import Path

import pytest
import torch

from methods import families, paint
from methods.geometry import GeometryError

ROOT = Path(__file__).resolve().parents[1]


def test_every_adapter_answers_the_questions_techniques_ask():
    assert set(families.supported()) >= {"gemma3", "llava", "llava_next", "llava_onevision", "qwen2_5_vl"}
    for model_type, fam in families.ADAPTERS.items():
        assert model_type in fam.model_types and fam.display_name
        assert type(fam).blocks is not families.Family.blocks, model_type  # its own layout
        assert type(fam).embed_image is not families.Family.embed_image, model_type
        if fam.mrope:
            assert type(fam).rope_index is not families.Family.rope_index, model_type
        assert fam.vision_cls or fam.vision_tower, model_type  # a refusal names the tower


def test_unknown_family_is_named_with_the_supported_ones():
    with pytest.raises(GeometryError, match="model_type 'paligemma'; supported: gemma3, internvl, llava, llava_next"):
        families.adapter("paligemma")


def test_what_is_derived_from_the_adapters():
    # PAINT refuses exactly the towers without CLS and the tokens that merge several patches
    assert set(paint.REFUSED) == {
        t for t, f in families.ADAPTERS.items() if not f.vision_cls or f.patches_per_token > 1
    }
    assert "llava_onevision" in paint.REFUSED and "llava_next" not in paint.REFUSED
    # every family's layout inputs travel with a forward over the image
    for fam in families.ADAPTERS.values():
        assert set(fam.request_inputs) <= set(families.IMAGE_KEYS)
    assert families.IMAGE_KEYS[0] == "pixel_values"

    from lmms_eval_plugins.base import LLAVA_FAMILIES

    assert LLAVA_FAMILIES == ("llava", "llava_next", "llava_onevision")


def _name_tests(path: Path, root: Path = ROOT) -> list[str]:
    """Comparisons of anything with a registered model_type string (``x == "llava"``, ``x in ("qwen2_5_vl",)``)."""
    names = set(families.ADAPTERS)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        for side in [node.left, *node.comparators]:
            consts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            if any(isinstance(c, ast.Constant) and c.value in names for c in consts):
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_no_technique_tests_a_family_name():
    """Family knowledge lives in the adapters; a technique asks them (square_grid, vision_cls, ...)."""
    files = list((ROOT / "methods").glob("*.py"))
    assert files
    assert [hit for p in files for hit in _name_tests(p)] == []


def test_the_name_scan_finds_a_family_branch(tmp_path):
    """The scan above can fail: a branch on a name is found."""
    p = tmp_path / "m.py"
    p.write_text(
        'def f(req):\n    if req.family == "qwen2_5_vl":\n        return 1\n    return req.family in ("llava_next",)\n'
    )
    assert _name_tests(p, tmp_path) == ["m.py:2", "m.py:4"]


@pytest.mark.parametrize(
    "config_class, stock, shown",
    [
        ("LlavaConfig", "llava_hf", "LLaVA-1.5"),
        ("Qwen3VLConfig", "qwen3_vl", "Qwen3-VL"),
        ("InternVLConfig", "internvl_hf", "InternVL (HF)"),
    ],
)
def test_one_image_refusals_name_the_familys_own_class(config_class, stock, shown):
    """A request without exactly one image, or without image tokens, names the family's stock lmms-eval class and its
    display name, not LLaVA's on every family."""
    import transformers
    from PIL import Image

    from methods.technique import Request, RequestError

    config = getattr(transformers, config_class)()
    req = Request(input_ids=torch.tensor([[1, 2, 3]]), image_token_id=7, prompt_len=3, config=config)
    with pytest.raises(RequestError, match=f"has 0; use a single-image task \\(or stock {stock} for text-only"):
        req.require_one_image("pai")
    with_image = Request(torch.tensor([[1, 2, 3]]), 7, 3, images=[Image.new("RGB", (8, 8))], config=config)
    with pytest.raises(RequestError, match=f"no image token \\(id 7\\).*insert {re.escape(shown)}'s image tokens"):
        with_image.require_one_image("pai")
