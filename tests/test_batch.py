"""batch_size > 1: a left-padded batch of requests gives every request its batch-size-1 answer and logits.

In process, on tiny random LLaVA-1.5, LLaVA-NeXT, OneVision, Qwen2.5-VL and Qwen3-VL checkpoints: three requests
with images of different sizes and prompts of different lengths go through the wrappers' request path
(``family_request`` -> ``Batch``) and one ``generate`` call; each row's greedy tokens equal the request generated alone, and its logits (and, under
image-free guidance, its guided scores) agree to 1e-5, for every technique that batches. Each technique's
logits differ from the idle model's by far more than that, so the comparison can fail; placing edits without
the padding offset does fail it. Refusals name their reason; hooks are gone after a failing batch.
"""

import numpy as np
import pytest
import torch
from conftest import load
from PIL import Image

from lmms_eval_plugins.base import RecordingProcessor, TechniqueModel, family_request
from methods import hooks
from methods.knockout import Knockout
from methods.pai import Pai
from methods.paint import Paint
from methods.params import ModelArgsError
from methods.technique import Batch, RequestError

TOL = 1e-5  # absolute and relative: batched matmuls round differently (never bit-exact across CPUs)
GEN = dict(max_new_tokens=5, do_sample=False, output_logits=True, output_scores=True, return_dict_in_generate=True)
QUESTIONS = (
    "is there a red circle in the image?",
    "what",
    "is there a blue square on the left of the green circle in the picture? answer using a single word",
)
SIZES = ((40, 30), (25, 60), (64, 64))


