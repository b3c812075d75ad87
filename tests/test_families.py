"""The family adapters (methods/families/): the registry, what the techniques derive from them, and
the rule that no technique tests a family's name."""

import ast
from pathlib import Path

import pytest

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
