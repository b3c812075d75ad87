"""llava_pm preset=official against golden fixtures of the official PM code (ShunqiM/PM @ 58c2c0f).

The fixtures (tests/fixtures/official/pm/) were written by bench/parity/pm_official.py, which ran
the official code on the LLaVA-1.5-shaped tiny model of bench/parity/tiny_llava15.py (original
layout) in the official stack. Here the same weights are rebuilt from the seed in the llava-hf
layout (the fingerprint must match provenance.json) and our preset=official runs on the same
images and token ids. No official code or stack is needed.

Tolerances: maps are attention probabilities computed by a different attention implementation
(transformers 4.37 eager vs our hook layer), so they agree to ~1e-6; every discrete decision
(blocked sets, exit, 8-bit map, magnified pixels, ids) must be equal. Logits: the fixtures store,
per decoding step, the official raw logits' top 16 (values, ids) and their sum over the 32000-id
vocabulary; ours agree within LOGIT_ATOL at those ids (measured at most 1e-5, on AVX-512 and on
``ATEN_CPU_CAPABILITY=default``) and within SUM_ATOL on the sum (32000 fp32 roundings: measured at
most 5.5e-3). Scaling the answer pass's pixels by 1.01 moves the top-16 logits by 3e-3 or more.
"""

from __future__ import annotations

import contextlib
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lmms_eval_plugins.testing import load_parity_script
from methods import hooks
from methods import pm, pm_view, pm_magnify, pm_search
from methods.technique import Request

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "official" / "pm"
MAP_ATOL = 1e-5
LOGIT_ATOL = 1e-4
SUM_ATOL = 2e-2

pytestmark = pytest.mark.skipif(not (FIX / "pm_official.json").exists(), reason="PM fixtures not generated")


def _tiny():
    return load_parity_script("tiny_llava15")


def load_fixtures():
    return (
        json.loads((FIX / "pm_official.json").read_text()),
        np.load(FIX / "arrays.npz"),
        json.loads((FIX / "provenance.json").read_text()),
    )


def build_model(tiny, provenance):
    torch.set_num_threads(1)
    m = tiny.model_of(provenance)
    hooks.install(m)
    return m


@pytest.fixture(scope="module")
def fixtures():
    return load_fixtures()


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


@pytest.fixture(scope="module")
def model(tiny, fixtures):
    return build_model(tiny, fixtures[2])


class OfficialPixels:
    """LLaVA-1.5's preprocessing as the official stack ran it (transformers 4.37 CLIPImageProcessor
    on a square image): PIL bicubic resize to 336, then the per-level rescale/normalise table
    recorded by the harness (``pixel_lut``; the harness checked pixels == lut[u8] bit for bit).
    transformers 5's processor resizes differently (mean abs up to 1.2e-4, max 0.03), which is not PM's
    arithmetic, so the parity tests feed the official pixels."""

    def __init__(self, lut: np.ndarray, size: int, mean):
        self.lut, self.size, self.image_mean = torch.from_numpy(lut), size, mean

    def __call__(self, images, return_tensors="pt"):
        out = []
        for image in images:
            assert image.size[0] == image.size[1], "the official pixels are defined here for square (padded) views"
            u8 = torch.from_numpy(
                np.asarray(image.convert("RGB").resize((self.size, self.size), Image.BICUBIC)).astype(np.int64)
            )
            out.append(torch.stack([self.lut[c][u8[:, :, c]] for c in range(3)]))
        return {"pixel_values": torch.stack(out)}


def official_processor(tiny, arrays):
    return types.SimpleNamespace(
        image_processor=OfficialPixels(arrays["pixel_lut"], tiny.VISION["image_size"], tiny.CLIP_MEAN)
    )


@pytest.fixture(scope="module")
def processor(tiny, fixtures):
    return official_processor(tiny, fixtures[1])


