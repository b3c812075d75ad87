"""Image geometry (methods/geometry.py) against the processors' own token counts and the models' own layout."""

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from lmms_eval_plugins import testing
from methods import families, geometry
from methods.families import anyres as anyres_family

# (W, H): square, 2:1 both ways, odd aspects that leave padding, extreme ones (OneVision shrinks, degenerate rows)
SIZES = [
    (32, 32),
    (64, 32),
    (32, 64),
    (100, 37),
    (37, 100),
    (90, 90),
    (61, 47),
    (47, 61),
    (250, 30),
    (30, 250),
    (7, 200),
    (300, 11),
    (96, 33),
]
PROMPT = "USER: <image>\nwhat color ? ASSISTANT:"


@pytest.fixture(scope="module", params=["llava_next", "llava_onevision"])
def anyres(request, tmp_path_factory):
    build = testing.build_tiny_llava_next if request.param == "llava_next" else testing.build_tiny_llava_onevision
    ckpt = build(tmp_path_factory.mktemp(request.param))
    return request.param, ckpt, AutoConfig.from_pretrained(ckpt), AutoProcessor.from_pretrained(ckpt)


@pytest.mark.parametrize("size", SIZES)
def test_token_count_matches_processor(anyres, size):
    family, _, config, processor = anyres
    inputs = processor(images=[Image.new("RGB", size)], text=PROMPT, return_tensors="pt")
    n_image = int((inputs["input_ids"] == config.image_token_id).sum())
    geo = families.image_geometry(config, processor, size, inputs["input_ids"])  # raises on any mismatch
    base, high = geo.blocks
    assert geo.family == family and geo.all_positions().numel() == n_image
    assert (base.rows, base.cols) == (4, 4) and base.newlines.numel() == 0
    assert high.newlines.numel() == high.rows
    assert int(base.positions[0]) == int((inputs["input_ids"][0] == config.image_token_id).nonzero()[0])
    # the processor's own arithmetic for the high-res part (un-padded features + newlines)
    tiles = anyres_family.anyres_tiling(config, size)
    assert tiles[0] * tiles[1] + 1 == inputs["pixel_values"].shape[1]  # the tower's crops: base + tiles


def test_newlines_and_grids_match_the_model(anyres):
    """Where the model itself puts image_newline embeddings = geometry.newlines, for every size."""
    family, ckpt, config, processor = anyres
    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    newline = model.model.image_newline.detach()
    seen = {}
    model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.update(embeds=kw["inputs_embeds"]), with_kwargs=True
    )
    shrunk = 0
    for size in SIZES:
        inputs = processor(images=[Image.new("RGB", size, (200, 10, 10))], text=PROMPT, return_tensors="pt")
        with torch.no_grad():
            model(**inputs)
        is_newline = (seen["embeds"][0] == newline).all(-1).nonzero().flatten()
        geo = families.image_geometry(config, processor, size, inputs["input_ids"])
        assert torch.equal(is_newline, geo.newlines), size
        high = geo.block("highres")
        tiles = anyres_family.anyres_tiling(config, size)
        shrunk += high.rows * high.cols < (4 * tiles[0]) * (4 * tiles[1]) * 0.6
    if family == "llava_onevision":
        assert shrunk >= 3  # the interpolation branch is exercised


def test_regions_undo_the_resize_padding():
    # 100x20 on an 8x8 stitched grid: scaled by 8/100 the image is 1.6 rows high, centred; the model keeps
    # rows 3..4 (padding (8 - round(1.6)) // 2 = 3 each side), which see y from -0.125 to 1.125 of the image
    rows, cols, region = anyres_family.unpadded_grid(100, 20, 8, 8)
    assert (rows, cols) == (2, 8)
    assert region == pytest.approx((0.0, -0.125, 1.0, 1.125))
    rows, cols, region = anyres_family.unpadded_grid(20, 100, 8, 8)  # and transposed
    assert (rows, cols) == (8, 2) and region == pytest.approx((-0.125, 0.0, 1.125, 1.0))
    assert anyres_family.unpadded_grid(64, 32, 4, 8) == (4, 8, (0.0, 0.0, 1.0, 1.0))  # exact fit: nothing removed


def test_llava15_is_one_block_over_the_centre_crop(tiny_ckpt):
    config = AutoConfig.from_pretrained(tiny_ckpt)
    processor = AutoProcessor.from_pretrained(tiny_ckpt)
    size = (40, 30)
    inputs = processor(images=[Image.new("RGB", size)], text=PROMPT, return_tensors="pt")
    geo = families.image_geometry(config, processor, size, inputs["input_ids"])
    (block,) = geo.blocks
    assert (block.rows, block.cols) == (4, 4) and block.newlines.numel() == 0
    assert torch.equal(geo.all_positions(), (inputs["input_ids"][0] == config.image_token_id).nonzero().flatten())
    # shortest-edge resize to 42x32, centre crop 32x32 from x=5: the middle of the image
    assert block.region == pytest.approx((5 / 42, 0.0, 37 / 42, 1.0))
    assert block.cell_boxes()[0].tolist() == pytest.approx([5 / 42, 0.0, 5 / 42 + 8 / 42, 0.25])


def test_mismatch_is_refused(anyres):
    family, _, config, processor = anyres
    inputs = processor(images=[Image.new("RGB", (100, 37))], text=PROMPT, return_tensors="pt")
    with pytest.raises(geometry.GeometryError, match="predict"):
        families.image_geometry(config, processor, (37, 100), inputs["input_ids"])  # the wrong image size


def test_unknown_family_is_named(tiny_ckpt):
    config = AutoConfig.from_pretrained(tiny_ckpt)
    config.model_type = "paligemma"
    with pytest.raises(
        geometry.GeometryError,
        match="no image geometry for model_type 'paligemma'; supported: gemma3, internvl, llava, llava_next",
    ):
        families.image_geometry(config, None, (10, 10), torch.tensor([[1, 2]]))
