"""precision=official: the steps the official code does in fp16, checked against independent fp16 arithmetic.

The official implementations run LLaVA-1.5 in fp16 (issue 27 item 3, bench/precision.py measures how
often that changes outcomes). ``precision=official`` (PM, localization heads) and PAINT's
``selection_precision=float16`` do only those steps in fp16; PAI's fp16 guidance is the measurement's
instrument only (it changed nothing measurable, docs/pai.md). These tests compare
each with a calculation written independently here (numpy float16 / float64, one rounding per official
op), on small inputs, and show that each differs from the fp32 arithmetic on inputs made to show it.
No test depends on last-bit float results of a particular CPU: the fp16 results are correctly rounded
sums and products (exact in float32/float64 before the one rounding), compared exactly only there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from methods import guidance, pm
from methods.pm_search import official_layer_sum, refine

F16_EPS = 2.0**-10  # fp16's relative spacing (11-bit significand)


def _softmax_rows(gen: np.random.Generator, n_layers: int, n: int, scale: float = 3.0) -> list[np.ndarray]:
    x = gen.normal(size=(n_layers, n)) * scale
    e = np.exp(x - x.max(-1, keepdims=True))
    return [(r / r.sum()).astype(np.float32) for r in e]


# ---------------------------------------------------------------------------------------
# PM: attention_resampler.py:186-246 sums the fp16 per-layer maps with numpy in float16
# ---------------------------------------------------------------------------------------


def _fp16_layer_sum(per_layer: list[np.ndarray]) -> np.ndarray:
    """Independent: each layer rounded to fp16, then added one layer at a time, each add exact in float64
    and rounded once to fp16 (a sum of two fp16 values needs < 64 bits, so this is the correctly rounded
    fp16 add numpy's float16 reduction over the layer axis does)."""
    acc = np.zeros(per_layer[0].shape, dtype=np.float64)
    for i, m in enumerate(per_layer):
        term = np.float64(np.float16(m))
        acc = term if i == 0 else np.float64(np.float16(acc + term))
    return np.float16(acc)


def test_pm_layer_sum_fp16_matches_independent_fp16_adds():
    gen = np.random.default_rng(0)
    maps = _softmax_rows(gen, 20, 576)
    ours = official_layer_sum(maps, np.float16)
    assert ours.dtype == np.float16
    np.testing.assert_array_equal(ours, _fp16_layer_sum(maps))
    # and it is not the float32 sum rounded once: the per-add rounding changes cells
    once = np.float16(official_layer_sum(maps, np.float32))
    assert (ours != once).sum() > 10


def test_pm_precision_official_rounds_the_technique_maps():
    t32 = pm.PerceptionMagnifier(32, 24, **{**pm.PRESETS["official_pope"], "precision": "fp32"})
    t16 = pm.PerceptionMagnifier(32, 24, **pm.PRESETS["official_pope"])
    assert t16.params["precision"] == "official" and pm.DEFAULTS["precision"] == "fp32"
    gen = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(21, 4, 576, generator=gen) * 3, dim=-1)  # (deep layers, heads, tokens)
    per_layer = [p.amax(0).numpy() for p in probs]
    m16, m32 = t16.layer_map(probs), t32.layer_map(probs)
    assert m16.dtype == np.float16 and m32.dtype == np.float32
    np.testing.assert_array_equal(m16, _fp16_layer_sum(per_layer))
    np.testing.assert_allclose(m32, np.sum(per_layer, axis=0), rtol=1e-6)
    assert not np.array_equal(m16.astype(np.float32), m32)
    with pytest.raises(ValueError, match="layer_map=official"):
        pm.PerceptionMagnifier(32, 24, precision="official")


def test_pm_refine_keeps_fp16_through_the_search():
    """model_generate.py:351-385: the map / (32 - 12), 2-means and the exit sum stay in fp16; H* accumulates in
    float64 (np.zeros)."""
    gen = np.random.default_rng(2)
    first = np.float16(np.abs(gen.normal(size=576)) * 0.05)
    seen = []

    def forward_blocked(blocked):
        seen.append(blocked.copy())
        return np.where(blocked, np.float16(0), first).astype(np.float16)

    s = refine(first, forward_blocked, 20, beta=0.1, max_iter=3, official=True)
    assert all(m.dtype == np.float16 for m in s.maps) and s.h_star.dtype == np.float64
    assert s.exit_sums[0] == float(np.float16(np.where(seen[0], 0, first)).sum()) / 20


