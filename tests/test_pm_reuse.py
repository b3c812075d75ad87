"""PM's refinement passes reuse the map pass's KV cache for every position the mask cannot change
(methods/pm.py ``magnify_at``): from the first blocked image token on (block_rows=all), from the end of
the image (text), or the last row alone (last, and the named fast variant refine=fast). Each reused
pass's map must equal the same pass recomputed in full: one whole forward of the model with the blocked
keys removed, by the hook layer, from exactly the rows the mode masks. Compared within 1e-5, never to
the last bit."""

import numpy as np
import pytest
import torch
from conftest import load, make_inputs
from test_pm_families import family, qwen  # noqa: F401  (the tiny family fixtures)
from test_qwen import tiny_qwen  # noqa: F401

from methods import hooks, pm, pm_search, pm_view
from methods.technique import Request


def _technique(model, **params):
    return pm.PerceptionMagnifier(hooks.num_layers(model), pm_view.image_grid(model), **params)


@pytest.fixture(scope="module")
def llava(tiny_ckpt):
    model, processor = load(tiny_ckpt)
    hooks.install(model)
    inputs, image, _ = make_inputs(processor, size=(32, 32))
    req = Request(
        inputs["input_ids"],
        model.config.image_token_id,
        inputs["input_ids"].shape[1],
        [image],
        processor=processor,
    )
    return model, processor, dict(inputs), req


def _full_rows(req, masked: str) -> hooks.Rows:
    """The rows a mode hides the blocked keys from, in a whole forward."""
    if masked == "all":
        return hooks.Rows.span(0)
    if masked == "text":
        return hooks.Rows.span(req.geometry.span[1])
    return hooks.Rows.last()


def _check_passes_equal_full_recomputation(model, inputs, req, t, masked: str):
    t.generate(model, req, **inputs, max_new_tokens=1, do_sample=False)
    s = t.last_magnified.search
    assert s.iterations >= 2, "the case must exercise more than one refinement pass"
    assert t.last["map_forwards"] == 1 + s.iterations
    pos = req.geometry.base.positions
    n_layers = hooks.num_layers(model)
    for i, blocked in enumerate([np.zeros(pos.numel(), dtype=bool)] + s.blocked):
        cap = hooks.Capture(layers=t.layers, keys=pos)
        block = hooks.Block(layers=range(n_layers), rows=_full_rows(req, masked), keys=pos[torch.as_tensor(blocked)])
        with torch.no_grad(), hooks.edited(model, block, cap):
            model(**inputs)
        full = pm_search.token_map(cap.stacked()[:, 0, :, 0])
        np.testing.assert_allclose(s.maps[i] * t.divisor, full, atol=1e-5, err_msg=f"pass {i} ({masked})")


MODES = [  # (technique params, the rows its refinement passes mask)
    ({}, "all"),  # refresh=once, block_rows=auto: the reference's QA path
    ({"block_rows": "text"}, "text"),
    ({"block_rows": "last"}, "last"),
    ({"refine": "fast"}, "last"),  # block_rows=auto (all) asked for, the fast variant recomputes the last row
    ({"block_rows": "text", "refine": "fast"}, "last"),
    # first_all with once: every row (fp32 maps: the preset's fp16 map rounding is tests/test_precision.py's)
    ({**pm.PRESETS["official_pope"], "beta": 0.0, "precision": "fp32"}, "all"),
    ({**pm.PRESETS["official_pope"], "beta": 0.0, "refine": "fast", "precision": "fp32"}, "last"),
]


@pytest.mark.parametrize("params,masked", MODES, ids=[f"{m}-{i}" for i, (_, m) in enumerate(MODES)])
def test_reused_passes_equal_full_recomputation(llava, params, masked):
    model, _, inputs, req = llava
    t = _technique(model, **{"beta": 0.0, "max_iter": 3, **params})
    _check_passes_equal_full_recomputation(model, inputs, req, t, masked)