def _run(model, processor, tiny, fixtures, name, refresh):
    data, _, _ = fixtures
    case = data["cases"][name]
    image = Image.open(FIX / f"image_{case['image']}.png").convert("RGB")
    ids = tiny.hf_ids(case["prompt"]["before"], case["prompt"]["after"])
    req = Request(
        input_ids=ids, image_token_id=tiny.IMAGE_TOKEN_ID, prompt_len=ids.shape[1], images=[image], processor=processor
    )
    t = pm.PerceptionMagnifier(
        hooks.num_layers(model),
        pm_view.image_grid(model),
        refresh=refresh,
        **_params(data["settings"][case["settings"]]),
    )
    t.keep_steps = True
    view = t._view(req)
    pv = processor.image_processor(images=[view], return_tensors="pt")["pixel_values"]
    np.testing.assert_array_equal(  # the padded view, resized: the official 8-bit image behind its pixels
        np.asarray(view.resize((336, 336), Image.BICUBIC)), np.asarray(Image.open(FIX / f"{name}_view336.png"))
    )
    out = t.generate(
        model,
        req,
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=pv,
        max_new_tokens=data["new_tokens"],
        do_sample=False,
    )
    return case, t, pv, out[0, ids.shape[1] :].tolist()


@contextlib.contextmanager
def logit_rows(model):
    """Records each decoding step's raw logits: the newest row of every ``lm_head`` call (generate's
    prefill and steps; the per-token loop calls it on that row alone). PM's map passes run the
    language model without ``lm_head``, so only the answer's steps are recorded."""
    rows: list[torch.Tensor] = []

    def keep(module, inputs, out):
        rows.append((out[:, -1] if out.dim() == 3 else out).detach().double().clone())

    handle = model.lm_head.register_forward_hook(keep)
    try:
        yield rows
    finally:
        handle.remove()


def _check_logits(rows: list, ref: dict, what: str) -> None:
    """Our per-step logits against the official record (``logits_record`` in bench/parity/pm_official.py):
    the values at the official top-16 ids, our own top-16 values (the same set up to near-ties) and
    the sum over the vocabulary."""
    ours = torch.cat(rows)
    assert ours.shape[0] == len(ref["sum"]), f"{what}: {ours.shape[0]} steps, official {len(ref['sum'])}"
    want = np.asarray(ref["topk_values"])
    at_ids = ours.gather(-1, torch.tensor(ref["topk_indices"])).numpy()
    np.testing.assert_allclose(at_ids, want, rtol=0, atol=LOGIT_ATOL, err_msg=f"{what}: logits at the official top 16")
    top = ours.topk(want.shape[1], dim=-1).values.numpy()
    np.testing.assert_allclose(top, want, rtol=0, atol=LOGIT_ATOL, err_msg=f"{what}: our top-16 logits")
    np.testing.assert_allclose(ours.sum(-1).numpy(), ref["sum"], rtol=0, atol=SUM_ATOL, err_msg=f"{what}: logit sums")


