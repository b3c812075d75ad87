"""llava_lochead preset=official / official_v2 against golden fixtures of the official localization-heads code.

The fixtures (tests/fixtures/official/lochead/) were written by bench/parity/lochead_official.py: the
official analysis (seilk/LocalizationHeads @ 8ce33b0, "HEAD": analyze_attention_file; the authors'
rewrite 9ffe219, "v2": analyze_heads and the box steps of pipeline.py) run unmodified, under the numpy
2.2.6 and scipy 1.15.3 that 8ce33b0 pins (its entropies are float32 there, float64 under numpy 1.x), on the
attention of the LLaVA-1.5-shaped tiny model of bench/parity/tiny_llava15.py (original layout,
LLaVA-1.5's forward in the official stack, the official prompt form as ids). Here the same weights are
rebuilt from the seed in the llava-hf layout, our hook layer captures the last prompt token's attention,
and our official steps must give the same rankings and boxes. No official code or stack is needed.

Tolerances: maps come from another attention implementation (transformers 4.37 eager vs our hook
layer): 1e-5; entropies 1e-6 on the official maps, 2e-5 on ours. Elbows, v2's top-5, masks and boxes
must be equal; rankings are compared outside near-ties (official entropies within 2e-5 may sort either
way, depending on the CPU) and apart from heads whose entropy flips with capture noise (at most 8 in
8 x 1024); v2's kept set may differ by at most 2 heads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lmms_eval_plugins.testing import assert_ranked_alike, load_parity_script
from methods import hooks, lochead, lochead_heads, lochead_maps, lochead_official
from methods.technique import Request

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "official" / "lochead"
MAP_ATOL = 1e-5
ENTROPY_ATOL = 1e-6  # same maps
CAPTURED_ENTROPY_ATOL = 2e-5  # our captured maps (< 1e-6 off the official ones): measured <= 5e-6
GRID = (24, 24)

pytestmark = pytest.mark.skipif(not (FIX / "lochead_official.json").exists(), reason="lochead fixtures not generated")


def _tiny():
    return load_parity_script("tiny_llava15")


@pytest.fixture(scope="module")
def fixtures():
    return (
        json.loads((FIX / "lochead_official.json").read_text()),
        np.load(FIX / "arrays.npz"),
        json.loads((FIX / "provenance.json").read_text()),
    )


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


@pytest.fixture(scope="module")
def model(tiny, fixtures):
    torch.set_num_threads(1)
    m = tiny.model_of(fixtures[2])
    hooks.install(m)
    return m


@pytest.fixture(scope="module")
def captured(model, tiny, fixtures):
    """Our capture (all layers, last prompt row, image keys) for every fixture sample."""
    fx, _, _ = fixtures
    pixels = tiny.fixed_pixels(len(fx["samples"]))
    out = []
    for i, s in enumerate(fx["samples"]):
        ids = tiny.hf_ids(s["before"], s["after"])
        pos = hooks.image_positions(ids, tiny.IMAGE_TOKEN_ID)
        assert int(pos[0]) == s["begin_pos_vis"]
        out.append(lochead_maps.capture_image_maps(model, {"input_ids": ids, "pixel_values": pixels[i : i + 1]}, pos))
    return out


def test_capture_matches_official_attention(captured, fixtures):
    fx, arrays, _ = fixtures
    for i, maps in enumerate(captured):
        sums = np.array(lochead_official._head_sums(maps))
        assert np.abs(sums - arrays[f"s{i}_sums"]).max() < MAP_ATOL
        for (l, h), ref in zip(arrays[f"s{i}_shown_heads"], arrays[f"s{i}_shown_maps"]):
            assert np.abs(maps[l, h].numpy() - ref).max() < MAP_ATOL


def _agree(ours: dict, ref: np.ndarray, n_heads: int = 32) -> set:
    """Heads whose entropy (on our captured maps) equals the official one; the others are threshold flips."""
    same = set()
    for (l, h), e in ours.items():
        r = ref[l * n_heads + h]
        if (not math.isfinite(e) and not math.isfinite(r)) or (
            math.isfinite(e) and math.isfinite(r) and abs(e - r) < CAPTURED_ENTROPY_ATOL
        ):
            same.add((l, h))
    return same


def test_head_entropy_on_official_maps_is_exact(fixtures):
    """HEAD's entropy (mean threshold, 0.001 binarisation, relu-mass shares) on the official maps themselves."""
    fx, arrays, _ = fixtures
    for i in range(len(fx["samples"])):
        for (l, h), m in zip(arrays[f"s{i}_shown_heads"], arrays[f"s{i}_shown_maps"]):
            ref = arrays[f"s{i}_head_entropy"][l * 32 + h]
            se = lochead_official.official_spatial_entropy(torch.from_numpy(m).reshape(GRID))[0]
            if math.isfinite(ref):
                assert abs(se - ref) < ENTROPY_ATOL


