"""Localization heads: arithmetic against independent calculations, capture, answers, heads files."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import load
from PIL import Image, ImageDraw
from scipy import ndimage

from methods import hooks
from methods import lochead as L
from methods import lochead_heads as LH
from methods import lochead_maps as LM
from methods import lochead_official as LO
from methods.geometry import processor_geometry
from methods.technique import Request, RequestError

# ------------------------------------------------------------------ selection arithmetic


def _knee_reference(values):
    """Distance of each point to the line through the first and last point (2-D cross product)."""
    y = np.asarray(values, dtype=float)
    x = np.arange(len(y), dtype=float)
    p0, p1 = np.array([x[0], y[0]]), np.array([x[-1], y[-1]])
    d = p1 - p0
    dist = [abs(d[0] * (yy - p0[1]) - d[1] * (xx - p0[0])) / np.linalg.norm(d) for xx, yy in zip(x, y)]
    return int(np.argmax(dist))


def test_knee_is_the_point_farthest_from_the_chord():
    curve = [10.0, 6.0, 2.0, 1.5, 1.2, 1.0, 0.9, 0.8]
    assert LM.knee_index(curve) == _knee_reference(curve) == 2
    rng = np.random.default_rng(0)
    for _ in range(20):
        v = np.sort(rng.exponential(size=30))[::-1].tolist()
        assert LM.knee_index(v) == _knee_reference(v)
    assert LM.knee_index([3.0, 1.0]) == 0


def test_heads_above_knee_ranks_by_image_attention():
    s_img = torch.tensor([[9.0, 1.0, 1.2], [0.5, 8.5, 0.8]])
    # descending: 9 (0,0), 8.5 (1,1), 1.2 (0,2), 1, 0.8, 0.5: the knee is the foot of the drop,
    # 4.4 below the chord; heads at or above it are kept (the reference keeps S_img >= knee value)
    assert LM.knee_index([9.0, 8.5, 1.2, 1.0, 0.8, 0.5]) == _knee_reference([9.0, 8.5, 1.2, 1.0, 0.8, 0.5]) == 2
    assert LM.heads_above_knee(s_img) == [(0, 0), (1, 1), (0, 2)]
    # raw axes, as in the reference code: x is the rank, y the attention sum (no rescaling)
    small = [0.9, 0.85, 0.12, 0.1, 0.08, 0.05]
    assert LM.knee_index(small) == _knee_reference(small)


@pytest.mark.parametrize("shape", [(24, 24), (5, 7), (2, 3)])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_gaussian_smoothing_matches_scipy(shape, sigma):
    g = torch.rand(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = LM.gaussian_smooth(g, sigma).numpy()
    ref = ndimage.gaussian_filter(g.numpy(), sigma)  # scipy defaults: mode reflect, truncate 4
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    stack = torch.stack([g, 2 * g])
    np.testing.assert_allclose(LM.gaussian_smooth(stack, sigma)[1].numpy(), 2 * ref, atol=1e-6)
    assert torch.equal(LM.gaussian_smooth(g, 0), g)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_connected_components_match_scipy(connectivity):
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    gen = torch.Generator().manual_seed(3)
    for shape in [(24, 24), (7, 11), (1, 5)]:
        mask = torch.rand(shape, generator=gen) > 0.55
        ours, n = LM.connected_components(mask, connectivity)
        ref, n_ref = ndimage.label(mask.numpy(), structure)
        assert n == n_ref
        assert (ours.numpy() == ref).all()


def _entropy_reference(grid, connectivity):
    g = grid.numpy().astype(float)
    labels, n = ndimage.label(g > g.mean(), ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2))
    if n == 0:
        return math.inf
    mass = np.array([g[labels == i].sum() for i in range(1, n + 1)])
    p = mass / mass.sum()
    return float(-(p * np.log(p)).sum())


def test_spatial_entropy_by_component_mass():
    one_blob = torch.zeros(6, 6)
    one_blob[1:3, 1:3] = 1.0
    assert LM.spatial_entropy(one_blob) == pytest.approx(0.0)
    two = torch.zeros(6, 6)
    two[0:2, 0:2] = 0.75  # mass 3
    two[4, 4] = 1.0  # mass 1: shares are mass, not cell count (4 cells vs 1)
    assert LM.spatial_entropy(two) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    diagonal = torch.zeros(4, 4)
    diagonal[0, 0] = diagonal[1, 1] = 1.0
    assert LM.spatial_entropy(diagonal, 8) == pytest.approx(0.0)  # touching corners: one component
    assert LM.spatial_entropy(diagonal, 4) == pytest.approx(math.log(2))
    assert LM.spatial_entropy(torch.ones(4, 4)) == math.inf  # uniform: nothing localised
    gen = torch.Generator().manual_seed(5)
    for c in (4, 8):
        for _ in range(5):
            g = torch.rand(9, 9, generator=gen) ** 3
            assert LM.spatial_entropy(g, c) == pytest.approx(_entropy_reference(g, c))


def test_sample_selection_keeps_low_entropy_heads_above_the_knee():
    h = w = 4
    maps = torch.full((2, 3, h * w), 0.001)
    sharp = torch.zeros(h, w)
    sharp[1:3, 1:3] = 0.2
    scattered = torch.zeros(h, w)
    scattered[0, 0] = scattered[0, 3] = scattered[3, 0] = scattered[3, 3] = 0.2
    maps[0, 1] = sharp.flatten()  # S_img 0.8, one blob
    maps[1, 2] = scattered.flatten()  # S_img 0.8, four blobs
    maps[0, 0] = 0.1 / 16  # S_img 0.1, uniform: at the knee (the foot of the drop), localises nothing
    maps[1, 0] = sharp.flatten() * 0.05  # S_img 0.04, localises but below the knee
    selected, s_img, candidates, entropy = LM.select_sample_heads(maps, (h, w), per_sample=1)
    assert candidates == [(0, 1), (1, 2), (0, 0)]
    assert entropy[(1, 2)] == pytest.approx(math.log(4)) and entropy[(0, 0)] == math.inf
    assert selected == [(0, 1)]
    assert LM.select_sample_heads(maps, (h, w), per_sample=10)[0] == [(0, 1), (1, 2)]  # inf is never selected
    assert torch.allclose(s_img[0, 1], torch.tensor(0.8))


# ------------------------------------------------------------------ boxes and geometry


def test_box_of_largest_component_and_minmax_box():
    g = torch.zeros(8, 10)
    g[2:5, 1:4] = 1.0  # 9 cells: the largest component, rows 2..4, cols 1..3
    g[6, 8] = 5.0  # 1 cell, more mass per cell
    assert LM.box_from_grid(g, "component") == pytest.approx([1 / 10, 2 / 8, 4 / 10, 5 / 8])
    assert LM.box_from_grid(g, "minmax") == pytest.approx([1 / 10, 2 / 8, 9 / 10, 7 / 8])
    assert LM.box_from_grid(torch.ones(4, 4)) == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="box_mode"):
        LM.box_from_grid(g, "biggest")


def test_combined_map_is_the_sum_of_smoothed_head_maps():
    maps = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = sum(ndimage.gaussian_filter(m.numpy(), 1.0) for m in maps)
    np.testing.assert_allclose(LM.combine_head_maps(maps, 1.0).numpy(), ref, atol=1e-6)


def _detect_red(image_processor, image, side):
    """The red rectangle's box as the processor delivers it (fractions of the processed image)."""
    pv = image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
    rgb = (
        pv * torch.tensor(image_processor.image_std)[:, None, None]
        + torch.tensor(image_processor.image_mean)[:, None, None]
    )
    red = (rgb[0] > 0.6) & (rgb[1] < 0.4) & (rgb[2] < 0.4)
    ys, xs = red.nonzero(as_tuple=True)
    return [xs.min().item() / side, ys.min().item() / side, (xs.max().item() + 1) / side, (ys.max().item() + 1) / side]


