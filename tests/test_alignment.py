"""Alignment metrics: the Platonic reference's outputs (fixtures), and an independent numpy
calculation of the same definitions on small random matrices."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from methods import alignment

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official" / "cknna"


def _np_hsic(K, L, unbiased):
    m = K.shape[0]
    if not unbiased:
        H = np.eye(m) - np.ones((m, m)) / m
        return np.trace(K @ H @ L @ H)
    K0, L0 = K.copy(), L.copy()
    np.fill_diagonal(K0, 0)
    np.fill_diagonal(L0, 0)
    return ((K0 * L0.T).sum() + K0.sum() * L0.sum() / ((m - 1) * (m - 2)) - 2 * (K0 @ L0).sum() / (m - 2)) / (
        m * (m - 3)
    )


def _np_knn(M, k, include_self):
    """0/1 matrix: row i's k largest entries, by explicit sorting."""
    n = M.shape[0]
    out = np.zeros((n, n))
    for i in range(n):
        candidates = [j for j in range(n) if include_self or j != i]
        for j in sorted(candidates, key=lambda j: -M[i, j])[:k]:
            out[i, j] = 1
    return out


def _np_cknna(x, y, k, unbiased):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    K, L = x @ x.T, y @ y.T
    mk, ml = _np_knn(K, k, not unbiased), _np_knn(L, k, not unbiased)

    def sim(A, B, ma, mb):
        return _np_hsic(ma * mb * A, ma * mb * B, unbiased)

    return sim(K, L, mk, ml) / (math.sqrt(sim(K, K, mk, mk) * sim(L, L, ml, ml)) + 1e-6)


def _np_cka(x, y, unbiased):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    K, L = x @ x.T, y @ y.T
    return _np_hsic(K, L, unbiased) / (math.sqrt(_np_hsic(K, K, unbiased) * _np_hsic(L, L, unbiased)) + 1e-6)


def test_metrics_equal_the_platonic_reference_outputs():
    """Fixtures from minyoungg/platonic-rep @ dcd76ba metrics.py (bench/parity/cknna_reference.py)."""
    provenance = json.loads((FIXTURES / "provenance.json").read_text())
    assert provenance["commit"].startswith("dcd76ba")
    inputs = load_file(str(FIXTURES / "inputs.safetensors"))
    cases = json.loads((FIXTURES / "cases.json").read_text())
    assert len(cases) == 4
    for case in cases:
        x, y = inputs[f"{case['pair']}.x"], inputs[f"{case['pair']}.y"]
        for key, want in case["values"].items():
            if key == "cka":
                got = alignment.cka(x, y)
            elif key == "unbiased_cka":
                got = alignment.cka(x, y, unbiased=True)
            else:
                metric, k = key.rsplit("_k", 1)
                if metric == "mutual_knn":
                    # the reference builds its masks in float32
                    assert alignment.mutual_knn(x, y, int(k)) == pytest.approx(want, abs=1e-6), (case["pair"], key)
                    continue
                got = alignment.cknna(x, y, int(k), unbiased=metric.endswith("_unbiased"))
            # same float64 arithmetic up to summation order
            assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (case["pair"], key)


@pytest.mark.parametrize("seed", [0, 1])
def test_cka_and_cknna_match_an_independent_calculation(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(20, 6))
    y = x[:, :4] @ rng.normal(size=(4, 5)) + 0.8 * rng.normal(size=(20, 5))  # related, not identical
    for unbiased in (False, True):
        assert alignment.cka(torch.tensor(x), torch.tensor(y), unbiased=unbiased) == pytest.approx(
            _np_cka(x, y, unbiased), rel=1e-9
        )
        for k in (3, 7):
            got = alignment.cknna(torch.tensor(x), torch.tensor(y), topk=k, unbiased=unbiased)
            assert got == pytest.approx(_np_cknna(x, y, k, unbiased), rel=1e-9)


def test_identical_features_give_one_and_rotation_leaves_the_metrics_unchanged():
    rng = np.random.default_rng(2)
    x = torch.tensor(rng.normal(size=(30, 8)))
    y = torch.tensor(rng.normal(size=(30, 5)))
    assert alignment.cka(x, x) == pytest.approx(1.0, abs=1e-4)  # the reference's +1e-6 in the denominator
    assert alignment.cknna(x, x, topk=5) == pytest.approx(1.0, abs=1e-3)
    assert alignment.mutual_knn(x, x, topk=5) == 1.0
    q, _ = torch.linalg.qr(torch.tensor(rng.normal(size=(8, 8))))
    for unbiased in (False, True):
        assert alignment.cka(3.0 * x @ q, y, unbiased) == pytest.approx(alignment.cka(x, y, unbiased), rel=1e-9)
        # rotations keep inner products, so the neighbour structure and CKNNA too
        assert alignment.cknna(x @ q, y, 5, unbiased) == pytest.approx(alignment.cknna(x, y, 5, unbiased), rel=1e-9)
    # unrelated features align less than related ones
    related = x[:, :5] + 0.1 * torch.tensor(rng.normal(size=(30, 5)))
    assert alignment.cknna(x, y, topk=5) < alignment.cknna(x, related, topk=5)


def test_cknna_bad_topk():
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="topk"):
        alignment.cknna(x, x, topk=4)
    with pytest.raises(ValueError, match="topk"):
        alignment.cknna(x, x, topk=1)  # the reference refuses topk < 2 too


