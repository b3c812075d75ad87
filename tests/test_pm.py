"""Perception Magnifier: the arithmetic against hand calculations, the passes against eager
references, llava_hf equality when magnification is off, bad inputs, saved visuals."""

import json

import numpy as np
import pytest
import torch
from conftest import load, make_inputs
from PIL import Image, ImageDraw

from methods import hooks, pm, pm_view, pm_magnify, pm_search
from methods.technique import Request, RequestError

# ---------------------------------------------------------------------------------------
# The magnifier's arithmetic
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(37, 37, 3), (20, 53, 3), (1, 1, 3), (64, 3, 3)])
def test_uniform_map_is_the_identity(shape):
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out = np.asarray(pm_magnify.magnify(img, np.full(shape[:2], 0.37)))
    assert np.array_equal(out, img)


def test_uniform_map_to_another_size_is_a_plain_rescale():
    # a linear ramp resampled at pixel centres stays a ramp (up to interpolation error)
    ramp = np.tile(np.linspace(0, 255, 40), (40, 1))
    img = np.stack([ramp] * 3, -1).astype(np.uint8)
    out = np.asarray(pm_magnify.magnify(img, np.ones((40, 40)), out_size=(80, 20))).astype(float)
    want = np.interp((np.arange(80) + 0.5) / 2 - 0.5, np.arange(40), img[0, :, 0].astype(float))
    assert out.shape == (20, 80, 3)
    assert np.abs(out[5, :, 0] - want).max() <= 0.5


def test_inverse_cdf_hand_computed():
    # density 3 on cell 1, 1 elsewhere (4 cells, total 6): cumulative edges 0, 1/6, 4/6, 5/6, 1
    xs = pm_magnify.inverse_cdf(np.array([1.0, 3.0, 1.0, 1.0]), 6)
    u = (np.arange(6) + 0.5) / 6
    want = np.interp(u, [0, 1 / 6, 4 / 6, 5 / 6, 1], [0, 1, 2, 3, 4]) - 0.5
    np.testing.assert_allclose(xs, want, atol=1e-12)
    # output pixels 1, 2, 3 (u = 0.25, 0.42, 0.58) land in cell 1: three times the share of the others
    assert np.all((xs[1:4] >= 0.5) & (xs[1:4] < 1.5))


def test_concentrated_map_enlarges_exactly_that_region_and_keeps_order():
    n, a, b, strength = 60, 20, 30, 5.0
    density = np.ones((n, n))
    density[a:b, a:b] = strength  # rows and columns a..b-1 have max = strength
    width = b - a
    share = strength * width / (strength * width + (n - width))  # of the output, along each axis
    ys = pm_magnify.inverse_cdf(density.max(axis=1), n)
    assert np.all(np.diff(ys) > 0)  # monotone: order of rows preserved
    inside = np.sum((ys >= a - 0.5) & (ys < b - 0.5))
    assert abs(inside - share * n) <= 1
    # local scale: one output pixel covers total/n source pixels outside, strength x fewer inside
    total = strength * width + n - width
    steps = np.diff(ys)
    np.testing.assert_allclose(steps[(ys[:-1] > a) & (ys[1:] < b - 1)], total / n / strength, rtol=1e-9)
    np.testing.assert_allclose(steps[ys[1:] < a - 1], total / n, rtol=1e-9)

    # on an image: a small white square in the region becomes strength x larger in each direction,
    # the rest shrinks, and the square stays where the CDF puts it
    img = Image.new("RGB", (n, n), (0, 0, 0))
    ImageDraw.Draw(img).rectangle([22, 22, 25, 25], fill=(255, 255, 255))  # 4x4 px
    out = np.asarray(pm_magnify.magnify(img, density))[:, :, 0]
    rows = np.nonzero(out.max(axis=1) > 127)[0]
    span = rows.max() - rows.min() + 1
    assert abs(span - 4 * strength * n / (strength * width + n - width)) <= 2
    edge = (a + strength * (22 - a)) / (strength * width + n - width) * n  # where source row 22's top edge lands
    assert abs(rows.min() - edge) <= 1.5


def test_magnify_rejects_a_mismatched_density():
    with pytest.raises(ValueError, match="does not match"):
        pm_magnify.magnify(np.zeros((4, 5, 3), np.uint8), np.ones((5, 4)))


