"""llava_paint preset=official against golden outputs of the official PAINT code.

The fixtures (tests/fixtures/official/paint/, provenance.json says how they were made) come from
running hasanar1f/PAINT @ 2a9e8f8 (modPAI/) on the LLaVA-1.5-shaped tiny model of
bench/parity/tiny_llava15.py; regenerate them with the command in bench/parity/paint_official.py.
Here the HF layout of the same model is rebuilt from its seed (fingerprint asserted) and our
code runs on the same pixel tensors and token ids, without the official stack.

Tolerances: token indices and generated ids exact, except which official spatial rows are picked
from pixels (near-ties: every row sum is about 1, see test_selection_from_pixels_matches_official);
logits and guided scores 1e-4 absolute (logits reach ~13 here; the measured differences are
<= 1e-5, float32 rounding in two attention implementations).
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from methods import hooks
from methods.paint import Paint
from methods.paint_selection import cls_attention, select_tokens, spatial_official, spatial_row_sums
from methods.technique import Request

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "official" / "paint"
sys.path.insert(0, str(REPO / "bench" / "parity"))
import tiny_llava15 as tiny  # noqa: E402

from lmms_eval_plugins.models.paint import OFFICIAL  # noqa: E402

FP32 = {"selection_precision": "model"}  # the fixtures' precision: the official code in fp32

PROVENANCE = json.loads((FIXTURES / "provenance.json").read_text())
SELECTION = json.loads((FIXTURES / "selection.json").read_text())
GENERATION = json.loads((FIXTURES / "generation.json").read_text())
GRID, N = (24, 24), 576
ATOL = 1e-4
# official spatial row sums (float32, all within 3 ulps of 1) vs ours: <= 3.6e-7 measured, AVX2 and
# ATEN_CPU_CAPABILITY=default; the tiny model's redraw (bench/parity/tiny_llava15.py REDRAWN) included
ROW_SUM_TOL = 4e-7


@pytest.fixture(scope="module")
def model():
    m = tiny.model_of(PROVENANCE)
    hooks.install(m)
    return m


@pytest.fixture(scope="module")
def pixels():
    n = len({c["image"] for c in SELECTION})
    px = tiny.fixed_pixels(n, seed=PROVENANCE["model"]["seed"])
    assert tiny.matches(tiny.tensor_sha256(px), PROVENANCE["pixels"]["sha256"])
    return px


def _ids(mask: torch.Tensor) -> list[int]:
    return mask[0].nonzero().flatten().tolist()


def _request(ids):
    return Request(input_ids=ids, image_token_id=tiny.IMAGE_TOKEN_ID, prompt_len=ids.shape[1], images=[None])


def _case_id(c):
    return f"image{c['image']}-{c['dtype']}-spatial{c['spatial_ratio']}"


# --- selection arithmetic on the official inputs (clip_encoder.py:16-55) ---


@pytest.mark.parametrize("case", [c for c in SELECTION if not c["spatial_ratio"]], ids=_case_id)
def test_selection_arithmetic_on_official_attention(case):
    """Head sum in the official dtype (float16 included, with a tie at the top-k boundary for
    image 2), top 25%, IQR outliers, local minus summary: exactly the official indices."""
    dtype = getattr(torch, case["dtype"])
    local_rows = torch.tensor(case["cls_layer0"], dtype=dtype)[None, :, None]  # (1, heads, 1, 576)
    summary_rows = torch.tensor(case["cls_layer_m2"], dtype=dtype)[None, :, None]
    sel = select_tokens(cls_attention(local_rows, dtype), cls_attention(summary_rows, dtype), GRID, 0.25, 0.0)
    assert _ids(sel.summary) == case["summary_tokens"]
    assert _ids(sel.local) == case["local_tokens"]
    assert not sel.spatial.any()


@pytest.mark.parametrize("case", [c for c in SELECTION if c["spatial_ratio"]], ids=_case_id)
def test_official_spatial_rows_on_official_row_sums(case):
    """clip_encoder.py:31-34: top int(576 * ratio) of 577 row sums (CLS row included); the row
    sums are all 1 up to rounding, so exact ties are common and the top-k tie-break decides."""
    sums = torch.tensor(case["spatial_row_sums"])
    assert sums.numel() == N + 1 and (sums - 1).abs().max() < 1e-5
    # a fake (1, 1, 577, 577) attention whose row sums are exactly the official ones
    probs = torch.zeros(1, 1, N + 1, N + 1)
    probs[0, 0, :, 0] = sums
    got = spatial_official(probs, N, case["spatial_ratio"])
    assert _ids(got) == case["spatial_tokens"]


# --- end to end from pixels through our model (preset=official) ---


@pytest.mark.parametrize("case", [c for c in SELECTION if c["dtype"] == "float32"], ids=_case_id)
def test_selection_from_pixels_matches_official(model, pixels, case):
    """The vision-tower capture + selection inside our forward gives the official local and
    summary tokens; with spatial=official at ratio 0.05 (the authors' edited clip_encoder.py:41)
    also the official spatial rows, which end up in the official local set (clip_encoder.py:46)."""
    g = GENERATION[0]
    ids = tiny.hf_ids(g["before"], g["after"])
    # the fixtures ran the official code in fp32 (fp16: tests/test_precision.py)
    t = Paint.for_model(model, **{**OFFICIAL, **FP32, "use_cfg": False, "spatial_ratio": case["spatial_ratio"]})
    with torch.no_grad():
        t.forward(model, _request(ids), input_ids=ids, pixel_values=pixels[case["image"] : case["image"] + 1])
    selector = t.last_selector
    sel = selector.current()
    # Summary (IQR outliers) and the top-25% local set are exact: the CLS scores differ from the
    # official ones by <= 4e-8 (on AVX2 and ATEN_CPU_CAPABILITY=default alike), far inside the
    # smallest gap at the top-k boundary (4.5e-6) or to the IQR bound (4e-5).
    assert _ids(sel.summary) == case["summary_tokens"]
    local, want = set(_ids(sel.local)), set(case["local_tokens"])
    if not case["spatial_ratio"]:
        assert sorted(local) == case["local_tokens"]
        return
    assert sel.local.shape[-1] == N + 1  # row index 576 would boost the token after the image
    assert local <= want and want - local <= set(case["spatial_tokens"])  # what is not top-25% is spatial
    # The spatial rows: int(576 * ratio) of the local layer's row sums, merged into local minus summary.
    full = selector.full_capture.latest()[selector.local_layer]
    sums = spatial_row_sums(full)[0]
    torch.testing.assert_close(sums, torch.tensor(case["spatial_row_sums"]), rtol=0, atol=ROW_SUM_TOL)
    rows = spatial_official(full, N, case["spatial_ratio"])[0]
    assert int(rows.sum()) == len(case["spatial_tokens"])
    assert torch.equal(sel.spatial[0], rows & ~sel.local[0] & ~sel.summary[0])
    # Which rows those are may differ from the official only among near-ties of the k-th row sum.
    # Every row sum is within 3 ulps of 1 here, so every row is such a near-tie: the choice is
    # rounding noise (see spatial_official); the exact tie-break is checked on the official sums
    # in test_official_spatial_rows_on_official_row_sums.
    kth = sums[rows].min()
    for tok in set(_ids(sel.spatial)) ^ (want - local):
        assert abs(float(sums[tok] - kth)) <= ROW_SUM_TOL, f"spatial row {tok} is not a near-tie of the k-th row sum"


# --- decoding, step by step (attention.py:134-147 and CFG.py as chair_eval.py:102-133 runs them) ---


def _generate(model, pixels, case):
    ids = tiny.hf_ids(case["before"], case["after"])
    assert int((ids[0] == tiny.IMAGE_TOKEN_ID).nonzero()[0]) == case["img_start_idx"]
    params = {**OFFICIAL, **FP32, "alpha": case["alpha"], "beta": case["beta"], "use_cfg": case["use_cfg"]}
    t = Paint.for_model(model, **params)
    with torch.no_grad():
        out = t.generate(
            model,
            _request(ids),
            input_ids=ids,
            pixel_values=pixels[case["image"] : case["image"] + 1],
            max_new_tokens=len(case["new_ids"]),
            do_sample=False,
            output_logits=True,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    return out, ids.shape[1]


@pytest.mark.parametrize("case", [c for c in GENERATION if not c["use_cfg"]], ids=lambda c: f"prompt{c['before'][0]}")
def test_edit_alone_per_step(model, pixels, case):
    out, n = _generate(model, pixels, case)
    assert out.sequences[0, n:].tolist() == case["new_ids"]
    for step, logits in zip(case["steps"], out.logits):
        want = torch.tensor(step["raw_top"]["values"])
        got = logits[0, torch.tensor(step["raw_top"]["ids"])]
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        assert abs(float(torch.logsumexp(logits[0], -1)) - step["raw_logsumexp"]) < ATOL


@pytest.mark.parametrize("case", [c for c in GENERATION if c["use_cfg"]], ids=lambda c: f"prompt{c['before'][0]}")
def test_edit_with_cfg_per_step(model, pixels, case):
    """As the official scripts run PAINT (modpai_eval.sh:17 --use-cfg --gamma 1.1): the first
    answer token guided but not boosted (attention.py:139 with llama_modify(use_cfg=True)), every
    later one boosted and guided (CFG.py:48-49); guided scores are log-probabilities with -inf
    below the cutoff (CFG.py:50-57)."""
    out, n = _generate(model, pixels, case)
    assert out.sequences[0, n:].tolist() == case["new_ids"]
    for step, logits, scores in zip(case["steps"], out.logits, out.scores):
        raw = logits[0, torch.tensor(step["raw_top"]["ids"])]
        torch.testing.assert_close(raw, torch.tensor(step["raw_top"]["values"]), atol=ATOL, rtol=0)
        finite = torch.isfinite(scores[0]).nonzero().flatten()
        assert finite.tolist() == step["scores_finite_ids"]
        torch.testing.assert_close(
            scores[0, finite].float(), torch.tensor(step["scores_finite_values"]), atol=ATOL, rtol=0
        )


def test_fp16_head_sum_decides_a_boundary_tie():
    """Why selection_precision=model exists: on image 2 the official fp16 head sums tie at the
    top-25% boundary; summing the same fp16 probabilities in float32 picks another token there."""
    case = next(c for c in SELECTION if c["image"] == 2 and c["dtype"] == "float16" and not c["spatial_ratio"])
    rows = torch.tensor(case["cls_layer0"], dtype=torch.float16)[None, :, None]
    summary = torch.tensor(case["cls_layer_m2"], dtype=torch.float16)[None, :, None]
    wide = select_tokens(cls_attention(rows, torch.float32), cls_attention(summary, torch.float32), GRID, 0.25, 0.0)
    assert len(set(_ids(wide.local)) ^ set(case["local_tokens"])) == 2


def test_iqr_rule_uses_the_official_linear_percentile():
    """get_top_ratio (clip_encoder.py:16-29) calls ``np.percentile(attn_np, 25/75)``: numpy's default method,
    ``linear``. On 0..16, 27, 28, 29 (n = 20) linear puts Q1 at 4 + 0.75 = 4.75 and Q3 at 14 + 0.25 = 14.25, so the
    bound is 14.25 + 1.5 * 9.5 = 28.5 and only 29 (index 19) is an outlier; every other numpy method gives
    another set (lower/higher/midpoint/hazen/weibull/*_unbiased: none; nearest: 28 and 29)."""
    import numpy as np

    from methods.paint_selection import iqr_outliers

    row = torch.tensor([*range(17), 27, 28, 29], dtype=torch.float32)
    assert iqr_outliers(row[None])[0].nonzero().flatten().tolist() == [19]
    x = row.numpy()
    for method in ("lower", "higher", "nearest", "midpoint", "hazen", "weibull", "median_unbiased"):
        q1, q3 = np.percentile(x, 25, method=method), np.percentile(x, 75, method=method)
        assert np.flatnonzero(x > q3 + 1.5 * (q3 - q1)).tolist() != [19], method  # the row tells the methods apart


def test_iqr_rule_runs_in_the_maps_dtype():
    """The official map is the fp16 model's head sum, and get_top_ratio takes percentiles of it as a float16
    array; ours does the same (selection_precision=model keeps the map in the tower's dtype). In units of 1/1024
    above 1 the row is 0, 7, 9, 15, 19, 21, 37, 50: exactly, Q1 = 8.5, Q3 = 25, bound 49.75, so 50 is an
    outlier; in float16 (spacing 1/1024 there) the bound rounds to 50, and 50 > 50 is false. A float32 map of
    the same values keeps the exact answer. Fails if the rule casts the map to another precision first."""
    from methods.paint_selection import iqr_outliers

    units = torch.tensor([0, 7, 9, 15, 19, 21, 37, 50], dtype=torch.float64)
    row = 1 + units / 1024  # every value exact in float16
    assert iqr_outliers(row.to(torch.float16)[None])[0].nonzero().flatten().tolist() == []
    assert iqr_outliers(row.to(torch.float32)[None])[0].nonzero().flatten().tolist() == [7]
    # the official presets select in fp16, as the official fp16 runs (on any model)
    assert OFFICIAL["selection_precision"] == "float16"