def test_layerwise_alignment_rows():
    torch.manual_seed(0)
    ref = [torch.randn(16, 3) for _ in range(3)]
    states = [[r @ torch.randn(3, 6), torch.randn(16, 6)] for r in ref]  # layer 0: a linear map of ref
    table = alignment.layerwise_alignment(states, ref, topk=5, max_rows=40)
    assert [row["layer"] for row in table] == [0, 1]
    assert table[0]["cka"] > table[1]["cka"] and table[0]["cknna"] > table[1]["cknna"]


# `lmms-plugins alignment` beyond LLaVA-1.5 (LLaVA-1.5 itself: tests/test_viral_train.py)
SIZES = ((100, 37), (37, 100), (48, 40), (64, 64))


def _family_positions(name, config, processor, inputs, image):
    """Written from the family's layout, not from VIRAL's aligned_block: Qwen3-VL every image token on the merged
    grid of image_grid_thw; InternVL the thumbnail, the geometry's base block (the processor's tiling)."""
    from methods.families import image_geometry

    if name == "qwen3_vl":
        thw = inputs["image_grid_thw"][0]
        pos = (inputs["input_ids"][0] == config.image_token_id).nonzero().flatten()
        return pos, (int(thw[1]) // 2, int(thw[2]) // 2)
    base = image_geometry(config, processor, image.size, inputs["input_ids"]).base
    return base.positions, base.grid_hw


@pytest.fixture(scope="module")
def family_ckpts(tmp_path_factory):
    from test_viral import _save_tiny_dinov2

    from lmms_eval_plugins import testing

    root = tmp_path_factory.mktemp("alignment_families")
    images = root / "img"
    images.mkdir()
    for i, size in enumerate(SIZES):
        img = Image.new("RGB", size, (235, 235, 225))
        img.paste((200, 30, 30), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
        img.save(images / f"{i}.png")
    return {
        "qwen3_vl": testing.build_tiny_qwen3_vl(root / "qwen3_vl"),
        "internvl": testing.build_tiny_internvl(root / "internvl"),
        "teacher": _save_tiny_dinov2(root / "teacher"),
        "images": images,
    }


@pytest.mark.parametrize("family", ["qwen3_vl", "internvl"])
def test_alignment_command_reads_the_familys_aligned_tokens(family, family_ckpts, tmp_path):
    """The command's table on Qwen3-VL (merged grids that differ per image) and InternVL (the thumbnail) equals
    CKNNA/CKA computed here from the model's hidden states at the family's image tokens and the teacher
    resampled to each image's grid."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from lmms_eval_plugins.cli import main
    from methods import viral_teachers

    ckpt, teacher = family_ckpts[family], family_ckpts["teacher"]
    args = ["alignment", "--model", f"base={ckpt}", "--images", str(family_ckpts["images"]), "--topk", "3"]
    assert main([*args, "--reference", str(teacher), "--output-dir", str(tmp_path)]) == 0
    table = json.loads((tmp_path / "alignment.json").read_text())["tables"]["base"]

    config = AutoConfig.from_pretrained(ckpt)
    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    processor = AutoProcessor.from_pretrained(ckpt)
    backbone = viral_teachers.BackboneTeacher.from_pretrained(str(teacher))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe this image ."}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    states, reference, grids = [], [], set()
    for i in range(len(SIZES)):
        image = Image.open(family_ckpts["images"] / f"{i}.png").convert("RGB")
        inputs = processor(images=[image], text=prompt, return_tensors="pt")
        pos, grid = _family_positions(family, config, processor, inputs, image)
        with torch.no_grad():
            hidden = model(**inputs, output_hidden_states=True).hidden_states
        states.append([h[0, pos].float() for h in hidden])
        reference.append(viral_teachers.teacher_targets_from_images(backbone, [image], grid, None)[0])
        grids.add(grid)
    if family == "qwen3_vl":
        assert len(grids) > 1  # each image its own merged grid
    else:
        assert grids == {(4, 4)}  # the thumbnail: 64 px / 8 px patches, pixel-shuffled
    expected = alignment.layerwise_alignment(states, reference, topk=3)
    assert [r["layer"] for r in table] == list(range(config.text_config.num_hidden_layers + 1))
    for ours, ref in zip(table, expected):
        assert ours["cknna"] == pytest.approx(ref["cknna"], abs=1e-6) and ours["cka"] == pytest.approx(
            ref["cka"], abs=1e-6
        )


@pytest.mark.parametrize("family", ["qwen3_vl", "internvl"])
def test_alignment_self_reference_is_refused_where_tokens_are_not_patches(family, family_ckpts, tmp_path):
    from lmms_eval_plugins.cli import main

    args = ["alignment", "--model", f"base={family_ckpts[family]}", "--images", str(family_ckpts["images"])]
    with pytest.raises(SystemExit, match="--reference self is LLaVA-1.5's .* pass a teacher backbone directory"):
        main([*args, "--reference", "self", "--output-dir", str(tmp_path)])


def test_alignment_refuses_models_of_another_geometry(family_ckpts, tmp_path):
    """Models are compared row for row with the first model's reference: another family's grids are refused."""
    from lmms_eval_plugins.cli import main

    args = ["alignment", "--model", f"a={family_ckpts['qwen3_vl']}", "--model", f"b={family_ckpts['internvl']}"]
    args += ["--images", str(family_ckpts["images"]), "--reference", str(family_ckpts["teacher"])]
    with pytest.raises(SystemExit, match="b's aligned grids .* differ from the first model's"):
        main([*args, "--output-dir", str(tmp_path)])