def test_two_means_hand_computed():
    assert pm_search.two_means_high(np.array([0.0, 0, 1, 1, 10])).tolist() == [False, False, False, False, True]
    # first split at 5 puts 5.5 high; the centres (0.9 -> 2.25, 9.36) move the split to 5.8: 5.5 goes low
    v = np.array([0, 3, 3, 3, 5.5, 10, 10, 10, 10, 10, 10])
    assert pm_search.two_means_high(v).tolist() == [False] * 5 + [True] * 6
    # a tie (equal distance to both centres) goes to the low cluster
    assert pm_search.two_means_high(np.array([0.0, 5.0, 10.0])).tolist() == [False, False, True]
    # a constant map has no high cluster
    assert not pm_search.two_means_high(np.full(7, 0.2)).any()
    assert pm_search.two_means_high(np.array([[0.0, 1.0], [0.0, 0.9]])).shape == (2, 2)


def test_refine_hand_computed():
    """Two layers, four tokens; the fake model returns fixed maps for each blocked set."""
    replies = {(True, False, False, False): [0, 4, 2, 2], (True, True, False, False): [0, 0, 1, 1]}
    seen = []

    def forward_blocked(blocked):
        seen.append(tuple(blocked.tolist()))
        return np.array(replies[seen[-1]], dtype=float)

    s = pm_search.refine(np.array([8.0, 2, 2, 0]), forward_blocked, n_layers=2, beta=1.5, max_iter=8)
    # pass 0: map [4,1,1,0] (sum 6): block token 0; pass 1: [0,2,1,1] (sum 4 > 1.5): block token 1;
    # pass 2: [0,0,.5,.5] (sum 1 <= 1.5): stop. H* = (sum of maps 0..1) / visible counts [1,2,2,2]
    assert seen == list(replies)
    assert s.iterations == 2
    assert s.sums == [6.0, 4.0, 1.0]
    np.testing.assert_allclose(s.h_star, [4.0, 1.5, 1.0, 0.5])

    s = pm_search.refine(np.array([8.0, 2, 2, 0]), forward_blocked, n_layers=2, beta=1.5, max_iter=1)
    assert s.iterations == 1 and s.sums == [6.0, 4.0]
    np.testing.assert_allclose(s.h_star, [4.0, 1.0, 1.0, 0.0])  # only pass 0 is averaged

    s = pm_search.refine(np.array([8.0, 2, 2, 0]), forward_blocked, n_layers=2, beta=10.0, max_iter=8)
    assert s.iterations == 1  # the exit test comes after the first re-forward, as in the reference

    flat = pm_search.refine(np.full(4, 3.0), forward_blocked, n_layers=3, beta=0.0, max_iter=8)
    assert flat.iterations == 0 and np.allclose(flat.h_star, 1.0)


def _enhance_by_hand(grid, alpha, k):
    g = (grid - grid.min()) / (grid.max() - grid.min())
    mean = sum(g.ravel()) / g.size
    sd = (sum((x - mean) ** 2 for x in g.ravel()) / (g.size - 1)) ** 0.5
    s = 1 / (1 + np.exp(-alpha * (g - mean) / sd))
    r = k // 2
    out = np.zeros_like(s)
    h, w = s.shape
    for i in range(h):
        for j in range(w):
            acc = 0.0
            for di in range(-r, r + 1):
                for dj in range(-r, r + 1):
                    acc += s[min(max(i + di, 0), h - 1), min(max(j + dj, 0), w - 1)]
            out[i, j] = acc / k**2
    return out


def test_enhance_hand_computed():
    g = np.array([[0.0, 1.0], [0.0, 0.0]])
    # mean 0.25, sample std 0.5: z = [[-0.5, 1.5], [-0.5, -0.5]]
    want = 1 / (1 + np.exp(-2.0 * np.array([[-0.5, 1.5], [-0.5, -0.5]])))
    np.testing.assert_allclose(pm_magnify.enhance(g, 2.0, 1), want)
    grid = np.random.default_rng(1).random((6, 5)) * 0.03
    for k in (1, 3, 5):
        np.testing.assert_allclose(pm_magnify.enhance(grid, 15.0, k), _enhance_by_hand(grid, 15.0, k), rtol=1e-10)
    assert np.all(pm_magnify.enhance(grid, 0.0, 3) == 0.5)  # alpha 0: a uniform map
    assert np.all(pm_magnify.enhance(np.full((3, 3), 7.0), 15.0, 3) == 0.5)  # a flat map stays flat


def test_square_view_pads_like_llava_and_crops_like_clip():
    img = Image.new("RGB", (30, 10), (255, 0, 0))
    v = pm_magnify.square_view(img, "pad", (1, 2, 3))
    a = np.asarray(v)
    assert v.size == (30, 30)
    assert (a[:10] == (1, 2, 3)).all() and (a[10:20] == (255, 0, 0)).all() and (a[20:] == (1, 2, 3)).all()
    assert pm_magnify.square_view(img, "crop").size == (10, 10)
    assert pm_magnify.square_view(Image.new("L", (5, 5), 9), "pad").mode == "RGB"
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(pm_magnify.square_view(rgba, "pad")).min() == 255  # transparent -> white, as HF processors do