@pytest.mark.parametrize("geometry", ["crop", "pad", "stretch"])
@pytest.mark.parametrize("size", [(300, 180), (150, 260)])
def test_undo_preprocessing_on_non_square_images(geometry, size):
    """Draw a red box, let the real processor transform the image, find the box in the
    processed pixels, map it back: it must land on the drawn box (to a processed pixel)."""
    from transformers import CLIPImageProcessor, LlavaImageProcessor

    side = 96
    kw = dict(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    ip = {
        "crop": CLIPImageProcessor(**kw),  # llava-1.5-7b-hf: shortest-edge resize + center crop
        "pad": LlavaImageProcessor(**kw, do_pad=True),  # original LLaVA: pad to square with the mean colour
        "stretch": CLIPImageProcessor(size={"height": side, "width": side}, do_center_crop=False),
    }[geometry]
    w, h = size
    box = (int(0.40 * w), int(0.35 * h), int(0.62 * w), int(0.60 * h))  # inside the central crop
    image = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(image).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(255, 0, 0))
    truth = [box[0] / w, box[1] / h, box[2] / w, box[3] / h]
    geo = processor_geometry(ip, size)
    detected = _detect_red(ip, image, side)
    px = 1.5 / side  # one processed pixel of resampling blur
    assert geo.to_processed(truth) == pytest.approx(detected, abs=px)
    back = geo.to_original(detected)
    tol_x, tol_y = px * side / (geo.scale_x * w), px * side / (geo.scale_y * h)
    assert back[0::2] == pytest.approx(truth[0::2], abs=tol_x)
    assert back[1::2] == pytest.approx(truth[1::2], abs=tol_y)
    if geometry == "pad":  # the padding band maps outside the image and is clipped
        assert geo.to_original([0, 0, 1, 1]) == [0.0, 0.0, 1.0, 1.0]


