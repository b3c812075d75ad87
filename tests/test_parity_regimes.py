"""Parity in non-degenerate regimes: our official steps against the official analyses run on planted attention.

A random model never reaches the paths that decide results on a real model (every 9ffe219 box is the
whole grid, the top heads have entropy 0, no PM search goes past 2 refinement passes). The fixtures
(tests/fixtures/official/regimes/) were written by bench/parity/regimes_official.py: the official code
(LocalizationHeads 8ce33b0 and 9ffe219; PM 58c2c0f's ``pm_sample.sample`` with a scripted model as
``self``) run on the planted attention of bench/parity/regimes.py, in the official stack. Here the
same inputs are rebuilt (numpy only, the same bits on every CPU: their sha256 must match), and our
functions must reach the official results:

- lochead: 9ffe219's kept heads, entropies, ranking, top-5, combined map, mask and box (boxes smaller
  than the grid, from heads of non-zero entropy); HEAD's elbow head index, every head's entropy and the
  ranking;
- PM: the search (every pass's deep map, 2-means highlight, cumulative blocked set, exit statistic,
  the stopping pass: 1 to 8 passes, an exit by the threshold and one by max_iteration), H*, the
  enhanced / 8-bit / upsampled map and the magnified image; once on the official per-pass maps, once
  end to end with our own layer map of the scripted model's attention.

Tolerances: the maps are the same numbers on both sides, so only summation order differs: entropies
1e-6, combined maps 1e-6, PM maps and H* exact (the same float32 / float64 arithmetic), orders compared
outside near-ties (``assert_ranked_alike``); every discrete result equal. No official code or stack needed.
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
from methods import lochead_maps, lochead_official, pm, pm_magnify, pm_search

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "official" / "regimes"
GRID = (24, 24)
ENTROPY_ATOL = 1e-6
MAP_ATOL = 1e-6

pytestmark = pytest.mark.skipif(not (FIX / "regimes_official.json").exists(), reason="regime fixtures not generated")


def _regimes():
    return load_parity_script("regimes")


R = _regimes()


@pytest.fixture(scope="module")
def fx():
    return json.loads((FIX / "regimes_official.json").read_text())


@pytest.fixture(scope="module")
def arrays():
    return np.load(FIX / "arrays.npz")


@pytest.fixture(scope="module")
def stacks(fx):
    """The planted [32, 32, 576] stacks, rebuilt; each must be the one the official code ran on."""
    out = {}
    for s in fx["lochead"]["samples"]:
        spec = next(x for x in R.LOCHEAD_SPECS if x["name"] == s["name"])
        assert spec == _as_spec(s["spec"]), "regimes.py's spec changed since the fixtures were written"
        stack = R.lochead_stack(spec)
        assert R.sha256(stack) == s["stack_sha256"], f"{s['name']}: rebuilt maps differ from the official run's"
        out[s["name"]] = torch.from_numpy(stack)
    return out


def _as_spec(d):
    """JSON turned tuples into lists: back to the regimes.py form for comparison."""
    return {
        k: (
            tuple(v)
            if k in ("object", "distractor")
            else [tuple(h) for h in v]
            if k == "heads"
            else [tuple(o) for o in v]
            if k == "objects"
            else v
        )
        for k, v in d.items()
    }


LOCHEAD_NAMES = [s["name"] for s in R.LOCHEAD_SPECS]
PM_NAMES = [s["name"] for s in R.PM_SPECS]


# ---------------------------------------------------------------------------------------
# Localization heads
# ---------------------------------------------------------------------------------------


def _fin(e):
    return e if math.isfinite(e) else None


@pytest.mark.parametrize("name", LOCHEAD_NAMES)
def test_v2_selection_and_box_on_planted_maps(fx, arrays, stacks, name):
    """9ffe219 analyze_heads + pipeline.py:70-74 against ours (rank_heads_official_v2, combine_head_maps,
    official_box_grid, official_box_pixels)."""
    s = next(x for x in fx["lochead"]["samples"] if x["name"] == name)
    stack = stacks[name]
    ref = s["v2"]
    assert lochead_official.official_elbow_value(lochead_official._head_sums(stack)) == pytest.approx(
        ref["threshold_value"], abs=1e-7
    )
    kept = lochead_official.rank_heads_official_v2(stack, GRID)
    ref_kept = {(k[0], k[1]): k[2] for k in ref["kept"]}
    assert {(r["layer"], r["head"]) for r in kept} == set(ref_kept), "kept heads"
    for r in kept:
        e, k = _fin(r["spatial_entropy"]), ref_kept[(r["layer"], r["head"])]
        assert (e is None) == (k is None) and (e is None or abs(e - k) < ENTROPY_ATOL), (r, k)
    value = {lh: (e if e is not None else math.inf) for lh, e in ref_kept.items()}
    assert_ranked_alike(
        [(r["layer"], r["head"]) for r in kept], [tuple(k[:2]) for k in ref["kept"]], value, ENTROPY_ATOL
    )
    top = [(r["layer"], r["head"]) for r in kept[: fx["lochead"]["v2_top_k"]]]
    assert [list(lh) for lh in top] == ref["top"]
    combined = lochead_maps.combine_head_maps(torch.stack([stack[l, h].reshape(GRID) for l, h in top]), 1.0)
    np.testing.assert_allclose(combined.numpy(), arrays[f"lh/{name}/v2_combined"], atol=MAP_ATOL, rtol=0)
    assert ref["mean_margin"] > 2 * MAP_ATOL, "a cell at the mean: the mask would be CPU-dependent"
    mask = ["".join("1" if v else "0" for v in row) for row in (combined > combined.mean()).tolist()]
    assert mask == ref["mask"]
    box = lochead_official.official_box_grid(combined)
    assert list(box) == ref["bbox_grid"]
    assert list(lochead_official.official_box_pixels(box, tuple(s["image_size"]), 24)) == ref["bbox_img"]


@pytest.mark.parametrize("name", LOCHEAD_NAMES)
def test_head_ranking_on_planted_maps(fx, arrays, stacks, name):
    """HEAD analyze_attention_file against ours (official_elbow_head_index, rank_heads_official, select_heads)."""
    s = next(x for x in fx["lochead"]["samples"] if x["name"] == name)
    stack = stacks[name]
    assert lochead_official.official_elbow_head_index(lochead_official._head_sums(stack)) == s["head"]["threshold_idx"]
    ranked = lochead_official.rank_heads_official(stack, GRID)
    ref_e = arrays[f"lh/{name}/head_entropy"]
    ours_e = np.full(32 * 32, np.nan)
    for r in ranked:
        ours_e[r["layer"] * 32 + r["head"]] = r["spatial_entropy"]
    assert np.array_equal(np.isinf(ours_e), np.isinf(ref_e)), "heads analysed (flattened index >= the elbow head's)"
    fin = np.isfinite(ref_e)
    assert np.abs(ours_e[fin] - ref_e[fin]).max() < ENTROPY_ATOL
    value = {(l, h): float(ref_e[l * 32 + h]) for l in range(32) for h in range(32)}
    assert_ranked_alike(
        [(r["layer"], r["head"]) for r in ranked], [tuple(lh) for lh in s["head"]["ranking"]], value, ENTROPY_ATOL
    )
    top10 = [tuple(lh) for lh in lochead_official.select_heads(stack, GRID, "official", per_sample=10)]
    ref10 = [tuple(t[:2]) for t in s["head"]["top10"] if t[2] is not None]
    assert_ranked_alike(top10, ref10, value, ENTROPY_ATOL)


def test_lochead_regimes_are_not_degenerate(fx):
    """What the random-model fixtures never reach: 9ffe219 boxes smaller than the grid, from top-5 heads
    of non-zero entropy; objects of 1 to 30 cells; heads HEAD ranks first with non-zero entropy."""
    samples = fx["lochead"]["samples"]
    small = []
    for s in samples:
        x0, y0, x1, y1 = s["v2"]["bbox_grid"]
        area = (x1 - x0 + 1) * (y1 - y0 + 1)
        top_entropy = [k[2] for k in s["v2"]["kept"][:5]]
        if area < 24 * 24 and all(e is not None and e > 1e-3 for e in top_entropy):
            small.append(area)
    assert len(small) == len(samples), small
    assert min(small) <= 60 and max(small) < 24 * 24
    assert {s["object_cells"] for s in samples} >= {1} and max(s["object_cells"] for s in samples) <= 30
    assert sum(s["head"]["top10"][0][2] > 1e-3 for s in samples) >= 3  # HEAD's first head of non-zero entropy


# ---------------------------------------------------------------------------------------
# Perception Magnifier
# ---------------------------------------------------------------------------------------


def _technique(settings: dict) -> pm.PerceptionMagnifier:
    """Our preset=official with the arguments the official run used (run_llava_pm.sh's flags)."""
    return pm.PerceptionMagnifier(
        R.N_LAYERS,
        R.GRID,
        **{
            **pm.OFFICIAL,
            "precision": "fp32",  # the official side ran in fp32 here
            "alpha": float(settings["enhance_coe"]),
            "kernel": settings["kernel_size"],
            "beta": settings["exit_threshold"],
            "max_iter": settings["max_iteration"],
        },
    )


def _case(fx, name):
    c = fx["pm"]["cases"][name]
    spec = next(x for x in R.PM_SPECS if x["name"] == name)
    assert spec == _as_spec(c["spec"]), "regimes.py's spec changed since the fixtures were written"
    return c, spec, fx["pm"]["settings"][spec["settings"]]


def _check_search(search: pm_search.Search, c: dict, arrays, name: str, exact_maps: bool) -> None:
    p = f"pm/{name}/"
    assert search.iterations == c["passes"], "the stopping pass"
    assert len(search.raw) == c["passes"] + 1
    for i, raw in enumerate(search.raw):
        ref = arrays[f"{p}map{i}"].ravel()
        raw = np.asarray(raw).ravel()
        if exact_maps:
            np.testing.assert_array_equal(raw, ref, err_msg=f"pass {i} map")
        else:
            np.testing.assert_allclose(raw, ref, atol=1e-7, rtol=0, err_msg=f"pass {i} map")
    assert [np.flatnonzero(b).tolist() for b in search.blocked] == c["blocked"], "cumulative blocked tokens per pass"
    np.testing.assert_allclose(search.exit_sums, c["exit_stats"], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(search.h_star.astype(np.float32).ravel(), arrays[f"{p}h_star"].ravel())


def _check_magnification(t: pm.PerceptionMagnifier, search: pm_search.Search, arrays, name: str) -> None:
    p = f"pm/{name}/"
    view = Image.fromarray(R.pm_image(), "RGB")
    grid_map, density, image = t.perceive(search, view, GRID)
    np.testing.assert_allclose(grid_map, arrays[f"{p}enhanced"], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(
        pm_magnify.official_quantise(torch.from_numpy(arrays[f"{p}enhanced"])), arrays[f"{p}grid_uint8"]
    )
    np.testing.assert_array_equal(density, arrays[f"{p}upsampled"])
    np.testing.assert_array_equal(np.asarray(image), arrays[f"{p}magnified"])


@pytest.mark.parametrize("name", PM_NAMES)
def test_pm_search_on_official_maps(fx, arrays, name):
    """Our refine(official=True) driven by the official per-pass maps: each re-forward must be asked for the
    blocked set the official loop used (else there is no official map for it), and every decision must match."""
    c, _, settings = _case(fx, name)
    t = _technique(settings)
    p = f"pm/{name}/"
    asked = []

    def forward_blocked(blocked):
        i = len(asked)
        asked.append(np.flatnonzero(blocked).tolist())
        assert asked[-1] == c["blocked"][i], f"pass {i + 1}: ours blocks other tokens than the official loop"
        return arrays[f"{p}map{i + 1}"]

    search = pm_search.refine(
        arrays[f"{p}map0"], forward_blocked, t.divisor, t.params["beta"], t.params["max_iter"], official=True
    )
    _check_search(search, c, arrays, name, exact_maps=True)
    for i, h in enumerate(c["highlight"]):  # the 2-means of each pass, on the official current map
        assert np.flatnonzero(pm_search.official_two_means(arrays[f"{p}map{i}"] / t.divisor)).tolist() == h, (
            f"pass {i} highlight"
        )
    _check_magnification(t, search, arrays, name)


@pytest.mark.parametrize("name", PM_NAMES)
def test_pm_end_to_end_on_the_scripted_model(fx, arrays, name):
    """Ours end to end: our layer map (max over heads, float32 sum over the deep layers) of the scripted
    model's attention for each blocked set ours chooses, our divisor, search, enhancement and sampler."""
    c, spec, settings = _case(fx, name)
    model = R.PMModel(spec)
    assert R.sha256(model.weights) == c["weights_sha256"], "rebuilt scripted model differs from the official run's"
    t = _technique(settings)

    def layer_map(blocked=None):
        return t.layer_map(torch.from_numpy(model.image_attention(blocked))[t.layers.start : t.layers.stop])

    search = pm_search.refine(layer_map(), layer_map, t.divisor, t.params["beta"], t.params["max_iter"], official=True)
    _check_search(search, c, arrays, name, exact_maps=False)
    _check_magnification(t, search, arrays, name)


def test_pm_regimes_are_not_degenerate(fx):
    """Searches of 3 or more refinement passes, both exits, and exit statistics away from the threshold."""
    cases = fx["pm"]["cases"].values()
    passes = sorted(c["passes"] for c in cases)
    assert sum(p >= 3 for p in passes) >= 5 and max(passes) == 8 and min(passes) == 1, passes
    assert {c["exit"] for c in cases} == {"threshold", "max_iteration"}
    assert any(c["exit"] == "threshold" and c["passes"] >= 5 and c["exit_stats"][-1] > 0 for c in cases)
    assert all(c["exit_margin"] > 1e-3 for c in cases)
    assert all(1 <= n <= 30 for c in cases for n in c["object_cells"])


def test_provenance_is_complete():
    prov = json.loads((FIX / "provenance.json").read_text())
    assert prov["repositories"]["pm"]["commit"] == "58c2c0fdc7199ecca92d3ef7ca0aa36a078296b6"
    assert prov["repositories"]["head"]["commit"].startswith("8ce33b0")
    assert prov["repositories"]["v2"]["commit"].startswith("9ffe219")
    assert prov["shim"]["regimes_sha256"] and prov["shim"]["harness_sha256"]
    stacks = {part: set(stack["pip_freeze"]) for part, stack in prov["official_stacks"].items()}
    assert {"numpy==2.2.6", "scipy==1.15.3"} <= stacks["lochead"], "the lochead half runs with 8ce33b0's pins"
    assert any(line.startswith("numpy==1.") for line in stacks["pm"]), "PM's half runs with numpy 1.x (torch 2.1.2)"
    size = sum(f.stat().st_size for f in FIX.iterdir())
    assert size < 2_000_000, f"fixture dir is {size} bytes"