def test_deep_layers_scale_with_depth():
    assert pm_search.deep_layers(32) == range(11, 32)  # l >= 12 of 32, 1-based
    assert pm_search.deep_layers(40) == range(14, 40)
    assert pm_search.deep_layers(4) == range(1, 4)
    assert pm_search.deep_layers(6, deep_layer=6) == range(5, 6)
    with pytest.raises(ValueError, match="outside"):
        pm_search.deep_layers(4, deep_layer=5)


# ---------------------------------------------------------------------------------------
# On a model
# ---------------------------------------------------------------------------------------


def _request(model, processor, inputs, image, text=None):
    return Request(
        input_ids=inputs["input_ids"],
        image_token_id=model.config.image_token_id,
        prompt_len=inputs["input_ids"].shape[1],
        images=[image] if image is not None else [],
        text=text,
        processor=processor,
    )


def _technique(model, **params):
    return pm.PerceptionMagnifier(hooks.num_layers(model), pm_view.image_grid(model), **params)


def _square_inputs(processor, size=32):
    return make_inputs(processor, size=(size, size))


@pytest.fixture
def square(tiny_ckpt):
    model, processor = load(tiny_ckpt)
    hooks.install(model)
    inputs, image, prompt = _square_inputs(processor)
    return model, processor, inputs, image


def _eager_map(ckpt, inputs, layers, attention_mask=None):
    """max over heads, sum over layers, of output_attentions at the last row over the image tokens."""
    model, _ = load(ckpt, "eager")
    pos = hooks.image_positions(inputs["input_ids"], model.config.image_token_id)
    kw = dict(inputs)
    if attention_mask is not None:
        kw["attention_mask"] = attention_mask
    with torch.no_grad():
        att = model(**kw, output_attentions=True).attentions
    return sum(att[layer][0, :, -1, pos].amax(dim=0).double() for layer in layers).numpy()


def test_first_map_and_refined_maps_match_eager_attention(tiny_ckpt, square):
    """Pass 0 and every refinement pass (KV prefix reuse + key mask) equal a full eager forward
    with the blocked tokens masked out for every later token (the reference's override mask)."""
    model, processor, inputs, image = square
    t = _technique(model, beta=0.0, max_iter=3)
    t.generate(model, _request(model, processor, inputs, image), **inputs, max_new_tokens=2, do_sample=False)
    s = t.last_magnified.search
    layers = t.layers
    pos = hooks.image_positions(inputs["input_ids"], model.config.image_token_id)
    np.testing.assert_allclose(s.maps[0] * len(layers), _eager_map(tiny_ckpt, inputs, layers), atol=1e-5)
    assert s.iterations >= 1
    for i, blocked in enumerate(s.blocked, start=1):
        mask = torch.ones_like(inputs["input_ids"])
        mask[0, pos[torch.as_tensor(blocked)]] = 0
        np.testing.assert_allclose(s.maps[i] * len(layers), _eager_map(tiny_ckpt, inputs, layers, mask), atol=1e-5)


@pytest.mark.parametrize("rows", ["text", "last"])
def test_narrower_blocking_matches_the_hook_layer_block(square, rows):
    """block_rows=text/last hide the tokens from the rows after the image / the last row only:
    the same maps as the hook layer's Block edit on those rows in a full forward."""
    model, processor, inputs, image = square
    t = _technique(model, beta=0.0, max_iter=2, block_rows=rows)
    t.generate(model, _request(model, processor, inputs, image), **inputs, max_new_tokens=1, do_sample=False)
    s = t.last_magnified.search
    pos = hooks.image_positions(inputs["input_ids"], model.config.image_token_id)
    row_spec = hooks.Rows.span(int(pos[-1]) + 1) if rows == "text" else hooks.Rows.last()
    for i, blocked in enumerate(s.blocked, start=1):
        cap = hooks.Capture(layers=t.layers, keys=pos)
        block = hooks.Block(layers=range(hooks.num_layers(model)), rows=row_spec, keys=pos[torch.as_tensor(blocked)])
        with torch.no_grad(), hooks.edited(model, block, cap):
            model(**inputs)
        np.testing.assert_allclose(s.maps[i] * len(t.layers), pm_search.token_map(cap.stacked()[:, 0, :, 0]), atol=1e-5)