def test_head_ranking_matches_official(captured, fixtures):
    """HEAD: elbow as a flattened head index, entropy at the mean, stable sort. Our captured maps differ from
    the official ones by < 1e-6; a cell that close to the 0.001 binarisation flips a component (measured:
    a few heads in 8 x 1024); apart from those heads, the ranking is the official one."""
    fx, arrays, _ = fixtures
    flips = 0
    for i, (maps, s) in enumerate(zip(captured, fx["samples"])):
        assert (
            lochead_official.official_elbow_head_index(lochead_official._head_sums(maps)) == s["head"]["threshold_idx"]
        )
        ranked = lochead_official.rank_heads_official(maps, GRID)
        same = _agree({(r["layer"], r["head"]): r["spatial_entropy"] for r in ranked}, arrays[f"s{i}_head_entropy"])
        flips += 32 * 32 - len(same)
        # the order is compared outside near-ties of the official entropies (the values agree within
        # CAPTURED_ENTROPY_ATOL; heads closer than that, e.g. 2.7133391 vs 2.7133389, sort by the CPU's last bits)
        ref_entropy = {(l, h): float(arrays[f"s{i}_head_entropy"][l * 32 + h]) for l in range(32) for h in range(32)}
        ours = [(r["layer"], r["head"]) for r in ranked if (r["layer"], r["head"]) in same]
        assert_ranked_alike(
            ours, [tuple(lh) for lh in s["head"]["ranking"] if tuple(lh) in same], ref_entropy, CAPTURED_ENTROPY_ATOL
        )
        top10 = [tuple(lh) for lh in lochead_official.select_heads(maps, GRID, "official", per_sample=10)]
        ref10 = [tuple(t[:2]) for t in s["head"]["top10"] if t[2] is not None][:10]
        assert len(top10) == len(ref10), f"sample {i}"
        assert_ranked_alike(top10, ref10, ref_entropy, CAPTURED_ENTROPY_ATOL)
    assert flips <= 8, flips


def test_v2_selection_and_box_match_official(captured, fixtures):
    """9ffe219: elbow value, 2x-mean entropy, layers 0-1 and bottom-row heads dropped; the top-5 box."""
    fx, arrays, _ = fixtures
    for i, (maps, s) in enumerate(zip(captured, fx["samples"])):
        assert lochead_official.official_elbow_value(lochead_official._head_sums(maps)) == pytest.approx(
            s["v2"]["threshold_value"], abs=1e-6
        )
        kept = lochead_official.rank_heads_official_v2(maps, GRID)
        ref_kept = [tuple(lh) for lh in s["v2"]["kept"]]
        ref_se = dict(zip(ref_kept, arrays[f"s{i}_v2_kept_entropy"]))
        ours_se = {(r["layer"], r["head"]): r["spatial_entropy"] for r in kept}
        same = {lh for lh in ours_se if lh in ref_se and abs(ours_se[lh] - ref_se[lh]) < CAPTURED_ENTROPY_ATOL}
        assert len(set(ours_se) ^ set(ref_se)) + len(set(ours_se) - same) <= 2, f"sample {i}"
        # the order: official entropies along our ranking never decrease by more than the capture noise
        along = [ref_se[lh] for lh in ours_se if lh in same]
        assert all(b >= a - 2 * CAPTURED_ENTROPY_ATOL for a, b in zip(along, along[1:]))
        top = [(r["layer"], r["head"]) for r in kept[: fx["v2_top_k"]]]
        assert [list(lh) for lh in top] == s["v2"]["top"]
        combined = lochead_maps.combine_head_maps(torch.stack([maps[l, h].reshape(GRID) for l, h in top]), 1.0)
        assert np.abs(combined.numpy() - arrays[f"s{i}_v2_combined"]).max() < MAP_ATOL
        mask = ["".join("1" if v else "0" for v in row) for row in (combined > combined.mean()).tolist()]
        assert mask == s["v2"]["mask"]
        grid_box = lochead_official.official_box_grid(combined)
        assert list(grid_box) == s["v2"]["bbox_grid"]
        assert list(lochead_official.official_box_pixels(grid_box, s["image_size"], 24)) == s["v2"]["bbox_img"]