def _check_step(ours: pm.Magnified, ref: dict, arrays, prefix: str, tiny, processor, settings: dict) -> None:
    """One map + magnification: the search end to end, then each post-processing step exactly
    from the official value of the step before it."""
    s = ours.search
    assert len(s.raw) == ref["passes"], "number of map passes (exit decision)"
    for i, raw in enumerate(s.raw):
        np.testing.assert_allclose(raw, arrays[f"{prefix}map{i}"].ravel(), atol=MAP_ATOL, err_msg=f"pass {i} map")
    assert [np.flatnonzero(b).tolist() for b in s.blocked] == ref["blocked"], "blocked tokens per pass"
    h_star = arrays[f"{prefix}h_star"]
    np.testing.assert_allclose(s.h_star, h_star.ravel(), atol=MAP_ATOL / 20)
    np.testing.assert_allclose(ours.grid_map, arrays[f"{prefix}enhanced"], atol=1e-5)
    # each step exactly, from the official input of that step
    enhanced = pm_magnify.official_enhance(h_star, settings["enhance_coe"], settings["kernel_size"])
    np.testing.assert_allclose(enhanced.numpy(), arrays[f"{prefix}enhanced"], atol=1e-6)
    grid8 = arrays[f"{prefix}grid_uint8"]
    np.testing.assert_array_equal(pm_magnify.official_quantise(torch.from_numpy(arrays[f"{prefix}enhanced"])), grid8)
    density = pm_magnify.official_upsample(grid8, ours.view.size)
    np.testing.assert_array_equal(density, arrays[f"{prefix}upsampled"])
    magnified = pm_magnify.official_magnify(ours.view, density)
    np.testing.assert_array_equal(np.asarray(magnified), arrays[f"{prefix}magnified"])
    pv = processor.image_processor(images=[magnified])["pixel_values"]
    assert tiny.tensor_sha256(pv) == ref["magnified_pixels_sha256"], "pixels of the magnified image"
    # end to end: the x255 truncation turns ~1e-7 attention noise into at most one level in a few cells
    ours8 = pm_magnify.official_quantise(torch.from_numpy(ours.grid_map)).astype(int)
    diff = np.abs(ours8 - grid8.astype(int))
    assert diff.max() <= 1 and (diff > 0).sum() <= 3, f"8-bit map: {(diff > 0).sum()} cells differ"
    if not diff.any():
        np.testing.assert_array_equal(np.asarray(ours.image), arrays[f"{prefix}magnified"])


def _params(settings: dict) -> dict:
    """Our parameters for the official arguments a fixture ran with (run_llava_pm.sh flags)."""
    return {
        **pm.OFFICIAL,
        "precision": "fp32",  # the fixtures ran the official code in fp32 (fp16: tests/test_precision.py)
        "alpha": float(settings["enhance_coe"]),
        "kernel": settings["kernel_size"],
        "beta": settings["exit_threshold"],
        "max_iter": settings["max_iteration"],
    }


def test_presets_are_the_official_scripts(fixtures):
    for name in ("pope", "mme"):
        assert pm.PRESETS[f"official_{name}"] == {**_params(fixtures[0]["settings"][name]), "precision": "official"}


CASES = ["wide_p0_pope", "square_p1_mme", "tall_p0_mme", "wide_p1_pope", "square_p0_pope_iter1", "wide_p0_pope_exit"]


@pytest.mark.parametrize("name", CASES)
def test_once_matches_official(model, processor, tiny, fixtures, name):
    """refresh=once against step 0 of the official per-token path + the official answer generate (the QA
    loop itself is not in the fixtures): passes, blocked sets, H*, 8-bit map, magnified image, ids, and
    the logits of every answer step (and of the unmagnified first step)."""
    if name not in fixtures[0]["cases"]:
        pytest.skip("case not in the fixtures")
    with logit_rows(model) as rows:
        case, t, pv, new_ids = _run(model, processor, tiny, fixtures, name, "once")
    assert tiny.tensor_sha256(pv) == case["pixels_sha256"], (
        "the padded view's pixels (official process_images_return_pad)"
    )
    ids = tiny.hf_ids(case["prompt"]["before"], case["prompt"]["after"])
    with torch.no_grad(), logit_rows(model) as original:  # the unmagnified first step (the model itself)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv)
    _check_step(
        t.steps[0],
        case["once"],
        fixtures[1],
        f"{name}/once/",
        tiny,
        processor,
        fixtures[0]["settings"][case["settings"]],
    )
    assert new_ids == case["once"]["new_ids"]
    _check_logits(original, case["original_logits"], "original image, first step")
    _check_logits(rows[:1], case["once"]["first_logits_magnified"], "magnified image, first step")
    _check_logits(rows, case["once"]["answer_logits"], "answer on the magnified image")