def test_magnification_off_equals_llava_hf(square):
    model, processor, inputs, image = square
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        logits = model(**inputs).logits
    for refresh in ("once", "every_token"):
        t = _technique(model, alpha=0.0, refresh=refresh)
        got = t.generate(model, _request(model, processor, inputs, image), **inputs, max_new_tokens=6, do_sample=False)
        assert torch.equal(got, want), refresh
        assert np.array_equal(np.asarray(t.last_magnified.image), np.asarray(image))
    t = _technique(model, alpha=0.0)
    out = t.forward(model, _request(model, processor, inputs, image), **inputs)
    assert torch.equal(out.logits, logits)


def test_magnification_changes_the_image_and_every_n_beyond_the_answer_equals_once(square):
    model, processor, inputs, image = square
    req = _request(model, processor, inputs, image)
    once = _technique(model, alpha=15.0)
    a = once.generate(model, req, **inputs, max_new_tokens=5, do_sample=False)
    assert not np.array_equal(np.asarray(once.last_magnified.image), np.asarray(image))
    late = _technique(model, alpha=15.0, refresh="every_n", refresh_n=50, block_rows="all")
    b = late.generate(model, req, **inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)
    assert late.last["refreshes"] == 1
    every = _technique(model, refresh="every_token")
    c = every.generate(model, req, **inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert every.last["refreshes"] == c.shape[1] - inputs["input_ids"].shape[1]


def test_forward_costs_are_counted(square):
    model, processor, inputs, image = square
    t = _technique(model, beta=0.0, max_iter=3)
    t.generate(model, _request(model, processor, inputs, image), **inputs, max_new_tokens=1, do_sample=False)
    assert t.last["map_forwards"] == 1 + t.last["iterations"]
    assert 1 <= t.last["iterations"] <= 3


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGB", (1, 1), (200, 10, 10)),
        Image.new("L", (40, 30), 128),
        Image.new("RGBA", (30, 40), (10, 200, 10, 128)),
        Image.new("RGB", (400, 3), (10, 10, 200)),
        Image.new("RGB", (2, 300), (10, 10, 200)),
    ],
    ids=["1x1", "grayscale", "rgba", "wide", "tall"],
)
@pytest.mark.parametrize("view", ["pad", "crop"])
def test_odd_images_get_an_answer(tiny_ckpt, image, view):
    model, processor = load(tiny_ckpt)
    hooks.install(model)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color?"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    t = _technique(model, view=view)
    out = t.generate(
        model, _request(model, processor, inputs, image), **inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False
    )
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    mag = t.last_magnified
    side = max(image.size) if view == "pad" else min(image.size)
    assert mag.image.size == mag.view.size == (side, side)


def test_image_free_prompt_is_plain_generation_and_several_images_are_refused(square):
    model, processor, _, image = square
    msgs = [{"role": "user", "content": [{"type": "text", "text": "what color?"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=prompt, return_tensors="pt")
    t = _technique(model)
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    got = t.generate(model, _request(model, processor, inputs, None), **inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want) and t.image_free == 1

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "same?"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image, image], text=prompt, return_tensors="pt")
    req = _request(model, processor, inputs, image)
    req.images = [image, image]
    with pytest.raises(RequestError, match="exactly one image"):
        t.generate(model, req, **inputs, max_new_tokens=2)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="odd"):
        pm.PerceptionMagnifier(4, 4, kernel=4)
    with pytest.raises(ValueError, match="refresh='sometimes'"):
        pm.PerceptionMagnifier(4, 4, refresh="sometimes")
    with pytest.raises(ValueError, match="outside"):
        pm.PerceptionMagnifier(4, 4, deep_layer=9)


