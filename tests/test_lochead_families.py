"""Localization-head discovery beyond LLaVA-1.5: Qwen2.5-VL (non-square merged grid) and LLaVA-NeXT /
OneVision (the block lochead's ``block`` names), on tiny random checkpoints.

Discovery's per-sample maps are read over the grid methods/geometry.py gives the evaluation request; its
ranking equals one recomputed from a plain eager forward with ``output_attentions``; a discovered heads
file loads into ``qwen2_5_vl_lochead``; the command loads each family and refuses what it cannot do."""

import json

import pytest
import torch
from conftest import REPO, TASKS
from PIL import Image
from test_qwen import PIXELS, build_tiny_qwen

from lmms_eval_plugins import testing
from methods import hooks
from methods import lochead as L
from methods import lochead_heads as LH
from methods import lochead_maps as LM
from methods.families import image_geometry

TEXT = "Please provide the bounding box coordinate of the region this sentence describes: the red square"
SIZES = [(100, 37), (48, 40), (37, 90)]  # non-square: Qwen 3x7 / 4x5 / 7x3 merged grids at PIXELS; NeXT several tiles


def _image(size):
    img = Image.new("RGB", size, (128, 128, 128))
    img.paste((220, 40, 40), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return img


SAMPLES = [(_image(s), TEXT) for s in SIZES]


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory):
    return build_tiny_qwen(tmp_path_factory.mktemp("tiny_qwen_lochead"))


def _load(ckpt, eager=False):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kw = {"attn_implementation": "eager"} if eager else {}
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32, **kw).eval()
    return model, AutoProcessor.from_pretrained(ckpt)


def _discover(model, processor, block="base", selection="ours"):
    seen = []
    result = LH.discover_heads(
        model,
        processor,
        SAMPLES,
        per_sample=4,
        selection=selection,
        block=block,
        on_sample=lambda i, image, maps, *rest: seen.append((maps, rest[-1])),
    )
    return result, seen


def _eager_maps(model, processor, image, block):
    """The last prompt token's attention over the block's cells from a stock eager forward (no hooks)."""
    family = model.config.model_type
    inputs = LH.prompt_inputs(processor, image, TEXT, "task", family)
    thw = {"image_grid_thw": inputs["image_grid_thw"]} if "image_grid_thw" in inputs else {}
    b = image_geometry(model.config, processor, image.size, inputs["input_ids"], thw).block(block)
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions
    return torch.stack([a[0, :, -1, b.positions] for a in att]).float(), b.grid_hw


def _ranking_from(maps_and_grids, num_layers, num_heads):
    ref = LH.DiscoveryResult(num_layers, num_heads)
    for maps, grid in maps_and_grids:
        selected, s_img, candidates, entropy = LM.select_sample_heads(maps, grid, 4, 8)
        ref.add(selected, s_img, entropy, len(candidates))
    return ref.ranked()


def _check_against_eager(ckpt, block="base"):
    eager, processor = _load(ckpt, eager=True)
    reference = [_eager_maps(eager, processor, im, block) for im, _ in SAMPLES]
    model, processor = _load(ckpt)
    hooks.install(model)
    result, seen = _discover(model, processor, block)
    for (maps, grid), (ref, ref_grid) in zip(seen, reference):
        assert grid == ref_grid and maps.shape[-1] == grid[0] * grid[1]
        torch.testing.assert_close(maps, ref, rtol=1e-4, atol=1e-5)
    geo = LH.model_geometry(model)
    assert result.ranked() == _ranking_from(reference, geo["num_layers"], geo["num_heads"])
    return seen