# ---------------------------------------------------------------------------------------
# PAI (and PAINT's CFG): CFG.py on fp16 logits
# ---------------------------------------------------------------------------------------


def _independent_fp16_guide(cond: np.ndarray, uncond: np.ndarray, gamma: float, cutoff: float) -> np.ndarray:
    """CFG.py:28-58 in numpy: fp16 logits, log-softmax in float64 rounded to fp16, then each op computed
    exactly in float64 from fp16 operands (gamma as a float32 scalar) and rounded once to fp16."""

    def log_softmax16(x):
        x = np.float64(np.float16(x))
        m = x.max(-1, keepdims=True)
        return np.float16(x - m - np.log(np.exp(x - m).sum(-1, keepdims=True)))

    c, u = log_softmax16(cond), log_softmax16(uncond)
    diff = np.float16(np.float64(c) - np.float64(u))
    out = np.float16(np.float64(np.float16(np.float64(np.float32(gamma)) * np.float64(diff))) + np.float64(u))
    threshold = np.float16(np.float64(np.float32(np.log(np.float32(cutoff)))) + np.float64(c.max(-1, keepdims=True)))
    return np.where(c < threshold, -np.inf, np.float64(out))


def test_pai_fp16_guide_matches_independent_fp16():
    gen = torch.Generator().manual_seed(3)
    cond = torch.randn(4, 200, generator=gen) * 4
    uncond = cond + torch.randn(4, 200, generator=gen)
    ours = guidance.guide(cond, uncond, 1.1, 0.1, fp16=True)
    ref = _independent_fp16_guide(cond.numpy(), uncond.numpy(), 1.1, 0.1)
    assert ours.dtype == torch.float32
    assert torch.equal(torch.isinf(ours), torch.from_numpy(np.isinf(ref)))
    finite = ~np.isinf(ref)
    # the log-softmax's last float32 bit may round either way: at most one fp16 step of each input to the sum
    np.testing.assert_allclose(ours.numpy()[finite], ref[finite], rtol=4 * F16_EPS, atol=4 * F16_EPS)
    frac_exact = float((ours.numpy()[finite] == ref[finite]).mean())
    assert frac_exact > 0.95
    # every value is an fp16 value
    assert torch.equal(ours[~torch.isinf(ours)], ours[~torch.isinf(ours)].half().float())


def test_pai_fp16_guide_ties_pick_the_first_token():
    """Two tokens 1e-4 apart in fp32 logits are one fp16 value: greedy (argmax, first index on ties) takes
    the first with the fp16 steps (bench/precision.py's PAI measurement), the larger in fp32."""
    cond = torch.full((1, 16), -5.0)
    cond[0, 3], cond[0, 7] = 4.0, 4.0001
    uncond = torch.zeros(1, 16)
    g32 = guidance.guide(cond, uncond, 1.1, 0.1)
    g16 = guidance.guide(cond, uncond, 1.1, 0.1, fp16=True)
    assert int(g32.argmax()) == 7
    assert int(g16.argmax()) == 3 and g16[0, 3] == g16[0, 7]


def test_pai_gamma_one_is_fp16_log_softmax():
    x = torch.randn(2, 50, generator=torch.Generator().manual_seed(4)) * 5
    ours = guidance.guide(x, x, 1, 0.1, fp16=True)
    ref = np.float16(np.float64(torch.log_softmax(x.half().double(), -1).numpy()))
    np.testing.assert_allclose(ours.numpy(), np.float64(ref), rtol=F16_EPS, atol=F16_EPS)


def test_pai_offers_no_precision_model_arg():
    """fp16 guidance changed no greedy id in 220 measured runs (docs/pai.md "Precision"): no model_arg, no preset."""
    from lmms_eval_plugins.models.pai import OFFICIAL, SPEC
    from lmms_eval_plugins.models.paint import SPEC as PAINT_SPEC

    assert "precision" not in OFFICIAL and "precision" not in {p.name for p in SPEC.params}
    assert "precision" not in {p.name for p in PAINT_SPEC.params}


# ---------------------------------------------------------------------------------------
# Localization heads: fp16 maps, sums and entropies (localization_heads_finder.py:195-293, analyze.py:20-63)
# ---------------------------------------------------------------------------------------