def test_saved_visuals(square, tmp_path):
    model, processor, inputs, image = square
    t = _technique(model, visuals_dir=str(tmp_path), max_visuals=2)
    req = _request(model, processor, inputs, image)
    for _ in range(3):
        t.generate(model, req, **inputs, max_new_tokens=1, do_sample=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    kinds = ("magnified.png", "original.png", "perception_map.png", "search.json")
    assert names == [f"{i:04d}_{kind}" for i in range(2) for kind in kinds] + ["pm_trace.jsonl"]
    lines = [json.loads(line) for line in (tmp_path / "pm_trace.jsonl").read_text().splitlines()]
    assert [t["sample"] for t in lines] == [0, 1, 2]  # every sample's search, beyond max_visuals
    for kind in ("original", "perception_map", "magnified"):
        with Image.open(tmp_path / f"0000_{kind}.png") as im:
            assert im.format == "PNG" and im.size == image.size
    trace = json.loads((tmp_path / "0000_search.json").read_text())
    assert len(trace["h_star"]) == pm_view.image_grid(model) ** 2 and trace["iterations"] == len(trace["sums"]) - 1


def test_visuals_dir_resolution(tmp_path):
    from lmms_eval_plugins.visuals import visuals_dir

    assert visuals_dir("", "llava_pm") is None
    assert visuals_dir(str(tmp_path), "llava_pm") == tmp_path
    argv = ["lmms-eval", "--model", "llava_pm", "--output_path", str(tmp_path / "res")]
    assert visuals_dir("auto", "llava_pm", argv) == tmp_path / "res" / "visuals" / "llava_pm"


def test_wrapper_parameters_and_presets():
    from lmms_eval_plugins.models.pm import SPEC
    from methods.params import ModelArgsError, parse_params

    p = parse_params(SPEC.params, {"preset": "mme"}, SPEC.presets, owner=SPEC.name)
    assert (p["alpha"], p["kernel"], p["beta"]) == (10.0, 3, 0.3)
    p = parse_params(SPEC.params, {"preset": "pope", "beta": "0.5", "max_iter": 2.0}, SPEC.presets, owner=SPEC.name)
    assert (p["alpha"], p["kernel"], p["beta"], p["max_iter"]) == (15.0, 5, 0.5, 2)
    with pytest.raises(ModelArgsError, match="one of once, every_token, every_n"):
        parse_params(SPEC.params, {"refresh": "always"}, SPEC.presets)
    with pytest.raises(ModelArgsError, match="out of range"):
        parse_params(SPEC.params, {"alpha": -1}, SPEC.presets)


def test_refreshing_survives_a_generated_image_token(square, monkeypatch):
    """A (random) model may emit the <image> id; re-embedding the answer must not take it for an image slot."""
    model, processor, inputs, image = square
    image_id = model.config.image_token_id
    monkeypatch.setattr(pm, "_token_picker", lambda kwargs: lambda ids, logits: torch.full((1,), image_id))
    t = _technique(model, refresh="every_token")
    out = t.generate(model, _request(model, processor, inputs, image), **inputs, max_new_tokens=3, do_sample=False)
    assert out[0, -3:].tolist() == [image_id] * 3 and t.last["refreshes"] == 3


def test_resample_cd_contrasts_magnified_and_original_logits(square):
    """resample_cd: logits = magnified + cd * (magnified - original), and the loss follows them."""
    model, processor, inputs, image = square
    n = inputs["input_ids"].shape[1]
    labels = inputs["input_ids"].clone()
    labels[:, : n - 1] = -100
    req = _request(model, processor, inputs, image)
    req.prompt_len = n - 1
    plain = _technique(model, alpha=15.0)
    cd = _technique(model, alpha=15.0, resample_cd=0.5)
    with torch.no_grad():
        mag = plain.forward(model, req, **inputs, labels=labels)
        orig = model(**inputs)
        out = cd.forward(model, req, **inputs, labels=labels)
    torch.testing.assert_close(out.logits, mag.logits + 0.5 * (mag.logits - orig.logits))
    torch.testing.assert_close(out.loss, pm.causal_lm_loss(out.logits, labels))
    torch.testing.assert_close(pm.causal_lm_loss(mag.logits, labels), mag.loss)


def test_single_layer_and_official_divisor():
    t = pm.PerceptionMagnifier(32, 24, single_layer=True, layer_map="official")
    assert t.layers == range(11, 12) and t.divisor == 20  # layer 12 alone; the divisor stays n_layers - L
    assert (
        pm.PerceptionMagnifier(32, 24).divisor == 21
        and pm.PerceptionMagnifier(32, 24, layer_map="official").divisor == 20
    )
    assert pm.PerceptionMagnifier(32, 24, single_layer=True).divisor == 1
    t = pm.PerceptionMagnifier(32, 24, block_rows="first_all", refresh="every_token")
    assert (t.block_rows(first=True), t.block_rows(first=False)) == ("all", "last")


def test_official_sampling_option(square):
    """temperature=1.0 samples at T=1 with top_k 50 whatever the task asks (the official runs: T=1, no top-k)."""
    model, processor, inputs, image = square
    t = _technique(model, temperature=1.0)
    assert t.decoding({"do_sample": False, "max_new_tokens": 2}) == {
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 1.0,
        "max_new_tokens": 2,
    }
    assert _technique(model).decoding({"do_sample": False}) == {"do_sample": False}
    torch.manual_seed(0)
    out = t.generate(model, _request(model, processor, inputs, image), **inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] <= inputs["input_ids"].shape[1] + 2