def test_qwen_discovery_reads_the_merged_grid_and_matches_an_eager_forward(qwen_ckpt):
    from transformers import AutoConfig, AutoProcessor

    seen = _check_against_eager(qwen_ckpt)
    config, processor = AutoConfig.from_pretrained(qwen_ckpt), AutoProcessor.from_pretrained(qwen_ckpt)
    for (image, _), (_maps, grid) in zip(SAMPLES, seen):
        inputs = LH.prompt_inputs(processor, image, TEXT, "task", "qwen2_5_vl")
        merge = config.vision_config.spatial_merge_size
        thw = inputs["image_grid_thw"][0]
        assert grid == (int(thw[1]) // merge, int(thw[2]) // merge)
    assert [g for _, g in seen] == [(3, 7), (4, 5), (7, 3)]  # non-square both ways


def test_next_discovery_reads_the_named_block(tmp_path):
    ckpt = testing.build_tiny_llava_next(tmp_path / "next")
    base = _check_against_eager(ckpt, "base")
    assert all(g[0] == g[1] for _, g in base)  # the base block: the tower's square grid
    high = _check_against_eager(ckpt, "highres")
    assert [g for _, g in high] != [g for _, g in base]


def test_qwen_heads_file_from_discovery_loads_into_the_wrapper(qwen_ckpt, tmp_path, monkeypatch, capsys):
    from lmms_eval_plugins.cli import main
    from lmms_eval_plugins.models.qwen2_5_vl import Qwen25VlLocheadChat

    monkeypatch.setenv("LMMS_PLUGINS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "heads.json"
    args = [
        "discover-heads",
        "--pretrained",
        str(qwen_ckpt),
        "--task",
        "tiny_rec",
        "--include-path",
        str(TASKS),
        "--n",
        "3",
        "--repeats",
        "1",
        "--output",
        str(out),
        "--min-pixels",
        str(PIXELS["min_pixels"]),
        "--max-pixels",
        str(PIXELS["max_pixels"]),
    ]
    assert main(args) == 0, capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["n_samples"] == 3 and doc["block"] == "base"
    assert doc["image_processor_size"] == {"shortest_edge": PIXELS["min_pixels"], "longest_edge": PIXELS["max_pixels"]}
    lm = Qwen25VlLocheadChat(pretrained=str(qwen_ckpt), device="cpu", heads=str(out), top_k=2, **PIXELS)
    assert lm.technique.heads == [(h["layer"], h["head"]) for h in doc["heads"][:2]]
    # other pixels, other grids: another cache entry
    assert main([*args[:-4], "--min-pixels", "3136", "--max-pixels", "12544"]) == 0
    assert "heads file:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, reason",
    [
        (["--block", "highres"], "--block highres is for InternVL (HF), LLaVA-NeXT, LLaVA-OneVision"),
        (["--prompt", "official"], "LLaVA-1.5 only"),
    ],
)
def test_discover_heads_command_refuses_what_it_cannot_do(qwen_ckpt, tmp_path, extra, reason, capsys):
    from lmms_eval_plugins.cli import main

    args = [
        "discover-heads",
        "--pretrained",
        str(qwen_ckpt),
        "--task",
        "tiny_rec",
        "--include-path",
        str(TASKS),
        "--n",
        "1",
    ]
    assert main([*args, *extra]) == 2
    assert reason in capsys.readouterr().out


def test_discover_heads_command_on_next_names_its_block(tmp_path, monkeypatch, capsys):
    from lmms_eval_plugins.cli import main

    monkeypatch.setenv("LMMS_PLUGINS_CACHE", str(tmp_path / "cache"))
    ckpt = testing.build_tiny_llava_next(tmp_path / "next")
    args = [
        "discover-heads",
        "--pretrained",
        str(ckpt),
        "--task",
        "tiny_rec",
        "--include-path",
        str(TASKS),
        "--n",
        "2",
        "--repeats",
        "1",
    ]
    assert main([*args, "--min-pixels", "3136"]) == 2
    assert "--min-pixels/--max-pixels are Qwen2.5-VL's" in capsys.readouterr().out
    assert main([*args, "--block", "highres", "--output", str(tmp_path / "h.json")]) == 0, capsys.readouterr().out
    doc = json.loads((tmp_path / "h.json").read_text())
    assert doc["block"] == "highres" and doc["n_samples"] == 2 and "image_processor_size" not in doc


def test_qwen_heads_auto_through_the_cli(qwen_ckpt, tmp_path, monkeypatch):
    args = (
        f"pretrained={qwen_ckpt},heads=auto,discover_task=tiny_rec,discover_n=3,discover_repeats=1,include_path={TASKS},"
        f"min_pixels={PIXELS['min_pixels']},max_pixels={PIXELS['max_pixels']}"
    )
    env_cache = tmp_path / "cache"
    monkeypatch.setenv("LMMS_PLUGINS_CACHE", str(env_cache))
    res, log = testing.run_lmms_eval(
        "qwen2_5_vl_lochead", args, "tiny_rec", tmp_path / "out", include_path=TASKS, cwd=REPO
    )
    assert res is not None, log[-3000:]
    assert (
        0.0 <= res["results"]["tiny_rec"]["refcoco_IoU,none"] <= 1.0
    )  # the metric was computed, not only a file written
    samples = testing.read_samples(tmp_path / "out", "tiny_rec")
    assert len(samples) == 4 and all(L.parse_box(str(s["filtered_resps"])) for s in samples), samples
    files = list((env_cache / "heads").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["n_samples"] == 3


@pytest.fixture(scope="module")
def internvl_ckpt(tmp_path_factory):
    return testing.build_tiny_internvl(tmp_path_factory.mktemp("tiny_internvl_lochead"))


def test_internvl_discovery_reads_the_named_block(internvl_ckpt, monkeypatch):
    """InternVL (HF): discovery over the thumbnail (base) or the stitched tiles (highres) equals a stock eager
    forward's attention and ranking; an image of one tile has no highres block: refused."""
    from methods.technique import RequestError

    ckpt = internvl_ckpt
    base = _check_against_eager(ckpt, "base")
    assert [g for _, g in base] == [(4, 4)] * 3  # the thumbnail, or the only tile of (48, 40)
    monkeypatch.setitem(globals(), "SAMPLES", [(_image(s), TEXT) for s in [(100, 37), (37, 90), (200, 150)]])
    high = _check_against_eager(ckpt, "highres")
    assert [g for _, g in high] == [(4, 12), (12, 4), (8, 12)]  # 1x3, 3x1, 2x3 tiles of 4x4 tokens
    model, processor = _load(ckpt)
    monkeypatch.setitem(globals(), "SAMPLES", [(_image((48, 40)), TEXT)])
    with pytest.raises(RequestError, match=r"the highres block of this \(48, 40\) image is empty; use block=base"):
        _discover(model, processor, "highres")


def test_internvl_discover_heads_command_records_the_tiling_and_loads_into_the_wrapper(
    internvl_ckpt, qwen_ckpt, tmp_path, monkeypatch, capsys
):
    """`discover-heads --max-patches N` on InternVL: the tiling (which sets the positions, and the highres grid) is
    part of the cache key and the heads file, and the file loads into internvl_hf_lochead; --max-patches elsewhere is
    refused. (tiny_rec has a 40x40 image: one tile, no highres block, so the base block here.)"""
    from lmms_eval_plugins.cli import main
    from lmms_eval_plugins.models.internvl import InternvlHfLocheadChat

    monkeypatch.setenv("LMMS_PLUGINS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "heads.json"
    args = ["discover-heads", "--task", "tiny_rec", "--include-path", str(TASKS), "--n", "3", "--repeats", "1"]
    internvl = [*args, "--pretrained", str(internvl_ckpt)]
    assert main([*internvl, "--max-patches", "12", "--output", str(out)]) == 0
    assert "max_patches=12 (given)" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert (doc["n_samples"], doc["block"], doc["min_patches"], doc["max_patches"]) == (3, "base", 1, 12)
    lm = InternvlHfLocheadChat(pretrained=str(internvl_ckpt), device="cpu", heads=str(out), top_k=2)
    assert lm.technique.heads == [(h["layer"], h["head"]) for h in doc["heads"][:2]]
    assert main([*internvl, "--max-patches", "6"]) == 0
    assert "heads file:" in capsys.readouterr().out  # not the cached result of max_patches=12
    assert main([*args, "--pretrained", str(qwen_ckpt), "--max-patches", "6"]) == 2
    assert "--max-patches is InternVL's" in capsys.readouterr().out