def test_preset_official_v2_answers_the_official_box(model, tiny, fixtures):
    """The technique itself (heads=self, selection=official_v2, box_scaling=stretch): the official pixel box / (W, H)."""
    fx, _, _ = fixtures
    pixels = tiny.fixed_pixels(len(fx["samples"]))
    technique = lochead.LocHead(
        "self", top_k=5, sigma=1.0, box_mode="minmax", selection="official_v2", box_scaling="stretch"
    )
    for i, s in enumerate(fx["samples"][:3]):
        ids = tiny.hf_ids(s["before"], s["after"])
        req = Request(
            input_ids=ids,
            image_token_id=tiny.IMAGE_TOKEN_ID,
            prompt_len=ids.shape[1],
            images=[Image.new("RGB", tuple(s["image_size"]))],
        )
        located = technique.locate(model, req, input_ids=ids, pixel_values=pixels[i : i + 1])
        assert [list(lh) for lh in located.heads] == s["v2"]["top"]
        w, h = s["image_size"]
        px0, py0, px1, py1 = s["v2"]["bbox_img"]
        assert located.box == pytest.approx([px0 / w, py0 / h, (px1 + 1) / w, (py1 + 1) / h], abs=1.0 / min(w, h))


@pytest.mark.parametrize("name", ["uniform", "one_blob", "two_blobs_and_a_speck", "faint", "random", "bottom_row"])
def test_entropy_and_box_on_synthetic_maps(fixtures, name):
    """Edge cases: no relu mass (+inf), relu mass but no component above 0.001 (HEAD: 0, ranked best), an empty box (0,0,0,0)."""
    fx, arrays, _ = fixtures
    ref = fx["synthetic"][name]
    grid = torch.from_numpy(arrays[f"syn_{name}"])
    for version, factor in (("head", 1.0), ("v2", 2.0)):
        se, _, n = lochead_official.official_spatial_entropy(grid, factor)
        expected = ref[version]["entropy"]
        assert (se if math.isfinite(se) else None) == (
            pytest.approx(expected, abs=ENTROPY_ATOL) if expected is not None else None
        )
        assert n == ref[version]["num_components"]
    grid_box = lochead_official.official_box_grid(lochead_maps.combine_head_maps(grid[None], 1.0))
    assert list(grid_box) == ref["v2"]["bbox_grid"]
    assert list(lochead_official.official_box_pixels(grid_box, (640, 480), 24)) == ref["v2"]["bbox_img"]


def test_elbows(fixtures):
    """HEAD returns a head index, 9ffe219 a value. Ties in the sort are numpy-version dependent
    (np.argsort's default sort is not stable): on a tie only the elbow's value must agree."""
    fx, _, _ = fixtures
    for name, ref in fx["elbow"].items():
        values = ref["values"]
        idx = lochead_official.official_elbow_head_index(values)
        assert idx == ref["head_index"] or values[idx] == values[ref["head_index"]], name
        assert lochead_official.official_elbow_value(values) == ref["v2_value"]


def test_frequency_ranking_over_official_top10(captured, fixtures):
    """Neither official version ranks by selection frequency (the paper's step); ours over HEAD's top-10s."""
    fx, _, _ = fixtures
    result = lochead_heads.DiscoveryResult(num_layers=32, num_heads=32)
    for maps, _sample in zip(captured, fx["samples"]):
        ranked = lochead_official.rank_heads_official(maps, GRID)
        entropy = {(r["layer"], r["head"]): r["spatial_entropy"] for r in ranked}
        result.add(
            lochead_official.select_heads(maps, GRID, "official", 10),
            lochead_maps.image_attention_sum(maps),
            entropy,
            0,
        )
    counts = {}
    for s in fx["samples"]:
        for l, h, e in s["head"]["top10"]:
            if e is not None:
                counts[(l, h)] = counts.get((l, h), 0) + 1
    assert {(r["layer"], r["head"]): r["count"] for r in result.ranked()} == counts