def test_box_text_parses_with_lmms_eval_rec_parser():
    from lmms_eval.tasks.refcoco.utils_rec import parse_float_sequence_within

    box = [0.1234, 0.0, 0.99999, 0.5]
    text = L.format_box(box)
    assert text == "[0.12, 0.00, 1.00, 0.50]"
    assert parse_float_sequence_within(text) == [0.12, 0.0, 1.0, 0.5]
    assert parse_float_sequence_within(L.format_box(box, 3)) == [0.123, 0.0, 1.0, 0.5]


def test_answer_ids_round_trip_or_fail_clearly(tiny_ckpt):
    from _lochead_tiny import byte_level_tokenizer
    from transformers import AutoProcessor

    text = "[0.12, 0.34, 0.56, 0.78]"
    tok = byte_level_tokenizer()
    assert tok.decode(L.answer_ids(tok, text), skip_special_tokens=True) == text
    word_level = AutoProcessor.from_pretrained(tiny_ckpt).tokenizer  # joins words with spaces, no number tokens
    with pytest.raises(L.AnswerEncodingError, match="cannot write the box"):
        L.answer_ids(word_level, text)


def test_box_pattern_reads_like_lmms_eval_parser():
    from lmms_eval.tasks.refcoco.utils_rec import parse_float_sequence_within

    cases = [
        "[0.12, 0.34, 0.56, 0.78]",
        "[ 0.12, 0.34, 0.56, 0.78 ]",
        "box: [1, 0.5,0.25, 0] and more",
        "[ 0 . 12 , 0 . 34 ]",
        "[0.1 , 0.2, 0.3, 0.4]",
        "no box",
        "[0.1, 0.2, 0.3]",
        "[-0.5, 2, 3.25, 4] [0.1, 0.2, 0.3, 0.4]",
    ]
    for text in cases:
        ours = L.parse_box(text)
        assert (ours if ours is not None else [0, 0, 0, 0]) == parse_float_sequence_within(text), text


# ------------------------------------------------------------------ capture and the technique


@pytest.fixture(scope="module")
def byte_ckpt(tmp_path_factory):
    from _lochead_tiny import build_byte_level_llava

    return build_byte_level_llava(tmp_path_factory.mktemp("lochead_byte"))


@pytest.fixture
def byte_model(byte_ckpt):
    model, processor = load(byte_ckpt)
    hooks.install(model)
    image = Image.new("RGB", (48, 32), (128, 128, 128))
    ImageDraw.Draw(image).rectangle([30, 4, 44, 20], fill=(215, 40, 40))
    inputs = LH.prompt_inputs(processor, image, "the red square")
    req = Request(
        input_ids=inputs["input_ids"],
        image_token_id=model.config.image_token_id,
        prompt_len=inputs["input_ids"].shape[1],
        images=[image],
        text="",
        processor=processor,
    )
    return model, processor, inputs, req


def _eager_maps(ckpt, inputs, pos):
    model, _ = load(ckpt, "eager")
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    return torch.stack([a[0, :, -1, pos] for a in out.attentions])  # (layers, heads, image tokens)


