"""The registered lmms-eval wrappers against the official fixtures: what the wrapper adds between the
technique and the model (model_args and presets, lmms-eval's prompt, tokenization and processor call, the
recording processor, the request, ``TechniqueModel``) is in the path.

tests/test_parity_pm.py and tests/test_parity_pai.py build ``PerceptionMagnifier`` / ``Pai`` directly;
here ``llava_pm`` and ``llava_pai`` are built as lmms-eval builds them (tests/_parity_wrappers.py:
``get_model(name, force_simple=True).create_from_arg_string("pretrained=<tiny checkpoint>,preset=official...")``)
and answer lmms-eval ``generate_until`` Instances; the generated ids and every step's logits / scores
are compared with the same fixtures at the same tolerances. The image processor is the one the preset sets
up (``image_backend=pil``: the official pixels), except where the fixtures were made on pixel tensors, not
images (``Wrappers.get``'s ``pixels``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import test_parity_pai as pai_parity
import test_parity_pm as pm_parity
from _parity_wrappers import Wrappers, generate
from conftest import REPO
from lmms_eval_plugins.testing import load_parity_script

PAI_FIX = REPO / "tests" / "fixtures" / "official" / "pai"


@pytest.fixture(scope="module")
def tiny():
    return load_parity_script("tiny_llava15")


@pytest.fixture(scope="module")
def pm_fixtures():
    return pm_parity.load_fixtures()


@pytest.fixture(scope="module")
def wrappers(tiny, pm_fixtures, tmp_path_factory):
    return Wrappers(tiny, pm_fixtures[2], tmp_path_factory.mktemp("parity_wrappers"))


# ------------------------------------------------------------------------------------------- llava_pm

# the fixtures are the official code run in fp32 (cpu_shim keeps .half() fp32): the presets' fp16 steps off
PM_MODEL_ARGS = {"pope": "preset=official_pope,precision=fp32", "mme": "preset=official_mme,precision=fp32"}


@pytest.mark.parametrize(
    "name,refresh", [("wide_p0_pope", "once"), ("square_p1_mme", "once"), ("wide_p0_pope", "every_token")]
)
def test_llava_pm_generates_the_official_answer(wrappers, tiny, pm_fixtures, name, refresh):
    """llava_pm preset=official_* (and refresh=every_token, the official --resample_during_sampling) through
    lmms-eval's generate_until, nothing replaced: the request is the fixture's prompt, the magnified image(s) are
    the official ones, the answer is the official ids, and every answer step's logits are within the fixtures'
    tolerance. The preset's image_backend=pil is what gives the official pixels: the magnified image's pixels are
    the official ones bit for bit, and with image_backend=default (transformers 5's torchvision backend) they differ."""
    data, arrays, _ = pm_fixtures
    case = data["cases"][name]
    args = PM_MODEL_ARGS[case["settings"]] + (",refresh=every_token" if refresh == "every_token" else "")
    lm = wrappers.get("llava_pm", args, case["prompt"]["before"])
    lm.technique.keep_steps, lm.technique.steps = True, []
    image = Image.open(pm_parity.FIX / f"image_{case['image']}.png").convert("RGB")
    question = tiny.words(case["prompt"]["after"][: -len(tiny.ASSISTANT_IDS)])
    with pm_parity.logit_rows(lm._model) as rows:
        text, calls = generate(lm, image, question, {"max_new_tokens": data["new_tokens"], "temperature": 0})
    ref = case["once"] if refresh == "once" else case["every_token"]
    ((req, out, _),) = calls
    n = req.input_ids.shape[1]
    assert req.input_ids[0].tolist() == tiny.hf_ids(case["prompt"]["before"], case["prompt"]["after"])[0].tolist()
    assert out[0, n:].tolist() == ref["new_ids"] and text == tiny.words(ref["new_ids"])
    steps = [ref] if refresh == "once" else ref["steps"]
    prefixes = [f"{name}/once/"] if refresh == "once" else [f"{name}/every/{i}/" for i in range(len(steps))]
    assert len(lm.technique.steps) == len(steps)
    for ours, want, prefix in zip(lm.technique.steps, steps, prefixes):
        assert len(ours.search.raw) == want["passes"], "map passes (exit decision)"
        assert [np.flatnonzero(b).tolist() for b in ours.search.blocked] == want["blocked"]
        np.testing.assert_array_equal(np.asarray(ours.image), arrays[f"{prefix}magnified"])
    pm_parity._check_logits(rows, ref["answer_logits"] if refresh == "once" else ref["logits"], f"{name} {refresh}")
    if refresh == "once":
        magnified = [lm.technique.steps[0].image]
        assert (
            tiny.tensor_sha256(req.processor.image_processor(images=magnified, return_tensors="pt")["pixel_values"])
            == (ref["magnified_pixels_sha256"])
        )
        default = wrappers.get("llava_pm", args + ",image_backend=default", case["prompt"]["before"])
        pixels = default._image_processor.image_processor(images=magnified, return_tensors="pt")["pixel_values"]
        assert tiny.tensor_sha256(pixels) != ref["magnified_pixels_sha256"]


# ------------------------------------------------------------------------------------------ llava_pai


@pytest.fixture(scope="module")
def pai_golden():
    return json.loads((PAI_FIX / "pai_official.json").read_text())


def _pai_runs():
    """The prompt-0 runs that preset=official reaches by model_args: the preset itself (greedy and beams)
    and the boost alone without guidance (use_cfg=false)."""
    runs = json.loads((PAI_FIX / "pai_official.json").read_text())["runs"]
    return [
        i
        for i, r in enumerate(runs)
        if r["prompt"] == 0 and r["name"] in ("attn", "both") and r["alpha"] == 0.2 and r["gamma"] == 1.1
    ]


def _pai_model_args(run: dict) -> str:
    assert run["use_attn"] and (run["start_layer"], run["end_layer"]) == (2, 32)
    return "preset=official" + ("" if run["use_cfg"] else ",use_cfg=false")


@pytest.mark.parametrize("i", _pai_runs())
def test_llava_pai_generates_the_official_answer(wrappers, tiny, pai_golden, i):
    """llava_pai preset=official through lmms-eval's generate_until (num_beams from the task's gen_kwargs):
    the request is the fixture's prompt, the answer is the official ids and every step's scores (after
    guidance) match at test_parity_pai's tolerance."""
    run = pai_golden["runs"][i]
    prompt = pai_golden["prompts"][run["prompt"]]
    pixels = tiny.fixed_pixels(1)
    assert tiny.matches(tiny.tensor_sha256(pixels), pai_golden["pixels_sha256"])
    lm = wrappers.get("llava_pai", _pai_model_args(run), prompt["ids_before_image"], suffix=(), pixels=pixels)
    gen_kwargs = {"max_new_tokens": len(run["steps"]), "temperature": 0, "num_beams": run["num_beams"]}
    image = Image.new("RGB", (336, 336))  # its pixels are the fixture's (FixedPixels)
    text, calls = generate(lm, image, tiny.words(prompt["ids_after_image"]), gen_kwargs, scores=True)
    ((req, out, _),) = calls
    n = req.input_ids.shape[1]
    assert req.input_ids[0].tolist() == pai_parity.pai_ours.prompt_ids(prompt)[0].tolist()
    assert out.sequences[:, n:].tolist() == run["new_ids"] and text == tiny.words(run["new_ids"][0])
    assert len(out.scores) == len(run["steps"])
    for got, want in zip(out.scores, run["steps"]):
        pai_parity.assert_step_matches(got, want)


# ------------------------------------------------------------------------------------- llava_knockout

KNOCKOUT_FIX = REPO / "tests" / "fixtures" / "official" / "knockout"
# preset=official (the run_on_coco.py default: decode rows, every layer) and a bidirectional block with a window
KNOCKOUT_MODEL_ARGS = {
    "generated_all_layers": "preset=official",
    "block_query_from_16": "preset=official_block_query,window=after:15",
}


@pytest.fixture(scope="module")
def knockout_golden(wrappers):
    wrappers.check(json.loads((KNOCKOUT_FIX / "provenance.json").read_text()))
    return json.loads((KNOCKOUT_FIX / "knockout_official.json").read_text())


@pytest.mark.parametrize("name", list(KNOCKOUT_MODEL_ARGS))
def test_llava_knockout_generates_the_official_answer(wrappers, tiny, knockout_golden, name):
    """llava_knockout official presets through lmms-eval's generate_until: the model_args give the parameters
    test_parity_knockout.py derives from the run's flags, the request is the fixture's prompt, and the first 6
    greedy ids and their top-16 scores match (ATOL of test_parity_knockout.py)."""
    import test_parity_knockout as knockout_parity

    golden = knockout_golden
    run = next(r for r in golden["runs"] if r["name"] == name)
    pixels = tiny.fixed_pixels(1)
    assert tiny.matches(tiny.tensor_sha256(pixels), golden["pixels_sha256"])
    lm = wrappers.get("llava_knockout", KNOCKOUT_MODEL_ARGS[name], golden["ids_before_image"], suffix=(), pixels=pixels)
    want = knockout_parity.vlminterp_ours.official_params(run["flags"])
    assert {k: lm.technique_params[k] for k in want} == want
    assert_vlminterp_run(tiny, lm, golden, run, knockout_parity.ATOL)


# ---------------------------------------------------------------------------------------- llava_paint

PAINT_FIX = REPO / "tests" / "fixtures" / "official" / "paint"


def _paint_cases():
    return json.loads((PAINT_FIX / "generation.json").read_text())


@pytest.mark.parametrize(
    "i", range(len(_paint_cases())), ids=[f"prompt{c['before'][0]}-cfg{c['use_cfg']}" for c in _paint_cases()]
)
def test_llava_paint_generates_the_official_answer(wrappers, tiny, i):
    """llava_paint preset=official (boost + CFG gamma 1.1, as modpai_eval.sh) and preset=official,use_cfg=false
    through lmms-eval's generate_until: the token selection runs on the vision tower inside the wrapper's
    generate; the request is the fixture's prompt, the ids are the official ones, and every step's raw
    logits at the official top ids and (with CFG) the guided scores match (test_parity_paint.py's ATOL)."""
    import test_parity_paint as paint_parity

    wrappers.check(paint_parity.PROVENANCE)
    case = _paint_cases()[i]
    assert (case["alpha"], case["beta"], case["gamma"] or 1.1) == (0.7, 0.3, 1.1)
    n = len({c["image"] for c in paint_parity.SELECTION})
    pixels = tiny.fixed_pixels(n, seed=paint_parity.PROVENANCE["model"]["seed"])[case["image"] : case["image"] + 1]
    # fp32 fixtures: the preset's fp16 selection off
    args = "preset=official,selection_precision=model" + ("" if case["use_cfg"] else ",use_cfg=false")
    lm = wrappers.get("llava_paint", args, case["before"], suffix=(), pixels=pixels)
    gen_kwargs = {"max_new_tokens": len(case["new_ids"]), "temperature": 0}
    image = Image.new("RGB", (336, 336))  # its pixels are the fixture's (FixedPixels)
    text, calls = generate(lm, image, tiny.words(case["after"]), gen_kwargs, scores=True)
    ((req, out, _),) = calls
    n_prompt = req.input_ids.shape[1]
    assert req.input_ids[0].tolist() == tiny.hf_ids(case["before"], case["after"])[0].tolist()
    assert out.sequences[0, n_prompt:].tolist() == case["new_ids"] and text == tiny.words(case["new_ids"])
    for step, logits, scores in zip(case["steps"], out.logits, out.scores):
        raw = logits[0, torch.tensor(step["raw_top"]["ids"])]
        torch.testing.assert_close(raw, torch.tensor(step["raw_top"]["values"]), atol=paint_parity.ATOL, rtol=0)
        if case["use_cfg"]:
            finite = torch.isfinite(scores[0]).nonzero().flatten()
            assert finite.tolist() == step["scores_finite_ids"]
            want = torch.tensor(step["scores_finite_values"])
            torch.testing.assert_close(scores[0, finite].float(), want, atol=paint_parity.ATOL, rtol=0)


# -------------------------------------------------------------------------------------- llava_reprompt

REPROMPT_FIX = REPO / "tests" / "fixtures" / "official" / "reprompt"


def test_llava_reprompt_prunes_as_the_official_code(wrappers, tiny):
    """llava_reprompt preset=official (run_on_coco.py -k 0.05 -k_selection_method attn_over_gen_percentage: a
    300-step describe pass, per-layer top-k, the unkept image keys removed in decode steps) through lmms-eval's
    generate_until; the describe text is given as model_args (the word-level stand-in of the fixture's describe
    ids): the request is the fixture's question, and its first 6 greedy ids and their top-16 scores match the
    official pruned run (test_parity_reprompt.py's ATOL)."""
    import test_parity_reprompt as reprompt_parity

    wrappers.check(json.loads((REPROMPT_FIX / "provenance.json").read_text()))
    golden = json.loads((REPROMPT_FIX / "prune_official.json").read_text())
    run = next(r for r in golden["runs"] if (r["selection"], r["name"]) == ("attn_over_gen_percentage", "decode_only"))
    d, q = golden["describe"], golden["question"]
    assert d["ids_before_image"] == q["ids_before_image"]  # the describe prompt shares the question's prefix
    pixels = tiny.fixed_pixels(1)
    args = f"preset=official,describe={tiny.words(d['ids_after_image'])},describe_tokens={len(d['new_ids'])}"
    lm = wrappers.get("llava_reprompt", args, q["ids_before_image"], suffix=(), pixels=pixels)
    assert lm.technique_params["keep_ratio"] == golden["k_fraction"]
    assert_vlminterp_run(tiny, lm, q, run, reprompt_parity.ATOL)


def assert_vlminterp_run(tiny, lm, prompt: dict, run: dict, atol: float) -> None:
    """One vlm-interp answer run through the wrapper's generate_until: the request's ids are the fixture prompt's,
    the greedy ids and text the run's, and each step's top-16 scores the official ones (indices exact, values
    within ``atol``)."""
    gen_kwargs = {"max_new_tokens": len(run["steps"]), "temperature": 0}
    image = Image.new("RGB", (336, 336))  # its pixels are the fixture's (FixedPixels)
    text, calls = generate(lm, image, tiny.words(prompt["ids_after_image"]), gen_kwargs, scores=True)
    ((req, out, _),) = calls
    n = req.input_ids.shape[1]
    assert req.input_ids[0].tolist() == tiny.hf_ids(prompt["ids_before_image"], prompt["ids_after_image"])[0].tolist()
    assert out.sequences[0, n:].tolist() == run["new_ids"] and text == tiny.words(run["new_ids"])
    for got, step in zip(out.scores, run["steps"]):
        idx = torch.tensor(step["topk_indices"])
        diff = (got.float().gather(-1, idx) - torch.tensor(step["topk_values"])).abs().max().item()
        assert diff <= atol, f"top-k scores differ by {diff}"
        assert torch.equal(got.float().topk(idx.shape[-1], dim=-1).indices, idx)


# -------------------------------------------------------------------------------------- llava_lochead

LOCHEAD_FIX = REPO / "tests" / "fixtures" / "official" / "lochead"
# 9ffe219's preset on the fp32 fixtures (its fp16 steps off); prompt=task: the checkpoint's chat template writes the
# fixture's official-form prompt (BOS + system ids + image + "\n" + expression), whose system ids stop at "the visual
# content" (17 ids + "\n") of the referseg system prompt, so prompt=official's tokenization of it is not compared here
LOCHEAD_ARGS = "preset=official_v2,prompt=task,precision=fp32"


@pytest.fixture(scope="module")
def lochead_golden(wrappers):
    wrappers.check(json.loads((LOCHEAD_FIX / "provenance.json").read_text()))
    return json.loads((LOCHEAD_FIX / "lochead_official.json").read_text()), np.load(LOCHEAD_FIX / "arrays.npz")


def locate(lm, image: Image.Image, question: str) -> tuple[str, object, object]:
    """One REC request through the wrapper's generate_until: lmms-eval's answer text, and the technique's
    ``Request`` and ``Located`` (through its ``on_located`` callback)."""
    seen = []
    lm.technique.on_located = lambda req, located: seen.append((req, located))
    try:
        text, _ = generate(lm, image, question, {"max_new_tokens": 64, "temperature": 0})
    finally:
        lm.technique.on_located = None
    ((req, located),) = seen
    return text, req, located


@pytest.mark.parametrize("i,heads", [(0, "self"), (7, "self"), (3, "file")])
def test_llava_lochead_answers_the_official_box(wrappers, tiny, lochead_golden, tmp_path, i, heads):
    """llava_lochead preset=official_v2 through lmms-eval's generate_until on the fixture's pixels (the request's
    image has the sample's W x H): the request is the fixture's prompt, the image was padded to a square, the top-5
    heads are 9ffe219's (heads=self: the request's own selection; heads=<file>: the official top-5 written as a
    heads file, loaded and captured by layer), and the combined map (1e-6), mask, grid box and the answer's box
    text are the official ones."""
    from methods import lochead, lochead_heads, lochead_official

    fx, arrays = lochead_golden
    s = fx["samples"][i]
    args = LOCHEAD_ARGS
    if heads == "file":
        path = tmp_path / "heads.json"
        model_id = str(wrappers.checkpoint(s["before"], ()))
        rows = [{"layer": l, "head": h} for l, h in s["v2"]["top"]]
        geometry = {"num_layers": tiny.TEXT["num_hidden_layers"], "num_heads": tiny.TEXT["num_attention_heads"]}
        lochead_heads.write_heads_file(path, rows, model_id=model_id, source="the official top-5", **geometry)
        args += f",heads={path}"
    pixels = tiny.fixed_pixels(len(fx["samples"]))[i : i + 1]
    lm = wrappers.get("llava_lochead", args, s["before"], suffix=(), pixels=pixels)
    image = Image.new("RGB", tuple(s["image_size"]))  # its pixels are the fixture's (FixedPixels)
    text, req, located = locate(lm, image, tiny.words(s["after"]))
    assert req.input_ids[0].tolist() == tiny.hf_ids(s["before"], s["after"])[0].tolist()
    w, h = s["image_size"]
    assert req.images[0].size == (max(w, h),) * 2 and located.image.size == (w, h), "pad_to_square"
    assert [list(lh) for lh in located.heads] == s["v2"]["top"]
    # measured 1.9e-9 (2 ulps; ATEN_CPU_CAPABILITY=default alike); pixels x 1.01 move it by 3.5e-6 to 6.3e-6
    assert np.abs(located.combined.numpy() - arrays[f"s{i}_v2_combined"]).max() < 1e-6
    mask = ["".join("1" if v else "0" for v in row) for row in (located.combined > located.combined.mean()).tolist()]
    assert mask == s["v2"]["mask"]
    x0, y0, x1, y1 = lochead_official.official_box_grid(located.combined)
    assert [x0, y0, x1, y1] == s["v2"]["bbox_grid"]
    assert lochead.parse_box(text) == lochead.parse_box(
        lochead.format_box([x0 / 24, y0 / 24, (x1 + 1) / 24, (y1 + 1) / 24])
    )


@pytest.mark.parametrize("name", ["wide_p0_pope", "tall_p0_mme"])
def test_llava_lochead_preprocesses_as_the_official_llava(wrappers, tiny, lochead_golden, pm_fixtures, name):
    """preset=official_v2's pad_to_square through the wrapper: the pixels the vision tower receives for a PM fixture
    image are bit for bit the official LLaVA-1.5 preprocessing's (expand2square with the mean colour, then the
    processor: PM's process_images_return_pad, the same steps as process_images with image_aspect_ratio=pad)."""
    fx, _ = lochead_golden
    s = fx["samples"][0]
    case = pm_fixtures[0]["cases"][name]
    image = Image.open(pm_parity.FIX / f"image_{case['image']}.png").convert("RGB")
    assert image.size[0] != image.size[1]
    lm = wrappers.get("llava_lochead", LOCHEAD_ARGS, s["before"], suffix=())
    seen = []
    tower = lm._model.model.vision_tower
    handle = tower.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("pixel_values", *args[:1])), with_kwargs=True
    )
    try:
        locate(lm, image, tiny.words(s["after"]))
    finally:
        handle.remove()
    (pixels,) = seen
    assert tiny.tensor_sha256(pixels) == case["pixels_sha256"], "the official padded pixels"