def _exact_fp16_maps(gen: np.random.Generator, shape) -> torch.Tensor:
    """Maps whose cells are multiples of 2**-14 below 2**-3: exact in fp16, and every sum of them exact in
    float32, so the one fp16 rounding of a sum is the same however it is accumulated."""
    return torch.from_numpy(gen.integers(0, 2**11, size=shape) * 2.0**-14).float()


def _independent_fp16_entropy(grid: np.ndarray, mean_factor: float, threshold: float = 0.001) -> float:
    from scipy.ndimage import label

    s = np.float64(np.float16(grid))
    mean = np.float64(np.float16(s.mean()))
    b = np.maximum(np.float64(np.float16(s - np.float64(np.float16(mean * mean_factor)))), 0.0)
    labels, n = label(b > threshold, structure=np.ones((3, 3)))
    total = float(np.float16(b.sum()))
    if total <= 0:
        return float("inf")
    p = [b[labels == i].sum() / total for i in range(1, n + 1)]
    return float(-sum(q * np.log(q) for q in p if q > 0))


@pytest.mark.parametrize("mean_factor", [1.0, 2.0])
def test_lochead_fp16_entropy_matches_independent_fp16(mean_factor):
    from methods.lochead_official import official_spatial_entropy

    gen = np.random.default_rng(5)
    differ = 0
    for _ in range(12):
        grid = _exact_fp16_maps(gen, (24, 24)) * torch.from_numpy(gen.random((24, 24)) < 0.2).float()
        grid = grid + 2.0**-14  # no all-zero map
        e16 = official_spatial_entropy(grid, mean_factor, fp16=True)[0]
        ref = _independent_fp16_entropy(grid.numpy(), mean_factor)
        assert e16 == pytest.approx(ref, rel=1e-6, abs=1e-9)
        differ += e16 != official_spatial_entropy(grid, mean_factor)[0]
    assert differ > 0  # the fp16 mean and relu change entropies


def test_lochead_fp16_sums_tie_and_the_elbow_is_one_of_the_tied_heads():
    from methods.lochead_official import _chord_argmax, _head_sums, official_elbow_head_index

    gen = np.random.default_rng(6)
    maps = _exact_fp16_maps(gen, (4, 8, 576)) + torch.from_numpy(gen.random((4, 8, 576)) * 2.0**-15).float()
    s16 = _head_sums(maps, fp16=True)
    ref = np.float16(np.float64(np.float16(maps.numpy())).sum(-1)).ravel()
    np.testing.assert_allclose(s16, np.float64(ref), rtol=F16_EPS, atol=0)  # one fp16 step at most
    assert len(set(s16)) < len(s16)  # fp16 sums tie
    elbow = official_elbow_head_index(s16)
    ys = np.sort(np.asarray(s16))
    assert s16[elbow] == ys[_chord_argmax(ys)]  # the elbow head is one of the heads of the elbow's value
    assert len(set(_head_sums(maps))) == len(s16)  # in fp32 they do not tie


def test_lochead_presets_set_precision():
    from lmms_eval_plugins.models.lochead import SPEC

    for name in ("official", "official_v2"):
        assert SPEC.presets[name]["precision"] == "official"
    assert {p.name: p.default for p in SPEC.params}["precision"] == "fp32"


# ---------------------------------------------------------------------------------------
# PM against the official code run on fp16 attention (tests/fixtures/official/regimes_fp16)
# ---------------------------------------------------------------------------------------

FP16_FIX = Path(__file__).resolve().parent / "fixtures" / "official" / "regimes_fp16"


@pytest.fixture(scope="module")
def fp16_regimes():
    from lmms_eval_plugins.testing import load_parity_script

    if not (FP16_FIX / "regimes_official.json").exists():
        pytest.skip("fp16 regime fixtures not generated")
    return (
        load_parity_script("regimes"),
        json.loads((FP16_FIX / "regimes_official.json").read_text())["pm"],
        np.load(FP16_FIX / "arrays.npz"),
    )


def test_fp16_fixture_came_from_fp16_attention(fp16_regimes):
    _, fx, arrays = fp16_regimes
    assert all(arrays[f"pm/{name}/map0"].dtype == np.float16 for name in fx["cases"])