@pytest.mark.parametrize("name", CASES[:2])
def test_every_token_matches_official(model, processor, tiny, fixtures, name):
    """refresh=every_token (the official --resample_during_sampling): every step's map, image, logits and the ids."""
    if "every_token" not in fixtures[0]["cases"].get(name, {}):
        pytest.skip("case not in the fixtures")
    with logit_rows(model) as rows:
        case, t, _, new_ids = _run(model, processor, tiny, fixtures, name, "every_token")
    ref = case["every_token"]
    assert len(t.steps) == len(ref["steps"])
    for i, (ours, r) in enumerate(zip(t.steps, ref["steps"])):
        _check_step(
            ours, r, fixtures[1], f"{name}/every/{i}/", tiny, processor, fixtures[0]["settings"][case["settings"]]
        )
    assert new_ids == ref["new_ids"]
    _check_logits(rows, ref["logits"], "every_token steps")


# ---------------------------------------------------------------------------------------
# The pure functions on synthetic maps
# ---------------------------------------------------------------------------------------


def test_two_means_matches_official_on_synthetic_maps(fixtures):
    data, arrays, _ = fixtures
    for key, expected in data["pure"]["highlight"].items():
        got = np.flatnonzero(pm_search.official_two_means(arrays[f"pure/map/{key}"])).tolist()
        assert got == expected, key
    # the quirks, as recorded: zeros block everything, a float32 constant 0.01 blocks nothing, one-hot blocks its token
    assert len(data["pure"]["highlight"]["zeros"]) == 576 and data["pure"]["highlight"]["flat"] == []
    assert data["pure"]["highlight"]["onehot"] == [300]


def test_enhance_quantise_upsample_match_official(fixtures):
    _, arrays, _ = fixtures
    for key in ("flat", "onehot", "random32", "skewed"):
        for kernel, coe in ((3, 10), (5, 15)):
            k = f"{key}_{kernel}_{coe}"
            enh = pm_magnify.official_enhance(arrays[f"pure/map/{key}"], coe, kernel)
            np.testing.assert_allclose(enh.numpy(), arrays[f"pure/enhanced/{k}"], atol=1e-6, equal_nan=True)
            grid8 = pm_magnify.official_quantise(enh)
            np.testing.assert_array_equal(grid8, arrays[f"pure/grid_uint8/{k}"], err_msg=k)
            np.testing.assert_array_equal(
                pm_magnify.official_upsample(grid8, (160, 160)), arrays[f"pure/upsampled/{k}"], err_msg=k
            )


def test_sampler_matches_official(fixtures):
    _, arrays, _ = fixtures
    image = arrays["pure/image"]
    for key in ("flat_uint8", "onehot_uint8", "random_uint8", "random_float", "band_uint8"):
        heat = arrays[f"pure/heat/{key}"]
        np.testing.assert_allclose(
            pm_magnify.official_inverse_sampling(heat.max(axis=0), 64),
            arrays[f"pure/inverse/{key}"],
            rtol=0,
            atol=1e-12,
        )
        for h, w in ((48, 64), (30, 40)):
            got = np.asarray(pm_magnify.official_magnify(image, heat, (w, h)))
            np.testing.assert_array_equal(got, arrays[f"pure/sampled/{key}_{h}x{w}"], err_msg=f"{key} {h}x{w}")
    # the -1..N-1 grid on a flat map: first column sampled off the image (black)
    flat = pm_magnify.official_inverse_sampling(np.ones(64), 64)
    assert flat[0] == pytest.approx(-1.0) and flat[-1] == pytest.approx(63.0)


def test_provenance_is_complete(fixtures):
    _, _, prov = fixtures
    assert prov["commit"].startswith("58c2c0f") and len(prov["commit"]) == 40
    assert prov["harness"] and prov["shim"]["cpu_shim_sha256"] and prov["official_stack"]["pip_freeze"]
    assert any(line.startswith("transformers==4.37") for line in prov["official_stack"]["pip_freeze"])
    size = sum(f.stat().st_size for f in FIX.iterdir())
    assert size < 3_000_000, f"fixture dir is {size} bytes"