@pytest.mark.parametrize(
    "family,params,masked",
    [
        ("qwen2_5_vl", {"block_rows": "last"}, "last"),
        ("qwen2_5_vl", {"refine": "fast"}, "last"),
        ("llava_next", {"block_rows": "text"}, "text"),
        ("llava_next", {"refine": "fast"}, "last"),
    ],
    indirect=["family"],
)
def test_families_reused_passes_equal_full_recomputation(family, params, masked):  # noqa: F811
    """M-RoPE positions (Qwen2.5-VL) and anyres (NeXT: the base block's map, text after the high-res block)."""
    model, _, inputs, req = family
    t = _technique(model, **{"beta": 0.0, "max_iter": 2, **params})
    _check_passes_equal_full_recomputation(model, inputs, req, t, masked)


def test_fast_shares_the_first_map_and_with_one_pass_the_magnified_image(llava):
    """The fast variant changes only the refinement passes: the first map is the same, and with one
    refinement pass (which only decides the stop) H*, the magnified image and the answer are the same."""
    model, _, inputs, req = llava
    out = {}
    for refine in ("exact", "fast"):
        t = _technique(model, **{**pm.PRESETS["official_pope"], "max_iter": 1, "refine": refine})
        ids = t.generate(model, req, **inputs, max_new_tokens=3, do_sample=False)
        out[refine] = (t.last_magnified, ids)
    (a, ids_a), (b, ids_b) = out["exact"], out["fast"]
    np.testing.assert_allclose(a.search.maps[0], b.search.maps[0], atol=1e-6)
    np.testing.assert_allclose(a.search.h_star, b.search.h_star, atol=1e-6)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert torch.equal(ids_a, ids_b)


def test_refine_parameter_is_declared_and_never_preset():
    from lmms_eval_plugins.models.pm import SPEC
    from methods.params import ModelArgsError, parse_params

    assert all(values.get("refine", "exact") == "exact" for values in SPEC.presets.values())
    p = parse_params(SPEC.params, {"preset": "official_pope", "refine": "fast"}, SPEC.presets, owner=SPEC.name)
    assert (p["refine"], p["block_rows"], p["two_means"]) == ("fast", "first_all", "official")
    assert parse_params(SPEC.params, {}, SPEC.presets)["refine"] == "exact"
    with pytest.raises(ModelArgsError, match="one of exact, fast"):
        parse_params(SPEC.params, {"refine": "quick"}, SPEC.presets)
    with pytest.raises(ValueError, match="refine='quick'"):
        pm.PerceptionMagnifier(4, 4, refine="quick")
    t = pm.PerceptionMagnifier(32, 24, **{**pm.PRESETS["official_pope"], "refine": "fast"})
    assert t.block_rows(first=True) == "last" and t.describe()["refine"] == "fast"


def test_replayed_passes_are_the_searchs_passes_on_a_plain_model(tiny_ckpt, llava):
    """The bench's reference for PM's overhead: the same language-model passes (one per map pass, each
    recomputing from the same start) on a plain model, which stays unhooked."""
    model, _, inputs, req = llava
    plain, _ = load(tiny_ckpt)
    t = _technique(model, beta=0.0, max_iter=3)
    t.generate(model, req, **inputs, max_new_tokens=1, do_sample=False)
    mag = t.last_magnified
    assert len(mag.pass_starts) == mag.map_forwards == 1 + mag.search.iterations
    assert mag.pass_starts[0] == 0 and all(s >= int(req.geometry.base.positions[0]) for s in mag.pass_starts[1:])
    calls = []
    handle = plain.model.language_model.register_forward_hook(lambda m, a, kw, out: calls.append(out), with_kwargs=True)
    try:
        with torch.no_grad():
            pm.replay_passes(plain, req, inputs["pixel_values"], mag)
    finally:
        handle.remove()
    assert len(calls) == mag.map_forwards
    assert plain.config._attn_implementation == "sdpa"
    assert [c.last_hidden_state.shape[1] for c in calls] == [req.prompt_len - s for s in mag.pass_starts]


@pytest.mark.parametrize("params,wrong", [({"refine": "fast"}, "all"), ({}, "last"), ({"block_rows": "text"}, "all")])
def test_the_comparison_tells_the_modes_apart(llava, params, wrong):
    """The full recomputation above is specific: against the rows another mode masks it fails."""
    model, _, inputs, req = llava
    t = _technique(model, **{"beta": 0.0, "max_iter": 3, **params})
    with pytest.raises(AssertionError):
        _check_passes_equal_full_recomputation(model, inputs, req, t, wrong)
