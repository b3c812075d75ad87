"""PM beyond LLaVA-1.5: Qwen2.5-VL (a non-square merged grid, M-RoPE positions) on the tiny random
Qwen2.5-VL of tests/test_qwen.py, and LLaVA-NeXT / OneVision (anyres: the map over the base
block) on the tiny random checkpoints of lmms_eval_plugins.testing, all with a 100x37 image.

PM runs the language model itself (map pass, refinement passes, refreshing decode), so its
embeddings and positions are checked against the model's own: get_rope_index, a full forward,
a full forward with the blocked keys removed by the hook layer, and greedy generate when the
magnification is the identity; then the magnified image keeps the prompt's size and
image_grid_thw / image_sizes and the map is the geometry's rows x cols; and one run of
qwen2_5_vl_pm through the real lmms-eval CLI."""

import numpy as np
import pytest
import torch
from conftest import make_inputs
from test_qwen import SIZE, _cli, _image, _inputs, tiny_qwen  # noqa: F401  (the tiny model fixture)

from lmms_eval_plugins import testing
from methods import hooks, pm, pm_view, pm_search
from methods.technique import Request

GEOMETRY_INPUTS = {"qwen2_5_vl": "image_grid_thw", "llava_next": "image_sizes", "llava_onevision": "image_sizes"}


@pytest.fixture(scope="module")
def qwen(tiny_qwen):  # noqa: F811
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_qwen, attn_implementation="sdpa", dtype=torch.float32
    ).eval()
    processor = AutoProcessor.from_pretrained(tiny_qwen)
    return _ready(model, processor, dict(_inputs(processor)), _image(SIZE))


ALL = ["qwen2_5_vl", "llava_next", "llava_onevision"]


@pytest.fixture(scope="module")
def family(request, tmp_path_factory):
    """(model, processor, inputs, request) of one family (indirect parameter) on its tiny random checkpoint."""
    if request.param == "qwen2_5_vl":
        return request.getfixturevalue("qwen")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    build = testing.build_tiny_llava_next if request.param == "llava_next" else testing.build_tiny_llava_onevision
    ckpt = build(tmp_path_factory.mktemp(request.param))
    model = AutoModelForImageTextToText.from_pretrained(ckpt, attn_implementation="sdpa").eval()
    processor = AutoProcessor.from_pretrained(ckpt)
    inputs, image, _ = make_inputs(processor, size=SIZE)
    return _ready(model, processor, dict(inputs), image)


def _ready(model, processor, inputs, image):
    hooks.install(model)
    key = GEOMETRY_INPUTS[model.config.model_type]
    req = Request(
        inputs["input_ids"],
        model.config.image_token_id,
        inputs["input_ids"].shape[1],
        [image],
        processor=processor,
        config=model.config,
        inputs={key: inputs[key]},
    )
    return model, processor, inputs, req


def _technique(model, **params):
    return pm.PerceptionMagnifier(hooks.num_layers(model), pm_view.image_grid(model), **params)


def test_pm_language_model_pass_has_the_models_positions_and_logits(qwen):
    """Qwen2.5-VL: PM's own pass (its embeddings, its M-RoPE positions, the language model alone)
    equals the model's full forward; the same pass with the LM's default 1-D positions does not."""
    from transformers import DynamicCache

    model, _, inputs, req = qwen
    ids = inputs["input_ids"]
    n = ids.shape[1]
    want, delta = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], inputs["image_grid_thw"])
    pos = pm_view.pass_positions(model, req, n + 3)
    assert torch.equal(pos[..., :n], want)
    assert torch.equal(
        pos[..., n:], (torch.arange(n, n + 3) + delta[0]).view(1, 1, 3).expand(3, 1, 3)
    )  # decoding: text positions
    assert int(delta) < 0  # the image's rows x cols share positions: not the 1-D arange
    with torch.no_grad():
        full = model(**inputs).logits
        emb = pm_view.embed(model, req, ids, inputs["pixel_values"])
        ours = model.lm_head(pm._LanguageModel(model, pos)(emb, DynamicCache(config=model.config.text_config)))
        flat = model.lm_head(pm._LanguageModel(model)(emb, DynamicCache(config=model.config.text_config)))
    assert (ours - full).abs().max() < 1e-5
    assert (flat - full).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"], indirect=True)
def test_anyres_embeddings_equal_the_models(family):
    """PM's own embeddings and LM pass (anyres: the packed base + high-res + newline features) equal the model's forward."""
    from transformers import DynamicCache

    model, _, inputs, req = family
    with torch.no_grad():
        emb = pm_view.embed(model, req, inputs["input_ids"], inputs["pixel_values"])
        run = pm._LanguageModel(model, pm_view.pass_positions(model, req, emb.shape[1]))
        ours = model.lm_head(run(emb, DynamicCache(config=model.config.text_config)))
        full = model(**inputs).logits
    assert (ours - full).abs().max() < 1e-5


