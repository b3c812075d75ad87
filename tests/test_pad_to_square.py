"""pad_to_square (every wrapper): LLaVA-1.5's expand2square before the checkpoint's processor, undone for boxes."""

import pytest
import torch
from PIL import Image, ImageDraw

from methods.geometry import processor_geometry
from methods.technique import SquarePad, mean_colour, pad_to_square


def _clip_processor(side=96):
    from transformers import CLIPImageProcessor

    # llava-1.5-7b-hf's processor: shortest-edge resize + centre crop (a square passes whole)
    return CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def test_pad_is_expand2square_with_the_mean_colour():
    ip = _clip_processor()
    fill = mean_colour(ip)
    assert fill == tuple(int(x * 255) for x in ip.image_mean)
    image = Image.new("RGB", (30, 12), (255, 0, 0))
    square, pad = pad_to_square(image, fill)
    assert square.size == (30, 30) and pad == SquarePad(30, 12) and pad.offset == (0, 9)
    assert (
        square.getpixel((0, 0)) == fill and square.getpixel((0, 9)) == (255, 0, 0) and square.getpixel((0, 21)) == fill
    )
    same, _ = pad_to_square(Image.new("RGB", (8, 8)), fill)
    assert same.size == (8, 8)
    box = [0.1, 0.2, 0.5, 0.9]
    assert pad.to_original(pad.to_square(box)) == pytest.approx(box)
    assert pad.to_original([0, 0, 1, 1]) == [0.0, 0.0, 1.0, 1.0]  # the padding band is clipped away


@pytest.mark.parametrize("size", [(300, 180), (150, 260)])
def test_boxes_map_back_through_pad_and_processor(size):
    """Draw a red box near an edge (a crop would cut it), pad, run the real processor, find the box in its
    pixels, map back through geometry.after_pad: it lands on the drawn box."""
    side = 96
    ip = _clip_processor(side)
    w, h = size
    box = (int(0.02 * w), int(0.05 * h), int(0.20 * w), int(0.30 * h))
    image = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(image).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(255, 0, 0))
    square, pad = pad_to_square(image, mean_colour(ip))
    pv = ip(images=[square], return_tensors="pt")["pixel_values"][0]
    rgb = pv * torch.tensor(ip.image_std)[:, None, None] + torch.tensor(ip.image_mean)[:, None, None]
    ys, xs = ((rgb[0] > 0.6) & (rgb[1] < 0.4) & (rgb[2] < 0.4)).nonzero(as_tuple=True)
    detected = [
        xs.min().item() / side,
        ys.min().item() / side,
        (xs.max().item() + 1) / side,
        (ys.max().item() + 1) / side,
    ]
    geo = processor_geometry(ip, square.size).after_pad(pad)
    truth = [box[0] / w, box[1] / h, box[2] / w, box[3] / h]
    tol = 1.5 / side * pad.side / min(w, h)
    assert geo.to_original(detected) == pytest.approx(truth, abs=tol)
    assert geo.to_processed(truth) == pytest.approx(detected, abs=1.5 / side)


def test_recording_processor_pads_for_every_wrapper():
    """The base wrapper's processor view: with pad_to_square the processor receives squares, the request records the pads."""
    from lmms_eval_plugins.base import COMMON_PARAMS, RecordingProcessor

    assert "pad_to_square" in {p.name for p in COMMON_PARAMS}
    seen = {}

    class Processor:
        image_processor = _clip_processor()

        def __call__(self, images=None, text=None, **kw):
            seen["sizes"] = [im.size for im in images]
            return {}

    rp = RecordingProcessor(Processor(), pad_to_square=True)
    rp(images=[Image.new("RGB", (40, 20))], text=["<image> x"])
    assert seen["sizes"] == [(40, 40)] and rp.last_pads == [SquarePad(40, 20)] and rp.last_images[0].size == (40, 40)
    off = RecordingProcessor(Processor())
    off(images=[Image.new("RGB", (40, 20))], text=["<image> x"])
    assert seen["sizes"] == [(40, 20)] and off.last_pads == []


def test_pad_to_square_is_a_common_parameter():
    """Declared once in the base wrapper's COMMON_PARAMS, so every wrapper parses it (here: llava_lochead)."""
    from lmms_eval_plugins.base import COMMON_PARAMS
    from lmms_eval_plugins.models.lochead import SPEC
    from methods.params import parse_params

    params = parse_params((*SPEC.params, *COMMON_PARAMS), {"pad_to_square": "true"}, SPEC.presets, owner=SPEC.name)
    assert params["pad_to_square"] is True


OFFICIAL_PRESETS = {
    "llava_lochead": ("official", "official_v2"),
    "llava_knockout": (
        "official",
        "official_no_encoding",
        "official_block_query",
        "official_block_query_unidirection",
        "official_block_vis_to_all_from_layer",
        "official_gen_not_4_to_20",
        "official_query_not_4_to_20",
        "official_all_not_4_to_20",
    ),
    "llava_reprompt": ("official", "official_no_encoding", "official_reprompt", "fastv"),
}


# the presets that mirror a run of the official code, whose LLaVA-1.5 CLIPImageProcessor (transformers 4.3x-4.5x,
# the slow class) resizes with PIL: every preset that pads, and PM's, PAI's and PAINT's official scripts' presets
PIL_PRESETS = {
    **OFFICIAL_PRESETS,
    "llava_pm": ("official_pope", "official_mme"),
    "llava_pai": ("official", "paper"),
    "llava_paint": ("official", "script", "paper", "paper_spatial"),
}


def _check_presets(name: str, listed: dict, arg: str, on, off) -> None:
    """``arg`` resolves to ``on`` under exactly the presets ``listed[name]`` (which hold every official_* preset),
    to ``off`` under the others, and to ``off`` when given after a listed preset."""
    import importlib

    from lmms_eval_plugins.base import COMMON_PARAMS
    from methods.params import parse_params

    spec = importlib.import_module(f"lmms_eval_plugins.models.{name.removeprefix('llava_')}").SPEC
    assert spec.name == name
    params = (*spec.params, *COMMON_PARAMS)
    official = listed[name]
    assert {p for p in spec.presets if p.startswith("official")} <= set(official)
    for preset in spec.presets:
        got = parse_params(params, {"preset": preset}, spec.presets, owner=name)[arg]
        assert got == (on if preset in official else off), f"{name} preset={preset}: {arg}={got}"
    for preset in official:
        given = parse_params(params, {"preset": preset, arg: str(off).lower()}, spec.presets, owner=name)
        assert given[arg] == off


@pytest.mark.parametrize("name", sorted(OFFICIAL_PRESETS))
def test_official_presets_pad_to_square_as_the_official_llava(name):
    """The official code preprocesses with LLaVA-1.5's process_images (image_aspect_ratio=pad: expand2square), so
    every official preset pads (and every official_* preset is listed here); an explicit pad_to_square=false after
    the preset wins; the other presets keep the checkpoint's processor alone."""
    _check_presets(name, OFFICIAL_PRESETS, "pad_to_square", True, False)


@pytest.mark.parametrize("name", sorted(PIL_PRESETS))
def test_official_presets_resize_with_pil_as_the_official_stack(name):
    """The official stacks run LLaVA-1.5's CLIPImageProcessor from transformers 4.x, which resamples with PIL, so
    every preset that mirrors an official run sets image_backend=pil; image_backend=default after it wins; the
    other presets keep the processor as the class loads it."""
    _check_presets(name, PIL_PRESETS, "image_backend", "pil", "default")
