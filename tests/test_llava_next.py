"""Every technique on LLaVA-NeXT and LLaVA-OneVision (anyres: base crop + high-res tiles + newlines),
on tiny random checkpoints built here, with a non-square image that gives several tiles.

In process: idle wrappers equal llava_hf, edits land on the positions the geometry names, refusals
name their reason. Through the real lmms-eval CLI: each technique answers every document."""

import sys

import pytest
import torch
from conftest import REPO, make_inputs

from lmms_eval_plugins import testing
from methods.params import ModelArgsError

FAMILIES = ("llava_next", "llava_onevision")
SIZE = (100, 37)  # NeXT: a 1x3 tiling (4 crops), un-padded 4x10 grid; OneVision: shrunk to 3x8 by interpolation


def _build(family, path, **kw):
    build = testing.build_tiny_llava_next if family == "llava_next" else testing.build_tiny_llava_onevision
    return build(path, **kw)


@pytest.fixture(scope="module", params=FAMILIES)
def anyres(request, tmp_path_factory):
    return request.param, _build(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def baseline(anyres):
    """llava_hf's own (chat) class on the checkpoint: the model, its answer and logits for one request."""
    from lmms_eval.models.chat.llava_hf import LlavaHf

    family, ckpt = anyres
    lm = LlavaHf(pretrained=str(ckpt), device="cpu", device_map="cpu")
    inputs, _, _ = make_inputs(lm._image_processor, size=SIZE)
    with torch.no_grad():
        answer = lm.model.generate(**inputs, max_new_tokens=6, do_sample=False)
        logits = lm.model(**inputs).logits
    return inputs, answer, logits


def _wrapper(name, ckpt, **kw):
    import importlib

    module = importlib.import_module(f"lmms_eval_plugins.models.{name}")
    return getattr(module, f"Llava{name.capitalize()}Chat")(pretrained=str(ckpt), **kw)


def _request(lm, size=SIZE):
    inputs, _, _ = make_inputs(lm._image_processor, size=size)
    return inputs


IDLE = {
    "pai": {"alpha": 0.0, "use_cfg": False},
    "paint": {"alpha": 0.0, "beta": 0.0},
    "knockout": {"from_layer": 2, "to_layer": 2},
    "viral": {},  # + adapter=: a LoRA adapter whose B matrices are zero (peft's init), merged in
}


@pytest.fixture(scope="module")
def zero_adapter(anyres, tmp_path_factory):
    """A peft LoRA adapter on the LM's attention projections, as peft initialises it (B = 0):
    merging it must leave every weight, so every answer, as it was."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    family, ckpt = anyres
    model = AutoModelForImageTextToText.from_pretrained(ckpt)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    out = tmp_path_factory.mktemp(f"{family}_adapter")
    lora.save_pretrained(out)
    return out


@pytest.mark.parametrize("name", sorted(IDLE))
def test_idle_wrappers_equal_llava_hf(anyres, baseline, name, request):
    family, ckpt = anyres
    if name == "paint" and family == "llava_onevision":
        pytest.skip("llava_paint refuses OneVision (tested below)")
    kw = dict(IDLE[name], **({"adapter": str(request.getfixturevalue("zero_adapter"))} if name == "viral" else {}))
    lm = _wrapper(name, ckpt, **kw)
    inputs = _request(lm)
    with torch.no_grad():
        answer = lm.model.generate(**inputs, max_new_tokens=6, do_sample=False)
        logits = lm.model(**inputs).logits
    assert torch.equal(answer, baseline[1]) and torch.equal(logits, baseline[2])


def test_reprompt_keeping_every_token_answers_like_llava_hf(anyres, baseline):
    family, ckpt = anyres
    lm = _wrapper("reprompt", ckpt, keep_ratio=1.0)
    with torch.no_grad():
        answer = lm.model.generate(**_request(lm), max_new_tokens=6, do_sample=False)
    assert torch.equal(answer, baseline[1])


def _edits(lm, inputs):
    from lmms_eval_plugins.base import family_request

    req = family_request(lm._model, lm._image_processor, dict(inputs))
    req.require_one_image("test")
    return req, lm.technique.recipe(lm._model, req)


def test_pai_boosts_every_grid_token_and_newlines_on_request(anyres, baseline):
    family, ckpt = anyres
    lm = _wrapper("pai", ckpt, alpha=1.0, use_cfg=False, start_layer=0)
    inputs = _request(lm)
    req, (boost,) = _edits(lm, inputs)
    geo = req.geometry
    base, high = geo.blocks
    assert (base.rows, base.cols) == (4, 4) and high.rows * high.cols > 0 and high.newlines.numel() == high.rows
    assert torch.equal(boost.keys.cpu(), torch.cat([base.positions, high.positions]).sort().values)  # no newlines
    assert not set(geo.newlines.tolist()) & set(boost.keys.tolist())
    with torch.no_grad():
        assert not torch.equal(lm.model(**inputs).logits, baseline[2])  # the edit reaches the model
    with_newlines = _wrapper("pai", ckpt, alpha=1.0, newlines=True)
    _, (boost,) = _edits(with_newlines, _request(with_newlines))
    assert torch.equal(boost.keys.cpu(), req.image_pos.cpu())


def test_knockout_blocks_every_image_token_including_newlines(anyres):
    family, ckpt = anyres
    lm = _wrapper("knockout", ckpt, mode="both")
    req, (block,) = _edits(lm, _request(lm))
    assert torch.equal(block.keys.cpu(), req.geometry.all_positions())
    grid_only = _wrapper("knockout", ckpt, mode="both", newlines=False)
    req, (block,) = _edits(grid_only, _request(grid_only))
    assert req.geometry.newlines.numel() > 0
    assert torch.equal(block.keys.cpu(), req.geometry.positions(newlines=False))
    assert not set(req.geometry.newlines.tolist()) & set(block.keys.tolist())


def test_paint_selects_from_the_base_crop_on_next(tmp_path):
    ckpt = _build("llava_next", tmp_path / "next")
    lm = _wrapper("paint", ckpt, alpha=1.0, beta=0.5, start_layer=0)
    inputs = _request(lm)
    req, edits = _edits(lm, inputs)
    boost = edits[-1]
    base = req.geometry.base
    assert torch.equal(boost.image_keys.cpu(), base.positions)  # the base block, not the tiles
    with torch.no_grad():
        lm.model(**inputs)
    sel = lm.technique.last_selector
    assert sel.capture.latest()[0].shape[0] == inputs["pixel_values"].shape[1]  # the tower saw base + tiles
    assert sel.current().local.shape == (1, base.rows * base.cols)  # one selection, from crop 0
    with pytest.raises(BaseException, match="spatial=official boosts the token after the image grid"):
        official = _wrapper("paint", ckpt, spatial="official", spatial_ratio=0.2)
        official.model(**_request(official))


@pytest.mark.parametrize(
    "name,family,kw,reason",
    [
        ("paint", "llava_onevision", {}, "SigLIP vision tower has no CLS token"),
    ],
)
def test_refusals_name_their_reason(tmp_path, name, family, kw, reason):
    ckpt = _build(family, tmp_path / family)
    with pytest.raises(ModelArgsError, match=f"llava_{name} does not support {family} checkpoints.*{reason}"):
        _wrapper(name, ckpt, **kw)


# ---------------------------------------------------------------------------------------
# Localization heads: boxes from the base block and from the high-res block
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def byte_anyres(tmp_path_factory):
    sys.path.insert(0, str(REPO / "tests"))
    from _lochead_tiny import byte_level_tokenizer

    return {f: _build(f, tmp_path_factory.mktemp(f + "_byte"), tokenizer=byte_level_tokenizer()) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_lochead_boxes_from_base_and_highres_blocks(byte_anyres, family):
    from methods.lochead import parse_box

    ckpt = byte_anyres[family]
    boxes = {}
    for block in ("base", "highres"):
        lm = _wrapper("lochead", ckpt, heads="all", block=block)
        inputs = _request(lm)
        with torch.no_grad():
            out = lm.model.generate(**inputs, max_new_tokens=30)
        boxes[block] = parse_box(lm.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
        assert boxes[block] is not None and all(0.0 <= v <= 1.0 for v in boxes[block])
        assert boxes[block][0] < boxes[block][2] and boxes[block][1] < boxes[block][3]


# ---------------------------------------------------------------------------------------
# Through the real lmms-eval CLI
# ---------------------------------------------------------------------------------------


def _cli(model, args, tasks, out):
    return testing.run_lmms_eval(model, args, tasks, out, include_path="tests/tasks", cwd=REPO)


CLI_CASES = [
    ("llava_pai", "alpha=1.0,use_cfg=true", "tiny_yesno"),
    ("llava_paint", "preset=full", "tiny_yesno"),
    ("llava_knockout", "mode=both", "tiny_yesno"),
    ("llava_reprompt", "keep_ratio=0.25", "tiny_yesno"),
    ("llava_viral", "adapter=ZERO", "tiny_yesno"),
    ("llava_pm", "", "tiny_yesno"),
]


@pytest.mark.parametrize("model,args,task", CLI_CASES)
def test_technique_through_the_cli(anyres, tmp_path, model, args, task, request):
    family, ckpt = anyres
    if "ZERO" in args:
        args = args.replace("ZERO", str(request.getfixturevalue("zero_adapter")))
    model_args = ",".join(a for a in (f"pretrained={ckpt}", args) if a)
    refusal = {"llava_paint": "SigLIP vision tower has no CLS token" if family == "llava_onevision" else None}
    if refusal.get(model):  # the matrix's refusals reach the CLI user with their reason, and nothing is evaluated
        results, log = _cli(model, model_args, task, tmp_path)
        assert results is None and refusal[model] in log
        return
    results, log = _cli(model, model_args, task, tmp_path)
    assert results is not None, log[-3000:]
    assert 0.0 <= results["results"][task]["exact,none"] <= 1.0  # the metric was computed, not only a file written
    samples = testing.read_samples(tmp_path, task)
    assert len(samples) == 3 and all(s["filtered_resps"] for s in samples), samples


@pytest.mark.parametrize("family", FAMILIES)
def test_lochead_through_the_cli(byte_anyres, tmp_path, family):
    results, log = _cli("llava_lochead", f"pretrained={byte_anyres[family]},heads=all", "tiny_rec", tmp_path)
    assert results is not None, log[-3000:]
    assert 0.0 <= results["results"]["tiny_rec"]["refcoco_IoU,none"] <= 1.0
    samples = testing.read_samples(tmp_path, "tiny_rec")
    assert samples and all(s["filtered_resps"] for s in samples)


@pytest.mark.parametrize(
    "kw",
    [
        {"mode": "compressed", "keep_ratio": 0.25},
        {"selection": "describe", "describe_tokens": 3, "keep_ratio": 0.25},
        {"mode": "compressed", "cache_strategy": "qs", "describe_tokens": 3, "keep_ratio": 0.25},
        {"mode": "fastv", "fastv_layer": 1},
        {"primer": "describe the image", "keep_ratio": 0.25},
    ],
)
def test_reprompt_modes_run_on_anyres(anyres, kw):
    """Every re-prompting path forwards image_sizes with pixel_values (NeXT/OneVision cannot tile without it)."""
    family, ckpt = anyres
    lm = _wrapper("reprompt", ckpt, **kw)
    inputs = _request(lm)
    with torch.no_grad():
        out = lm.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]  # lmms-eval slices the answer after the prompt