def _image(size, rgb):
    image = Image.new("RGB", size, rgb)
    image.paste((230, 230, 230), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return image


IMAGES = [_image(s, c) for s, c in zip(SIZES, ((200, 30, 30), (20, 30, 200), (20, 200, 20)))]


def _inputs(processor, prompts, images, **call):
    """The processor's outputs; a processor that wants each prompt's images as a list (Gemma 3's) gets them so."""
    if getattr(processor, "per_prompt_images", False):
        images = [[im] for im in images]
    return processor(images=images, text=prompts, return_tensors="pt", **call)


def _run(model, processor, technique, prompts, images, **call):
    """(new tokens, raw logits, processed scores) per row of one generate call through the wrappers' request path."""
    inputs = _inputs(processor, prompts, images, **call)
    req = family_request(model, processor, dict(inputs))
    with torch.no_grad():
        out = technique.generate(model, req, **inputs, **GEN)
    n = inputs["input_ids"].shape[1]
    logits, scores = torch.stack(out.logits, 1), torch.stack(out.scores, 1)
    return req, [(out.sequences[i, n:], logits[i], scores[i]) for i in range(len(prompts))]


def _alone_and_batched(model, processor, technique, prompts, alone_call=None, **call):
    """alone_call: how the family's class calls its processor for one prompt (Gemma 3's pads it)."""
    alone = [_run(model, processor, technique, [p], [im], **(alone_call or {}))[1][0] for p, im in zip(prompts, IMAGES)]
    batch, rows = _run(model, processor, technique, prompts, IMAGES, padding=True, padding_side="left", **call)
    assert isinstance(batch, Batch) and len(set(batch.offsets)) == len(prompts)  # three different paddings
    return alone, rows


def _effect(alone, plain) -> float:
    """How far the technique moves the first answer token's log-probabilities (scores: guided ones under CFG)
    from the idle model's, over the tokens both keep."""
    worst = 0.0
    for a, p in zip(alone, plain):
        ours, base = torch.log_softmax(a[2][0], -1), torch.log_softmax(p[2][0], -1)
        keep = torch.isfinite(ours) & torch.isfinite(base)
        worst = max(worst, float((ours[keep] - base[keep]).abs().max()))
    return worst


def _assert_equal_per_request(alone, rows, tol=TOL):
    for (ids, logits, scores), (b_ids, b_logits, b_scores) in zip(alone, rows):
        k = len(ids)  # a row that ended earlier alone continues with padding in the batch
        assert torch.equal(ids, b_ids[:k])
        torch.testing.assert_close(b_logits[:k], logits, atol=tol, rtol=tol)
        torch.testing.assert_close(b_scores[:k], scores, atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------ LLaVA-1.5


@pytest.fixture(scope="module")
def llava(tiny_ckpt):
    model, processor = load(tiny_ckpt)
    processor.tokenizer.padding_side = "left"  # what llava_hf sets

    def prompt(q):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    return model, RecordingProcessor(processor), [prompt(q) for q in QUESTIONS]


def _techniques(model):
    """Name -> a technique for ``model`` (PAINT's need a CLS tower: LLaVA-1.5 / NeXT)."""
    n = hooks.num_layers(model)
    reprompt = _reprompt_techniques(n)
    return {
        "pai": lambda: Pai(n, alpha=2.0, start_layer=0, use_cfg=False),
        "pai_cfg": lambda: Pai(n, alpha=2.0, start_layer=0, use_cfg=True, gamma=1.5),
        "knockout_query": lambda: Knockout(n, mode="query"),
        "knockout_both": lambda: Knockout(n, mode="both", from_layer=1),
        "knockout_generated": lambda: Knockout(n, mode="generated", from_layer=1),
        "knockout_block_query": lambda: Knockout(n, mode="block_query"),
        "knockout_all": lambda: Knockout(n, mode="all"),
        "paint": lambda: Paint.for_model(model, alpha=2.0, beta=1.0, start_layer=0),
        "paint_heads_cfg": lambda: Paint.for_model(
            model, alpha=2.0, beta=1.0, start_layer=0, head_modulation="sensitivity", use_cfg=True
        ),
        "prune": reprompt["prune_per_layer_last"],
        "fastv": reprompt["fastv"],
    }


def _plain(model, processor, prompts):
    """Each prompt's scores alone with idle hooks: what a technique must move for an equality test to be able to fail."""
    idle = Pai(hooks.num_layers(model), alpha=0, use_cfg=False)
    return [_run(model, processor, idle, [p], [im])[1][0] for p, im in zip(prompts, IMAGES)]


LLAVA_TECHNIQUES = (
    "pai",
    "pai_cfg",
    "knockout_query",
    "knockout_generated",
    "knockout_block_query",
    "knockout_all",
    "paint",
    "paint_heads_cfg",
)


@pytest.mark.parametrize("name", LLAVA_TECHNIQUES)
def test_llava_batch_equals_batch_one(llava, name):
    model, processor, prompts = llava
    technique = _techniques(model)[name]()
    alone, rows = _alone_and_batched(model, processor, technique, prompts)
    _assert_equal_per_request(alone, rows)
    assert (
        _effect(alone, _plain(model, processor, prompts)) > 100 * TOL
    )  # the technique changes the answer's scores: the equality can fail
    assert not any(hooks.EDITS_ATTR in m.__dict__ for m in model.modules())


def test_idle_batch_equals_batch_one(llava):
    model, processor, prompts = llava
    alone, rows = _alone_and_batched(model, processor, Pai(hooks.num_layers(model), alpha=0, use_cfg=False), prompts)
    _assert_equal_per_request(alone, rows)


def test_edits_placed_without_the_padding_offset_fail(llava, monkeypatch):
    """The equality above depends on shifting each request's positions by its padding."""
    model, processor, prompts = llava
    place = hooks.AttnEdit.place
    monkeypatch.setattr(hooks.AttnEdit, "place", lambda self, batch, offset: place(self, batch, 0))
    alone, rows = _alone_and_batched(model, processor, Pai(hooks.num_layers(model), alpha=2.0, start_layer=0), prompts)
    with pytest.raises(AssertionError):
        _assert_equal_per_request(alone, rows)


def test_a_failing_batch_leaves_no_hooks(llava):
    model, processor, prompts = llava
    inputs = processor(images=IMAGES, text=prompts, return_tensors="pt", padding=True, padding_side="left")
    req = family_request(model, processor, dict(inputs))
    bad = {**inputs, "pixel_values": inputs["pixel_values"][:1]}  # one image for three prompts: the model raises
    with pytest.raises(ValueError, match="[Ii]mage features and image tokens do not match"):
        Knockout(hooks.num_layers(model), mode="both").generate(model, req, **bad, max_new_tokens=2)
    assert not any(hooks.EDITS_ATTR in m.__dict__ for m in model.modules())


def test_batch_requests_are_the_requests_alone(llava):
    """Each request of a batch is what family_request builds for its prompt alone: ids, image, geometry."""
    model, processor, prompts = llava
    inputs = processor(images=IMAGES, text=prompts, return_tensors="pt", padding=True, padding_side="left")
    batch = family_request(model, processor, dict(inputs))
    for i, (p, im) in enumerate(zip(prompts, IMAGES)):
        alone = family_request(model, processor, dict(processor(images=[im], text=p, return_tensors="pt")))
        got = batch.requests[i]
        assert torch.equal(got.input_ids, alone.input_ids) and got.prompt_len == alone.prompt_len
        assert got.images[0] is im and torch.equal(got.image_pos + batch.offsets[i], batch_image_pos(batch, i))


def batch_image_pos(batch, i):
    return (batch.input_ids[i] == batch.image_token_id).nonzero().flatten()


def test_right_padding_and_image_counts_are_refused(llava):
    model, processor, prompts = llava
    inputs = processor(images=IMAGES, text=prompts, return_tensors="pt", padding=True, padding_side="right")
    with pytest.raises(RequestError, match="left-padded"):
        family_request(model, processor, dict(inputs))
    inputs = processor(images=IMAGES[:2], text=prompts[:2], return_tensors="pt", padding=True, padding_side="left")
    processor.__dict__["last_images"] = IMAGES  # three images recorded for two prompts
    with pytest.raises(RequestError, match="one image per prompt"):
        family_request(model, processor, dict(inputs))


def test_beam_search_in_a_batch_is_refused(llava):
    model, processor, prompts = llava
    inputs = processor(images=IMAGES, text=prompts, return_tensors="pt", padding=True, padding_side="left")
    req = family_request(model, processor, dict(inputs))
    with pytest.raises(RequestError, match="beam search in a batch"):
        Pai(hooks.num_layers(model)).generate(model, req, **inputs, num_beams=2, max_new_tokens=2)


def test_vision_edits_need_a_tower_that_runs_images_as_rows(llava):
    model, processor, prompts = llava
    inputs = processor(images=IMAGES, text=prompts, return_tensors="pt", padding=True, padding_side="left")
    batch = family_request(model, processor, dict(inputs))
    assert [batch.vision_rows(i) for i in range(3)] == [[0], [1], [2]]  # LLaVA-1.5: one crop per image
    batch.requests[0].config = type(model.config)(**{**model.config.to_dict(), "model_type": "qwen2_5_vl"})
    with pytest.raises(RequestError, match="vision tower cannot be placed in a batch"):
        batch.vision_rows(0)


# ------------------------------------------------------------------------------------ wrappers


def _pai_wrapper(**kw):
    from lmms_eval_plugins.models.pai import LlavaPaiChat

    return LlavaPaiChat(device="cpu", **kw)


def test_wrappers_accept_batches_where_exact_and_refuse_with_the_reason(tiny_ckpt):
    from lmms_eval_plugins.models.pm import LlavaPmChat

    lm = _pai_wrapper(pretrained=str(tiny_ckpt), batch_size=4)
    assert lm.batch_size == 4 and isinstance(lm.model, TechniqueModel)
    with pytest.raises(ModelArgsError, match=r"llava_pm: batch_size=2 is not supported .*refresh=every_token"):
        LlavaPmChat(pretrained=str(tiny_ckpt), device="cpu", batch_size=2, refresh="every_token")
    with pytest.raises(ModelArgsError, match="batch_size=0 is not supported"):
        _pai_wrapper(pretrained=str(tiny_ckpt), batch_size=0)


def test_paint_batches_on_next_and_refuses_what_cannot_be_exact(anyres, tmp_path):
    from lmms_eval_plugins.models.paint import LlavaPaintChat
    from methods import families

    _, _, _, ckpt = anyres["llava_next"]
    assert LlavaPaintChat(pretrained=str(ckpt), device="cpu", batch_size=2).batch_size == 2
    paint = Paint(4, 4, (4, 4), save_visuals=str(tmp_path))
    assert "save_visuals draws one request's selection" in paint.batch_refusal(families.adapter("llava_next"))
    why = Paint(4, 4, (4, 4)).batch_refusal(families.adapter("qwen2_5_vl"))
    assert "Qwen2.5-VL's tower does not run each image as rows of its batch" in why


def test_every_family_batches_and_unknown_ones_refuse(monkeypatch):
    """Each family's wrappers accept batches of their own model type; a model type no test covers is refused."""
    from types import SimpleNamespace

    from lmms_eval_plugins import base
    from lmms_eval_plugins.gemma3 import Gemma3TechniqueMixin
    from lmms_eval_plugins.internvl import InternVLTechniqueMixin
    from lmms_eval_plugins.qwen import QwenTechniqueMixin
    from lmms_eval_plugins.qwen3_vl import Qwen3TechniqueMixin

    def refusal(mixin, model_type):
        monkeypatch.setattr(base, "read_config", lambda *a: SimpleNamespace(model_type=model_type))
        return mixin.family_batch_refusal(mixin, "ckpt", None, False)

    for mixin, model_types in (
        (base.TechniqueMixin, ("llava", "llava_next", "llava_onevision")),
        (QwenTechniqueMixin, ("qwen2_5_vl",)),
        (Qwen3TechniqueMixin, ("qwen3_vl",)),
        (Gemma3TechniqueMixin, ("gemma3",)),
        (InternVLTechniqueMixin, ("internvl",)),
    ):
        assert all(refusal(mixin, t) is None for t in model_types)
    assert "not yet tested equal to batch size 1 on mllama" in refusal(base.TechniqueMixin, "mllama")


# ------------------------------------------------------------------------------------ LLaVA-NeXT and OneVision


@pytest.fixture(scope="module")
def anyres(tmp_path_factory):
    """Tiny NeXT and OneVision checkpoints: images of different sizes get different tilings and token counts."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from lmms_eval_plugins.testing import build_tiny_llava_next, build_tiny_llava_onevision

    out = {}
    for name, builder in (("llava_next", build_tiny_llava_next), ("llava_onevision", build_tiny_llava_onevision)):
        ckpt = builder(tmp_path_factory.mktemp(name))
        model = AutoModelForImageTextToText.from_pretrained(ckpt, attn_implementation="sdpa").eval()
        processor = AutoProcessor.from_pretrained(ckpt)
        processor.tokenizer.padding_side = "left"

        def prompt(q, processor=processor):
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
            return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

        out[name] = (model, RecordingProcessor(processor), [prompt(q) for q in QUESTIONS], ckpt)
    return out


ANYRES_CASES = [
    *(
        (family, name)
        for family in ("llava_next", "llava_onevision")
        for name in ("pai_cfg", "knockout_query", "prune")
    ),
    ("llava_next", "paint"),  # PAINT refuses OneVision's SigLIP tower (no CLS)
    ("llava_next", "paint_heads_cfg"),
]


def _anyres_paint(model, **params):
    return Paint.for_model(model, alpha=10.0, beta=5.0, start_layer=0, **params)


@pytest.mark.parametrize("family,name", ANYRES_CASES)
def test_anyres_batch_equals_batch_one(anyres, family, name):
    """Images of different sizes: different tilings, so different numbers of tower crops per request (PAINT's
    captures sit on each request's crops and select from its base crop, as alone)."""
    from methods.reprompt import Reprompt

    model, processor, prompts, _ = anyres[family]
    n = hooks.num_layers(model)
    technique = {
        "pai_cfg": lambda: Pai(n, alpha=2.0, start_layer=0, use_cfg=True, gamma=1.5),
        "knockout_query": lambda: Knockout(n, mode="query"),
        "prune": lambda: Reprompt(n, mode="prune", keep_ratio=0.25, selection="per_layer"),
        # PAINT edits only the base block's tokens here (a fifth of the image tokens): larger margins than LLaVA's
        "paint": lambda: _anyres_paint(model),
        "paint_heads_cfg": lambda: _anyres_paint(model, head_modulation="sensitivity", use_cfg=True),
    }[name]()
    alone, rows = _alone_and_batched(model, processor, technique, prompts)
    batch = family_request_batch(model, processor, prompts)
    assert len({int((r.input_ids == r.image_token_id).sum()) for r in batch}) > 1  # different tilings in one batch
    _assert_equal_per_request(alone, rows)
    if name.startswith("paint"):  # PAINT changes the answer's scores: the equality can fail
        assert _effect(alone, _plain(model, processor, prompts)) > 100 * TOL


def test_paint_captures_on_tower_row_i_fail_on_next(anyres, monkeypatch):
    """The NeXT equality above depends on placing request i's captures on its own crops, not on tower row i."""
    model, processor, prompts, _ = anyres["llava_next"]
    monkeypatch.setattr(Batch, "vision_rows", lambda self, i: [i])
    alone, rows = _alone_and_batched(model, processor, _anyres_paint(model), prompts)
    with pytest.raises(AssertionError):
        _assert_equal_per_request(alone, rows)


# ------------------------------------------------------------------------------------ Qwen2.5-VL


def _qwen_family(model_cls, path):
    """(model, recording processor, prompts) of a Qwen checkpoint, prompts as lmms-eval's classes build them."""
    from transformers import AutoProcessor

    model = model_cls.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)

    def prompt(q):
        messages = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "image", "image": "x"}, {"type": "text", "text": q}]},
        ]
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    return model, RecordingProcessor(processor), [prompt(q) for q in QUESTIONS]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from test_qwen import PIXELS, build_tiny_qwen
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = build_tiny_qwen(tmp_path_factory.mktemp("tiny_qwen_batch"))
    model, processor, prompts = _qwen_family(Qwen2_5_VLForConditionalGeneration, path)
    processor.image_processor.size = {"shortest_edge": PIXELS["min_pixels"], "longest_edge": PIXELS["max_pixels"]}
    return model, processor, prompts


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """Tiny Qwen3-VL: 16 px patches merged 2x2, interleaved M-RoPE, DeepStack after LM layers 0 and 1."""
    from transformers import Qwen3VLForConditionalGeneration

    from lmms_eval_plugins.testing import build_tiny_qwen3_vl

    return _qwen_family(Qwen3VLForConditionalGeneration, build_tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3_batch")))


@pytest.mark.parametrize("family", ("qwen", "qwen3"))
@pytest.mark.parametrize("name", ("pai", "pai_cfg", "knockout_query", "knockout_both"))
def test_qwen_batch_equals_batch_one(request, family, name):
    """Qwen2.5-VL and Qwen3-VL (whose forward also adds DeepStack features at each row's image tokens)."""
    model, processor, prompts = request.getfixturevalue(family)
    technique = _techniques(model)[name]()
    alone, rows = _alone_and_batched(model, processor, technique, prompts)
    counts = {int((r.input_ids == r.image_token_id).sum()) for r in family_request_batch(model, processor, prompts)}
    assert len(counts) > 1  # images of different sizes: different numbers of image tokens in one batch
    # this checkpoint's weights are spread wider (larger logits), and its vision tower runs every image's patches
    # as one sequence: measured up to 0.84 of the 1e-5 bound, so 3e-5 leaves room for other CPUs
    _assert_equal_per_request(alone, rows, tol=3 * TOL)
    assert _effect(alone, _plain(model, processor, prompts)) > 100 * TOL


def family_request_batch(model, processor, prompts):
    inputs = processor(images=IMAGES, text=prompts, return_tensors="pt", padding=True, padding_side="left")
    return family_request(model, processor, dict(inputs)).requests


# ------------------------------------------------------------------------------------ localization heads


def _lochead_alone_and_batched(model, processor, technique, prompts, answers=True):
    """answers: also compare the generated box text (a tokenizer that can write boxes: not the word-level one)."""
    alone = []
    for p, im in zip(prompts, IMAGES):
        inputs = _inputs(processor, [p], [im])
        req = family_request(model, processor, dict(inputs))
        ids = technique.generate(model, req, **inputs)[0] if answers else None
        alone.append((technique.locate(model, req, **inputs), ids))
    inputs = _inputs(processor, prompts, IMAGES, padding=True, padding_side="left")
    batch = family_request(model, processor, dict(inputs))
    located = technique.locate_batch(model, batch, **inputs)
    out = technique.generate(model, batch, **inputs, pad_token_id=0) if answers else None
    n = batch.input_ids.shape[1]
    for i, ((loc, ids), got) in enumerate(zip(alone, located)):
        torch.testing.assert_close(got.combined, loc.combined, atol=TOL, rtol=TOL)
        assert got.box == loc.box and got.heads == loc.heads
        if answers:
            tail = ids[batch.requests[i].input_ids.shape[1] :]
            assert out[i, n : n + len(tail)].tolist() == tail.tolist()
    assert len({tuple(loc.box) for loc, _ in alone}) > 1  # the requests' boxes differ: a mix-up would show
    return alone, located


@pytest.mark.parametrize("heads", ([(1, 0), (2, 1), (3, 3)], "all", "self"))
def test_lochead_batch_equals_batch_one(llava, heads):
    from methods.lochead import LocHead

    model, processor, prompts = llava
    _lochead_alone_and_batched(model, processor, LocHead(heads, top_k=3), prompts, answers=False)


@pytest.mark.parametrize("family", ("qwen", "qwen3"))
def test_lochead_batch_on_qwen(request, family):
    from methods.lochead import LocHead

    model, processor, prompts = request.getfixturevalue(family)
    _lochead_alone_and_batched(model, processor, LocHead([(1, 0), (3, 2)], top_k=2), prompts)


def test_lochead_official_prompt_refuses_batches():
    from methods.lochead import LocHead

    assert "builds its own prompt per request" in LocHead("all", prompt="official").batch_refusal()


# ------------------------------------------------------------------------------------ pruning and FastV


def _reprompt_techniques(n):
    from methods.reprompt import Reprompt

    return {
        "prune_pooled": lambda: Reprompt(n, mode="prune", keep_ratio=0.25),
        "prune_per_layer_last": lambda: Reprompt(
            n, mode="prune", keep_ratio=0.25, selection="per_layer", score_rows="last"
        ),
        "prune_decode_rows": lambda: Reprompt(n, mode="prune", keep_ratio=0.1, prune_rows="decode"),
        "fastv": lambda: Reprompt(n, mode="fastv", fastv_layer=2, fastv_ratio=0.75),
    }


@pytest.mark.parametrize("name", ("prune_per_layer_last", "prune_decode_rows", "fastv"))
def test_pruning_batch_equals_batch_one(llava, name):
    model, processor, prompts = llava
    n = hooks.num_layers(model)
    technique = _reprompt_techniques(n)[name]()
    alone, rows = _alone_and_batched(model, processor, technique, prompts)
    _assert_equal_per_request(alone, rows)
    assert (
        _effect(alone, _plain(model, processor, prompts)) > 100 * TOL or name == "prune_decode_rows"
    )  # decode rows: the first token is stock's
    assert not any(hooks.EDITS_ATTR in m.__dict__ for m in model.modules())


def _pooled_prune_alone_and_batched(model, processor, prompts):
    """Pooled pruning alone generates from its cut cache (no per-step logits); a batch masks the same keys. So:
    the batch's tokens against the cut-cache answers, its first-step logits against the masked forward alone."""
    n = hooks.num_layers(model)
    technique = _reprompt_techniques(n)["prune_pooled"]()
    alone = []
    for p, im in zip(prompts, IMAGES):
        inputs = processor(images=[im], text=[p], return_tensors="pt")
        req = family_request(model, processor, dict(inputs))
        with torch.no_grad():
            ids = technique.generate(model, req, **inputs, max_new_tokens=5, do_sample=False)[0, req.prompt_len :]
            first = technique.forward(model, req, **inputs).logits[0, -1]
            plain = model(**inputs).logits[0, -1]
        alone.append((ids, first, plain))
    _, rows = _run(model, processor, technique, prompts, IMAGES, padding=True, padding_side="left")
    return alone, rows


def test_pooled_pruning_batch_equals_batch_one(llava, qwen, qwen3):
    for fixture, tol in ((llava, TOL), (qwen, 3 * TOL), (qwen3, 3 * TOL)):
        alone, rows = _pooled_prune_alone_and_batched(*fixture)
        for (ids, first, _), (b_ids, b_logits, _) in zip(alone, rows):
            assert torch.equal(ids, b_ids[: len(ids)])
            torch.testing.assert_close(b_logits[0], first, atol=tol, rtol=tol)
        assert max(float((first - plain).abs().max()) for _, first, plain in alone) > 100 * TOL  # pruning acts


@pytest.mark.parametrize("family", ("qwen", "qwen3"))
@pytest.mark.parametrize("name", ("prune_per_layer_last", "fastv"))
def test_pruning_batch_on_qwen(request, family, name):
    model, processor, prompts = request.getfixturevalue(family)
    technique = _reprompt_techniques(hooks.num_layers(model))[name]()
    alone, rows = _alone_and_batched(model, processor, technique, prompts)
    _assert_equal_per_request(alone, rows, tol=3 * TOL)


def test_compressed_and_describe_refuse_batches(llava):
    from methods.reprompt import Reprompt

    model, _, _ = llava
    n = hooks.num_layers(model)
    assert "runs its own passes per request" in Reprompt(n, mode="compressed").batch_refusal()
    assert "describe pass per image" in Reprompt(n, mode="prune", selection="describe").batch_refusal()


# ------------------------------------------------------------------------------------ Perception Magnifier


@pytest.mark.parametrize("fixture", ("llava", "llava_next", "llava_onevision", "qwen", "qwen3"))
def test_pm_batch_equals_batch_one(request, fixture):
    """refresh=once: each request's search runs on it alone, then one batched generate on the magnified images."""
    from methods.pm import PerceptionMagnifier
    from methods.pm_view import image_grid

    anyres = fixture.startswith("llava_")
    model, processor, prompts = (
        request.getfixturevalue("anyres")[fixture][:3] if anyres else request.getfixturevalue(fixture)
    )
    n = hooks.num_layers(model)
    pm = PerceptionMagnifier(n, image_grid(model), max_iter=2)
    pm.keep_steps = True
    alone, rows = _alone_and_batched(model, processor, pm, prompts)
    _assert_equal_per_request(alone, rows, tol=3 * TOL if fixture.startswith("qwen") else TOL)
    one, batched = pm.steps[:3], pm.steps[3:]
    assert pm.samples == 6 and len(batched) == 3
    for a, b in zip(one, batched):  # the same search, alone or in the batch: the same magnified image
        assert a.search.iterations == b.search.iterations
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert (
        _effect(alone, _plain(model, processor, prompts)) > 100 * TOL
    )  # the magnified images change the answers' scores


def test_pm_refuses_batches_it_cannot_serve_exactly(llava):
    from methods import families
    from methods.pm import PerceptionMagnifier

    model, processor, prompts = llava
    n = hooks.num_layers(model)
    every = PerceptionMagnifier(n, refresh="every_token")
    assert "refresh=every_token decodes token by token" in every.batch_refusal()
    assert "refresh=every_n" in PerceptionMagnifier(n, refresh="every_n").batch_refusal()
    assert "samples" in PerceptionMagnifier(n, temperature=1.0).batch_refusal()
    assert "InternVL" in PerceptionMagnifier(n).batch_refusal(families.adapter("internvl"))
    inputs = processor(images=IMAGES, text=prompts, return_tensors="pt", padding=True, padding_side="left")
    batch = family_request(model, processor, dict(inputs))
    with pytest.raises(RequestError, match="pm cannot run a batch of 3 requests: refresh=every_token"):
        every.generate(model, batch, **inputs, max_new_tokens=2)
    with pytest.raises(RequestError, match="loglikelihood forward takes one request at a time"):
        PerceptionMagnifier(n).forward(model, batch, **inputs)
    assert every.samples == 0 and not any(hooks.EDITS_ATTR in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("family", ("llava_next", "llava_onevision"))
def test_anyres_lochead_batch_equals_batch_one(anyres, family):
    from methods.lochead import LocHead

    model, processor, prompts, _ = anyres[family]
    _lochead_alone_and_batched(model, processor, LocHead([(1, 0), (3, 1)], top_k=2), prompts, answers=False)


# ------------------------------------------------------------------------------------ Gemma 3


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """Tiny Gemma 3: sliding-window (24 keys) and global layers, bidirectional attention among the image tokens; its
    tokenizer pads left, as Gemma's do; the images all give 16 tokens, the prompts' lengths differ."""
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    from lmms_eval_plugins.testing import build_tiny_gemma3

    path = build_tiny_gemma3(tmp_path_factory.mktemp("gemma3_batch"))
    model = Gemma3ForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa").eval()
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"

    def prompt(q):
        messages = [
            {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
        ]
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    recording = RecordingProcessor(processor)
    recording.__dict__["per_prompt_images"] = True
    return model, recording, [prompt(q) for q in QUESTIONS], path


@pytest.mark.parametrize("name", ("pai", "pai_cfg", "knockout_query", "knockout_both", "prune", "fastv"))
def test_gemma3_batch_equals_batch_one(gemma3, name):
    """Padded to a multiple of 8 on the left, as lmms-eval's gemma3 pads every prompt (batch size 1 too): at batch
    size 1 the image-free prompt of guidance leaves the padding out, as a batch does."""
    model, processor, prompts, _ = gemma3
    technique = _techniques(model)[name]()
    alone_call = dict(padding=True, pad_to_multiple_of=8)
    alone, rows = _alone_and_batched(model, processor, technique, prompts, alone_call, pad_to_multiple_of=8)
    _assert_equal_per_request(alone, rows)
    assert _effect(alone, _plain(model, processor, prompts)) > 100 * TOL


def test_gemma3_wrapper_pads_batches_left(gemma3):
    """lmms-eval's gemma3 pads on the tokenizer's side; a right-padding tokenizer is made to pad a batch left."""
    from lmms_eval_plugins.models.gemma3 import Gemma3Pai

    from transformers import AutoTokenizer

    path = gemma3[3]
    assert AutoTokenizer.from_pretrained(path).padding_side == "right"
    lm = Gemma3Pai(pretrained=str(path), device="cpu", batch_size=2, dtype="float32")
    assert lm.batch_size == 2 and lm.processor.tokenizer.padding_side == "left"


@pytest.mark.parametrize("family", ("gemma3", "internvl"))
def test_lochead_batch_on_gemma3_and_internvl(request, family):
    from methods.lochead import LocHead

    model, processor, prompts = request.getfixturevalue(family)[:3]
    _lochead_alone_and_batched(model, processor, LocHead([(1, 0), (3, 1)], top_k=2), prompts, answers=False)


# ------------------------------------------------------------------------------------ InternVL


@pytest.fixture(scope="module")
def internvl(tmp_path_factory):
    """Tiny HF-native InternVL: the three images are cut into different numbers of tiles (plus a thumbnail)."""
    from transformers import AutoProcessor, InternVLForConditionalGeneration

    from lmms_eval_plugins.testing import build_tiny_internvl

    path = build_tiny_internvl(tmp_path_factory.mktemp("internvl_batch"))
    model = InternVLForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa").eval()
    processor = AutoProcessor.from_pretrained(path)

    def prompt(q):
        messages = [{"role": "user", "content": [{"type": "image", "url": "x"}, {"type": "text", "text": q}]}]
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    return model, RecordingProcessor(processor), [prompt(q) for q in QUESTIONS]


@pytest.mark.parametrize("name", ("pai", "pai_cfg", "knockout_query", "knockout_both", "prune", "fastv"))
def test_internvl_batch_equals_batch_one(internvl, name):
    model, processor, prompts = internvl
    technique = _techniques(model)[name]()
    alone, rows = _alone_and_batched(model, processor, technique, prompts)
    counts = {int((r.input_ids == r.image_token_id).sum()) for r in family_request_batch(model, processor, prompts)}
    assert len(counts) > 1, counts
    _assert_equal_per_request(alone, rows)
    assert _effect(alone, _plain(model, processor, prompts)) > 100 * TOL