@pytest.mark.parametrize(
    "family,rows", [("qwen2_5_vl", "all"), ("qwen2_5_vl", "text"), ("llava_next", "all")], indirect=["family"]
)
def test_map_passes_equal_full_forwards_with_the_blocked_keys(family, rows):
    """Pass 0 and every refinement pass (KV prefix reuse + key mask, the family's positions) equal a
    full forward of the model with those image keys blocked by the hook layer on the same rows
    (anyres: the map and the blocked keys are the base block's; text rows start after the high-res block)."""
    model, _, inputs, req = family
    t = _technique(model, beta=0.0, max_iter=2, block_rows=rows)
    t.generate(model, req, **inputs, max_new_tokens=1, do_sample=False)
    s = t.last_magnified.search
    assert s.iterations >= 2
    pos = req.geometry.base.positions
    assert s.h_star.shape == (pos.numel(),)
    row_spec = hooks.Rows.span(0) if rows == "all" else hooks.Rows.span(req.geometry.span[1])
    for i, blocked in enumerate([np.zeros(pos.numel(), dtype=bool)] + s.blocked):
        cap = hooks.Capture(layers=t.layers, keys=pos)
        block = hooks.Block(layers=range(hooks.num_layers(model)), rows=row_spec, keys=pos[torch.as_tensor(blocked)])
        with torch.no_grad(), hooks.edited(model, block, cap):
            model(**inputs)
        np.testing.assert_allclose(
            s.maps[i] * len(t.layers), pm_search.token_map(cap.stacked()[:, 0, :, 0]), atol=1e-5, err_msg=f"pass {i}"
        )


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_next"], indirect=True)
def test_identity_magnification_decodes_like_generate(family):
    """alpha=0 makes the map flat and the magnification the identity: the refreshing decode (PM's own
    LM passes on the magnified stream, M-RoPE positions continued past the prompt) equals greedy generate."""
    model, _, inputs, req = family
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    for refresh in ("once", "every_token"):
        t = _technique(model, alpha=0.0, refresh=refresh, max_iter=1)  # the search does not matter: the map is flat
        got = t.generate(model, req, **inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert torch.equal(got, want), refresh
        assert np.array_equal(np.asarray(t.last_magnified.image), np.asarray(req.images[0]))


@pytest.mark.parametrize("family", ALL, indirect=True)
def test_magnified_image_keeps_the_size_and_grid_and_the_map_is_rows_by_cols(family):
    model, processor, inputs, req = family
    t = _technique(model, alpha=15.0, refresh="every_n", refresh_n=2)
    t.keep_steps = True
    t.generate(model, req, **inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    block = req.geometry.base
    if req.family == "qwen2_5_vl":
        assert block.rows != block.cols  # the non-square case
    else:
        assert (
            len(req.geometry.blocks) == 2 and req.geometry.blocks[1].cols > req.geometry.blocks[1].rows
        )  # several tiles
    key = GEOMETRY_INPUTS[req.family]
    assert len(t.steps) == 2
    for mag in t.steps:
        assert mag.grid_map.shape == block.grid_hw and mag.search.h_star.shape == (block.rows * block.cols,)
        assert mag.image.size == req.images[0].size == mag.density.shape[::-1]
        assert mag.pixel_values.shape == inputs["pixel_values"].shape
        again = processor.image_processor(images=[mag.image], return_tensors="pt")
        assert torch.equal(torch.as_tensor(again[key]), torch.as_tensor(inputs[key]))
    assert not np.array_equal(np.asarray(t.steps[0].image), np.asarray(req.images[0]))
    with pytest.raises(pm.RequestError, match="view=crop does not apply"):
        _technique(model, view="crop").generate(model, req, **inputs, max_new_tokens=1)


def test_cli_qwen2_5_vl_pm(tiny_qwen, tmp_path):  # noqa: F811
    res, log, samples = _cli("qwen2_5_vl_pm", tiny_qwen, tmp_path / "pm", extra=",save_visuals=auto")
    assert res is not None and len(samples) == 3, log[-3000:]
    assert 0.0 <= res["results"]["tiny_yesno"]["exact,none"] <= 1.0
    assert any(str(s["filtered_resps"]).strip("[]' ") for s in samples)
    assert list((tmp_path / "pm").rglob("*_magnified.png")), "saved visuals"