def test_capture_matches_eager_attentions_and_stops_early(byte_ckpt, byte_model):
    model, _, inputs, req = byte_model
    ref = _eager_maps(byte_ckpt, inputs, req.image_pos)
    maps = LM.capture_image_maps(model, inputs, req.image_pos)
    assert maps.shape == (4, 4, 16)
    torch.testing.assert_close(maps, ref, atol=1e-5, rtol=1e-4)
    ran = []
    handles = [
        layer.register_forward_hook(lambda m, i, o, k=k: ran.append(k))
        for k, layer in enumerate(model.model.language_model.layers)
    ]
    try:
        part = LM.capture_image_maps(model, inputs, req.image_pos, [1, 0])
    finally:
        for hd in handles:
            hd.remove()
    torch.testing.assert_close(part, ref[:2], atol=1e-5, rtol=1e-4)
    assert ran == [0]  # layer 1's attention ended the forward: layers 2 and 3 never ran
    assert not any(hooks.EDITS_ATTR in m.__dict__ for m in model.modules())  # edits removed


def test_generate_answers_with_the_box_of_the_chosen_heads(byte_ckpt, byte_model):
    from lmms_eval.tasks.refcoco.utils_rec import parse_float_sequence_within

    model, processor, inputs, req = byte_model
    heads = [(2, 1), (0, 3), (3, 2)]
    tech = L.LocHead(heads, top_k=2)
    out = tech.generate(model, req, **inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(out[:, : req.input_ids.shape[1]], req.input_ids)
    text = processor.tokenizer.decode(out[0, req.input_ids.shape[1] :], skip_special_tokens=True)
    # independent: eager attentions, scipy smoothing and labelling, the processor's crop by hand
    ref = _eager_maps(byte_ckpt, inputs, req.image_pos)
    combined = sum(ndimage.gaussian_filter(ref[l, h].reshape(4, 4).double().numpy(), 1.0) for l, h in heads[:2])
    labels, n = ndimage.label(combined > combined.mean(), np.ones((3, 3)))
    sizes = [(labels == i).sum() for i in range(1, n + 1)]
    rows, cols = np.nonzero(labels == 1 + int(np.argmax(sizes)))
    box_grid = [cols.min() / 4, rows.min() / 4, (cols.max() + 1) / 4, (rows.max() + 1) / 4]
    # 48x32 -> shortest edge 32 -> 48x32 -> center crop 32x32 at left 8
    x = [min(1, max(0, (v * 32 + 8) / 48)) for v in box_grid[0::2]]
    expected = [x[0], box_grid[1], x[1], box_grid[3]]
    assert parse_float_sequence_within(text) == pytest.approx([round(v, 2) for v in expected], abs=1e-9)


def test_all_heads_and_random_heads(byte_model):
    model, _, inputs, req = byte_model
    every = L.LocHead("all").locate(model, req, **inputs)
    assert every.head_maps.shape == (16, 4, 4)
    assert LH.random_heads(4, 4, 3, seed=1) == LH.random_heads(4, 4, 3, seed=1)
    assert len(set(LH.random_heads(4, 4, 16, seed=2))) == 16


def test_request_without_image_fails_clearly(byte_model):
    model, _, inputs, req = byte_model
    req.images = []
    with pytest.raises(RequestError, match="exactly one image"):
        L.LocHead([(0, 0)]).generate(model, req, **inputs)


# ------------------------------------------------------------------ heads files


def test_heads_files_validate_against_the_model(byte_model, tmp_path):
    from lmms_eval_plugins.heads import shipped_heads_path

    model, *_ = byte_model
    mid = LH.model_id(model)
    good = tmp_path / "good.json"
    LH.write_heads_file(
        good,
        [{"layer": 3, "head": 1, "frequency": 0.5}, {"layer": 0, "head": 2}],
        model_id=mid,
        num_layers=4,
        num_heads=4,
        source="test",
    )
    assert LH.load_heads(good, model) == [(3, 1), (0, 2)]

    seven_b = shipped_heads_path("llava-hf/llava-1.5-7b-hf")
    doc = json.loads(seven_b.read_text())
    assert [(h["layer"], h["head"]) for h in doc["heads"]] == list(LH.FORK_HEADS_7B)
    assert doc["source"].startswith("NOT the paper's") and "selection_best.yaml" in doc["source"]
    assert doc["provenance"]["official"] is False and doc["provenance"]["discovered_here"] is False
    with pytest.raises(LH.HeadsFileError, match="made for model 'llava-hf/llava-1.5-7b-hf'"):
        LH.load_heads(seven_b, model)
    with pytest.raises(LH.HeadsFileError, match="num_layers=32"):
        LH.load_heads(seven_b, model, check_model_id=False)
    out_of_range = tmp_path / "range.json"
    out_of_range.write_text(json.dumps({"model_id": mid, "heads": [{"layer": 1, "head": 7}]}))
    with pytest.raises(LH.HeadsFileError, match="layer 1 head 7 .* outside this model's 4 layers x 4 heads"):
        LH.load_heads(out_of_range, model)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"model_id": "x", "heads": [{"layer": 1,')
    with pytest.raises(LH.HeadsFileError, match="not valid JSON"):
        LH.load_heads(corrupt, model)
    wrong_type = tmp_path / "types.json"
    wrong_type.write_text(json.dumps({"model_id": mid, "heads": [{"layer": "1", "head": 0}]}))
    with pytest.raises(LH.HeadsFileError, match="integer 'layer' and 'head'"):
        LH.load_heads(wrong_type, model)
    with pytest.raises(LH.HeadsFileError, match="does not exist"):
        LH.load_heads(tmp_path / "missing.json", model)


def test_wrapper_refuses_a_bad_heads_file_at_construction(byte_ckpt, tmp_path):
    from lmms_eval_plugins.models.lochead import LlavaLocheadChat

    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("not json")
    with pytest.raises(LH.HeadsFileError, match="not valid JSON"):
        LlavaLocheadChat(pretrained=str(byte_ckpt), heads=str(corrupt))
    with pytest.raises(ValueError, match="no shipped heads file"):
        LlavaLocheadChat(pretrained=str(byte_ckpt))


def test_discovery_is_deterministic_and_counts_selections(byte_model):
    model, processor, *_ = byte_model
    samples = []
    for i, colour in enumerate([(215, 40, 40), (40, 160, 60), (45, 85, 215)]):
        image = Image.new("RGB", (40 + 8 * i, 32), (128, 128, 128))
        ImageDraw.Draw(image).rectangle([4 * i, 4, 4 * i + 14, 20], fill=colour)
        samples.append((image, f"the square number {i}"))
    first = LH.discover_heads(model, processor, samples, per_sample=3)
    second = LH.discover_heads(model, processor, samples, per_sample=3)
    assert first.ranked() == second.ranked()
    assert first.n_samples == 3
    assert sum(r["count"] for r in first.ranked()) <= 3 * 3
    # independent: redo the per-sample selection from eager-free captured maps
    counts = {}
    for image, text in samples:
        inputs = LH.prompt_inputs(processor, image, text)
        maps = LM.capture_image_maps(
            model, inputs, hooks.image_positions(inputs["input_ids"], model.config.image_token_id)
        )
        sel, *_ = LM.select_sample_heads(maps, (4, 4), per_sample=3)
        for lh in sel:
            counts[lh] = counts.get(lh, 0) + 1
    assert {(r["layer"], r["head"]): r["count"] for r in first.ranked()} == counts


# ------------------------------------------------------------------ optional SAM masks


def _tiny_sam(directory):
    """A random SamModel small enough for CPU tests (no download)."""
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor
    from transformers.models.sam.configuration_sam import SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    vision = SamVisionConfig(
        hidden_size=32,
        output_channels=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=64,
        patch_size=8,
        mlp_dim=64,
        global_attn_indexes=[0],
        window_size=4,
        num_pos_feats=8,
    )
    prompt = SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32, iou_head_hidden_dim=16
    )
    torch.manual_seed(0)
    config = SamConfig(
        vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(), mask_decoder_config=decoder.to_dict()
    )
    SamModel(config).eval().save_pretrained(directory)
    SamProcessor(
        image_processor=SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    ).save_pretrained(directory)
    return directory


def test_sam_masks_are_optional(byte_model, tmp_path):
    model, _, inputs, req = byte_model
    tech = L.LocHead([(1, 0), (2, 3)])
    plain = tech.locate(model, req, **inputs)
    assert tech.refiner is None and plain.mask is None  # no SAM path: skipped, nothing loaded
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        L.SamRefiner(tmp_path / "no-sam-here")
    tech.refiner = L.SamRefiner(_tiny_sam(tmp_path / "sam"), use_box=True)
    refined = tech.locate(model, req, **inputs)
    assert refined.mask.shape == (32, 48) and refined.mask.dtype == torch.bool
    rows, cols = refined.mask.any(1).nonzero().flatten().tolist(), refined.mask.any(0).nonzero().flatten().tolist()
    assert refined.box == pytest.approx([cols[0] / 48, rows[0] / 32, (cols[-1] + 1) / 48, (rows[-1] + 1) / 32])
    assert refined.box_processed == plain.box_processed  # SAM refines the answer, not the attention box


def test_wrapper_param_checks(byte_ckpt):
    from lmms_eval_plugins.models.lochead import LlavaLocheadChat
    from methods.params import ModelArgsError

    with pytest.raises(ModelArgsError, match="sam_box=true needs sam"):
        LlavaLocheadChat(pretrained=str(byte_ckpt), heads="all", sam_box=True)
    with pytest.raises(ModelArgsError, match="heads=auto needs discover_task"):
        LlavaLocheadChat(pretrained=str(byte_ckpt), heads="auto")
    with pytest.raises(ModelArgsError, match="box_mode"):
        LlavaLocheadChat(pretrained=str(byte_ckpt), box_mode="largest")


def test_shapeworld_tokenizer_writes_parseable_boxes():
    from lmms_eval.tasks.refcoco.utils_rec import parse_float_sequence_within

    model_module = pytest.importorskip("lmms_eval_plugins.shapeworld.model")
    tok = model_module.build_tokenizer()
    for box in ([0.12, 0.34, 0.56, 0.78], [0.0, 0.0, 1.0, 1.0], [0.005, 0.5, 0.999, 0.25]):
        text = L.format_box(box)
        decoded = tok.decode(L.answer_ids(tok, text), skip_special_tokens=True)
        assert parse_float_sequence_within(decoded) == [round(v, 2) for v in box]


# ------------------------------------------------------------------ official presets, prompt, resume


def test_discovery_resumes_from_partial_counts(byte_model):
    """A discovery killed after k samples and resumed from its saved state counts exactly as one run."""
    model, processor, *_ = byte_model
    samples = [(Image.new("RGB", (40, 32 + 4 * i), (30 * i, 90, 160)), f"the thing {i}") for i in range(4)]
    whole = LH.discover_heads(model, processor, samples, per_sample=3, selection="official_v2")
    part = LH.discover_heads(model, processor, samples[:2], per_sample=3, selection="official_v2")
    resumed = LH.discover_heads(
        model,
        processor,
        samples,
        per_sample=3,
        selection="official_v2",
        result=LH.DiscoveryResult.from_state(json.loads(json.dumps(part.state()))),
    )
    assert resumed.n_samples == 4 and resumed.ranked() == whole.ranked()


class _PieceTokenizer:
    """SentencePiece-like: words become '▁word' pieces, '\\n' its own id, a leading '▁' before a newline (as LLaMA's)."""

    vocab = {"<s>": 1, "\u2581": 29871, "\n": 13}

    def get_vocab(self):
        return self.vocab

    def _id(self, piece):
        return self.vocab.setdefault(piece, 100 + len(self.vocab))

    def __call__(self, text, add_special_tokens=True):
        ids = [1] if add_special_tokens else []
        if text.startswith("\n"):
            ids.append(29871)  # LLaMA's lone prefix space before a leading newline
        for i, line in enumerate(text.split("\n")):
            if i:
                ids.append(13)
            ids += [self._id("\u2581" + w) for w in line.split()]
        return type("Enc", (), {"input_ids": ids})()


def test_official_prompt_ids_are_the_referseg_form():
    """system + '\\n' + image + '\\n' + query; the query's last token ends the prompt; '▁' (29871) dropped."""
    tok = _PieceTokenizer()
    ids = LO.official_prompt_ids(tok, "a red dog.", image_token_id=7, n_image_tokens=4)
    assert 29871 not in ids
    assert ids[0] == 1 and ids.count(7) == 4
    after = ids[ids.index(7) + 4 :]
    assert after[0] == 13 and after[-1] == tok.vocab["\u2581dog."]
    before = ids[1 : ids.index(7)]
    assert before[-1] == 13 and before[0] == tok.vocab["\u2581You"]
    assert LO.official_query("USER: <image>\nthe red dog ASSISTANT:") == "the red dog"
    assert LO.official_query("<image>\nthe red dog") == "the red dog"


def test_official_presets_parse(byte_ckpt):
    from lmms_eval_plugins.models.lochead import SPEC
    from methods.params import parse_params
    from lmms_eval_plugins.base import COMMON_PARAMS

    v2 = parse_params((*SPEC.params, *COMMON_PARAMS), {"preset": "official_v2"}, SPEC.presets, owner=SPEC.name)
    assert (v2["heads"], v2["selection"], v2["box_scaling"], v2["prompt"], v2["top_k"]) == (
        "self",
        "official_v2",
        "stretch",
        "official",
        5,
    )
    head = parse_params((*SPEC.params, *COMMON_PARAMS), {"preset": "official"}, SPEC.presets, owner=SPEC.name)
    assert (head["selection"], head["prompt"], head["box_scaling"]) == ("official", "official", "geometry")


def test_paper_figures_map_to_lmms_eval_rec_tasks_and_metrics():
    """The paper's REC/RES figures name real lmms-eval tasks; REC rows carry the metric those tasks report."""
    from pathlib import Path

    import lmms_eval
    import yaml

    from lmms_eval_plugins.paper_figures import figures_for, paper_figure

    assert paper_figure("llava_lochead", "shapeworld_rec", "refcoco_ACC@0.5").startswith("86.5 ")
    rows = figures_for("llava_lochead")
    assert len(rows) == 16 and all(f.source and f.differs for f in rows)
    tasks = Path(lmms_eval.__file__).parent / "tasks"
    for f in rows:
        ds = f.task.split("_bbox_rec_")[0]
        assert (tasks / ds / f"{f.task}.yaml").is_file(), f.task
        if f.metric is not None:
            template = (tasks / ds / "_default_template_bbox_rec_yaml").read_text()
            metrics = [
                m["metric"]
                for m in yaml.safe_load("\n".join(l for l in template.splitlines() if "!function" not in l))[
                    "metric_list"
                ]
            ]
            assert f.metric in metrics


def test_no_attention_carried_over_between_samples(byte_model):
    """8ce33b0's batch bug (attention stored only on the first forward of the process, modeling_llama.py:202-204)
    is not ours: each sample's maps are its own, whatever came before."""
    model, processor, *_ = byte_model

    def maps(image, text):
        inputs = LH.prompt_inputs(processor, image, text)
        return LM.capture_image_maps(
            model, inputs, hooks.image_positions(inputs["input_ids"], model.config.image_token_id)
        )

    a = (Image.new("RGB", (40, 32), (200, 30, 30)), "the red one")
    b = (Image.new("RGB", (32, 40), (30, 30, 200)), "the blue one")
    alone = maps(*b)
    maps(*a)
    after = maps(*b)
    assert torch.equal(alone, after) and not torch.equal(maps(*a), after)


def test_discovery_killed_midway_resumes_from_the_partial_file(byte_model, tmp_path, monkeypatch):
    """discover_for_task saves the counts every checkpoint_every samples; a rerun after a crash resumes there
    (fewer prefills) and writes the same heads file as an uninterrupted run."""
    from pathlib import Path

    from lmms_eval_plugins import heads as H

    model, processor, *_ = byte_model
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)  # the task's data_files are relative to the repository
    kw = dict(
        include_path=[str(repo / "tests" / "tasks")],
        n=4,
        repeats=1,
        checkpoint_every=1,
        progress=False,
        selection="official",
    )
    monkeypatch.setenv("LMMS_PLUGINS_CACHE", str(tmp_path / "whole"))
    _, whole, _ = H.discover_for_task(model, processor, "tiny_rec", **kw)

    monkeypatch.setenv("LMMS_PLUGINS_CACHE", str(tmp_path / "killed"))
    real = LH.capture_image_maps
    calls = {"n": 0}

    def dies_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(LH, "capture_image_maps", dies_on_third)  # the name discover_heads calls
    with pytest.raises(KeyboardInterrupt):
        H.discover_for_task(model, processor, "tiny_rec", **kw)
    partial = list((tmp_path / "killed" / "heads").glob("*.partial.json"))
    assert len(partial) == 1 and json.loads(partial[0].read_text())["n_samples"] == 2
    calls["n"] = -100  # no more kills
    _, resumed, _ = H.discover_for_task(model, processor, "tiny_rec", **kw)
    assert calls["n"] == -100 + 2  # only the two missing samples were prefilled
    assert resumed["heads"] == whole["heads"] and resumed["n_samples"] == whole["n_samples"]
    assert not list((tmp_path / "killed" / "heads").glob("*.partial.json"))
    assert resumed["selection"] == "official" and resumed["n"] == min(4, resumed["n_samples"])