@pytest.mark.parametrize(
    "name",
    [
        "ladder5_pope",
        "one_strong_pope",
        "two_objects_pope",
        "many_small_mme",
        "diffuse_mme",
        "ladder9_mme_cap",
        "ladder9_exit06",
        "halving_pope",
        "steep_pope",
    ],
)
def test_pm_precision_official_matches_the_official_fp16_search(fp16_regimes, name):
    """pm_sample.sample (58c2c0f) on the planted regimes with fp16 attention, against our precision=official
    end to end (our fp16 layer map of the scripted model's attention): every pass's fp16 deep map within
    one fp16 step (the planted fp32 attention agrees to ~1e-7 before rounding), the blocked sets, the
    stopping pass, the exit statistics, H*, the 8-bit map and the magnified image."""
    from methods import pm_magnify
    from PIL import Image

    R, fx, arrays = fp16_regimes
    c = fx["cases"][name]
    spec = next(x for x in R.PM_SPECS if x["name"] == name)
    settings = fx["settings"][spec["settings"]]
    model = R.PMModel(spec)
    assert R.sha256(model.weights) == c["weights_sha256"]
    t = pm.PerceptionMagnifier(
        R.N_LAYERS,
        R.GRID,
        **{
            **pm.OFFICIAL,
            "alpha": float(settings["enhance_coe"]),
            "kernel": settings["kernel_size"],
            "beta": settings["exit_threshold"],
            "max_iter": settings["max_iteration"],
        },
    )
    assert t.params["precision"] == "official"

    def layer_map(blocked=None):
        return t.layer_map(torch.from_numpy(model.image_attention(blocked))[t.layers.start : t.layers.stop])

    s = refine(layer_map(), layer_map, t.divisor, t.params["beta"], t.params["max_iter"], official=True)
    p = f"pm/{name}/"
    assert s.iterations == c["passes"]
    for i, raw in enumerate(s.raw):
        ref = arrays[f"{p}map{i}"].ravel()
        assert raw.dtype == np.float16
        np.testing.assert_allclose(raw.ravel().astype(np.float64), ref, rtol=2 * F16_EPS, atol=2.0**-24)
    assert [np.flatnonzero(b).tolist() for b in s.blocked] == c["blocked"]
    np.testing.assert_allclose(s.exit_sums, c["exit_stats"], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(s.h_star.ravel(), arrays[f"{p}h_star"].ravel(), rtol=2 * F16_EPS, atol=1e-7)
    view = Image.fromarray(R.pm_image(), "RGB")
    grid_map, density, image = t.perceive(s, view, (R.GRID, R.GRID))
    q = pm_magnify.official_quantise(torch.from_numpy(np.asarray(grid_map, dtype=np.float32)))
    assert int((q.astype(int) != arrays[f"{p}grid_uint8"].astype(int)).sum()) <= 3  # one level at a boundary
    if np.array_equal(q, arrays[f"{p}grid_uint8"]):
        np.testing.assert_array_equal(np.asarray(image), arrays[f"{p}magnified"])


# ---------------------------------------------------------------------------------------
# PAINT: the selection's CLS attention summed over heads in fp16 (clip_encoder.py:38-39 on an fp16 tower)
# ---------------------------------------------------------------------------------------


def test_paint_float16_selection_sums_in_fp16_on_an_fp32_model():
    from lmms_eval_plugins.models.paint import OFFICIAL
    from methods.paint import Paint
    from methods.paint_selection import cls_attention

    assert OFFICIAL["selection_precision"] == "float16"
    t = Paint(32, 24, (24, 24), 1, torch.float32, **{**OFFICIAL, "end_layer": 32})
    assert t.selection_dtype == torch.float16
    assert Paint(32, 24, (24, 24), 1, torch.float32, selection_precision="model").selection_dtype == torch.float32
    gen = torch.Generator().manual_seed(7)
    probs = torch.softmax(torch.randn(1, 16, 1, 576, generator=gen) * 2, dim=-1)
    s16 = cls_attention(probs, torch.float16)
    ref = np.float16(np.float64(probs[:, :, 0].to(torch.float16).numpy()).sum(1))
    assert s16.dtype == torch.float16
    np.testing.assert_allclose(s16.double().numpy(), np.float64(ref), rtol=F16_EPS, atol=0)
    s32 = cls_attention(probs, torch.float32)
    assert (s16.float() != s32).any() and len(set(s16[0].tolist())) < len(set(s32[0].tolist()))  # fp16 ties