def test_provenance_is_complete(fixtures):
    _, _, prov = fixtures
    assert prov["repositories"]["head"]["commit"].startswith("8ce33b0")
    assert prov["repositories"]["v2"]["commit"].startswith("9ffe219")
    assert len(prov["shim"]["cpu_shim_sha256"]) == 64 and len(prov["shim"]["stubs_sha256"]) == 64
    assert prov["model"]["fingerprint"] and prov["official_stack"]["pip_freeze"]
    # the analysis ran with the numpy and scipy 8ce33b0 pins (dependency_pip.txt): numpy decides the entropies' dtype
    stack, pins = prov["official_stack"], prov["pinned_by_head"]
    assert (stack["numpy"], stack["scipy"]) == (pins["numpy"], pins["scipy"]) == ("2.2.6", "1.15.3")
    assert f"numpy=={stack['numpy']}" in stack["pip_freeze"] and f"scipy=={stack['scipy']}" in stack["pip_freeze"]


def test_entropies_are_float32_as_under_the_pinned_numpy(fixtures):
    """numpy 2.2.6 (NEP 50) keeps HEAD's ``component_sum / total`` float32 (a Python float no longer promotes a
    numpy float32 scalar), so every official entropy is a float32 number, and so is ours."""
    fx, arrays, _ = fixtures
    stack = torch.from_numpy(arrays["stack_mixed"])
    for values in [arrays[f"s{i}_head_entropy"] for i in range(len(fx["samples"]))] + [
        [r["spatial_entropy"] for r in lochead_official.rank_heads_official(stack, GRID)],
        [r["spatial_entropy"] for r in lochead_official.rank_heads_official_v2(stack, GRID)],
    ]:
        v = np.asarray(values, np.float64)
        v = v[np.isfinite(v)]
        assert v.size and np.array_equal(v.astype(np.float32).astype(np.float64), v)


@pytest.mark.parametrize("name", ["v2_fallback", "mixed"])
def test_whole_analyses_on_synthetic_stacks(fixtures, name):
    """Both analyses end to end on small stacks: 9ffe219's fallback when nothing is kept (layers 0-1 dropped,
    bottom-row heads dropped: the top sum), HEAD's elbow bug and its entropy-0 heads ranked first."""
    fx, arrays, _ = fixtures
    ref = fx["synthetic_stacks"][name]
    stack = torch.from_numpy(arrays[f"stack_{name}"])
    fin = lambda e: e if math.isfinite(e) else None  # noqa: E731
    kept = lochead_official.rank_heads_official_v2(stack, GRID)
    assert [[r["layer"], r["head"]] for r in kept] == [k[:2] for k in ref["v2_kept"]]
    for r, k in zip(kept, ref["v2_kept"]):
        assert (fin(r["spatial_entropy"]) is None) == (k[2] is None)
        if k[2] is not None:
            assert r["spatial_entropy"] == pytest.approx(k[2], abs=ENTROPY_ATOL)
    ranked = lochead_official.rank_heads_official(stack, GRID)
    assert [[r["layer"], r["head"]] for r in ranked] == [k[:2] for k in ref["head_ranking"]]
    for r, k in zip(ranked, ref["head_ranking"]):
        assert (fin(r["spatial_entropy"]) is None) == (k[2] is None)
        if k[2] is not None:
            assert r["spatial_entropy"] == pytest.approx(k[2], abs=ENTROPY_ATOL)
    if name == "mixed":
        # heads (1, 1) and (3, 0) hold one map up to a factor 1.1: equal float32 entropies under numpy 2.2.6
        # (under 1.26 float64 told them apart by 2e-8), so HEAD's stable sort keeps them in (layer, head) order
        se = {(r["layer"], r["head"]): r["spatial_entropy"] for r in ranked}
        ref_se = {(k[0], k[1]): k[2] for k in ref["head_ranking"]}
        assert se[(1, 1)] == se[(3, 0)] and ref_se[(1, 1)] == ref_se[(3, 0)]
