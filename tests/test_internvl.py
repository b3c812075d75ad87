"""The internvl_hf_* wrappers on a tiny random HF-native InternVL built here (64 px tiles of 8 px patches with
a CLS token, pixel shuffle to 4x4 tokens per tile, up to 6 tiles plus a thumbnail, a Qwen2 language model).

In process: the geometry matches the processor's token counts for several tile counts and the pixel
shuffle's layout; the hook layer sees both towers and is bit-identical while idle; idle wrappers equal
lmms-eval's own internvl_hf (answers and logits); our own passes over the language model (PM's map,
refinement and decoding passes, PAI's image-free CFG pass, re-prompting's compressed prefill) equal the
model's forward; refusals name their reason; loglikelihood is the mean continuation loss. Through the
real lmms-eval CLI: stock internvl_hf and the idle names answer alike, every working name answers every
document, the refused ones fail with their reason, and first-token POPE runs with --force_simple."""

import numpy as np
import pytest
import torch
from conftest import REPO, TASKS
from PIL import Image

from lmms_eval_plugins import testing
from methods import hooks, pm, pm_search, pm_view
from methods.families import image_geometry
from methods.families.internvl import stitched_block
from methods.params import ModelArgsError
from methods.technique import Request

SIZE = (100, 37)  # 3 tiles (1x3) + thumbnail with the saved max_patches=6; 10 (2x5) + 1 with the class's 12
TEXT = "is there a red square in the image ? answer using a single word"


@pytest.fixture(scope="module")
def tiny_internvl(tmp_path_factory):
    return testing.build_tiny_internvl(tmp_path_factory.mktemp("tiny_internvl"))


def _image(size=SIZE):
    img = Image.new("RGB", size, (30, 30, 200))
    img.paste((220, 40, 40), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return img


def _inputs(processor, size=SIZE, text=TEXT, **patches):
    """As lmms-eval's internvl_hf builds a request: the user turn (image, then text), the chat template, the processor."""
    image = _image(size)
    messages = [{"role": "user", "content": [{"type": "image", "url": image}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(images=[image], text=prompt, return_tensors="pt", **patches)


def _processor(ckpt):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(ckpt)


# ---------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    "size,tiles",
    [((64, 64), (1, 1)), ((100, 37), (1, 3)), ((37, 100), (3, 1)), ((200, 150), (2, 3)), ((30, 300), (6, 1))],
)
def test_geometry_matches_the_processor(tiny_internvl, size, tiles):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_internvl)
    processor = _processor(tiny_internvl)
    inputs = _inputs(processor, size)
    geo = image_geometry(config, processor, size, inputs["input_ids"])
    soft = (inputs["input_ids"][0] == config.image_token_id).nonzero().flatten()
    assert torch.equal(geo.all_positions(), soft)
    n_tiles = tiles[0] * tiles[1]
    assert inputs["pixel_values"].shape[0] == n_tiles + (n_tiles > 1)  # tiles, then the thumbnail
    base = geo.base
    assert base.grid_hw == (4, 4) and base.region == (0.0, 0.0, 1.0, 1.0)
    assert torch.equal(base.positions, soft[-16:])  # the thumbnail: the image's last 16 tokens
    if n_tiles == 1:
        assert [b.name for b in geo.blocks] == ["base"]
    else:
        tiles_block = geo.block("highres")
        assert tiles_block.grid_hw == (4 * tiles[0], 4 * tiles[1]) and tiles_block.region == (0.0, 0.0, 1.0, 1.0)
    ids = inputs["input_ids"][0]
    assert processor.tokenizer.convert_ids_to_tokens([int(ids[soft[0] - 1]), int(ids[soft[-1] + 1])]) == [
        "<img>",
        "</img>",
    ]


def test_geometry_follows_the_class_max_patches(tiny_internvl):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_internvl)
    processor = _processor(tiny_internvl)
    processor.image_processor.max_patches = 12  # what the wrappers copy from internvl_hf's max_patches
    inputs = _inputs(processor, SIZE, max_patches=12)
    geo = image_geometry(config, processor, SIZE, inputs["input_ids"])
    assert inputs["pixel_values"].shape[0] == 11 and geo.block("highres").grid_hw == (8, 20)  # 2 x 5 tiles


def test_stitched_tiles_and_the_pixel_shuffle_layout(tiny_internvl):
    """Tiles are cut in raster order (columns fastest) and each tile's tokens follow in raster order: the
    stitched grid's cell (r, c) is tile (r // t, c // t)'s token (r % t, c % t). Within a tile, the model's
    pixel shuffle makes token (i, j) of the 2x2 patch group at patch rows 2i..2i+1, cols 2j..2j+1."""
    from transformers import InternVLForConditionalGeneration

    block = stitched_block("highres", 2, 3, 2, start=10)
    want = [
        [10, 11, 14, 15, 18, 19],
        [12, 13, 16, 17, 20, 21],
        [22, 23, 26, 27, 30, 31],
        [24, 25, 28, 29, 32, 33],
    ]
    assert block.grid(block.positions).tolist() == want
    model = InternVLForConditionalGeneration.from_pretrained(tiny_internvl).eval()
    side = 8
    rows = torch.arange(side).view(side, 1).expand(side, side)
    cols = torch.arange(side).view(1, side).expand(side, side)
    feats = torch.stack([rows, cols], dim=-1).float()[None]  # (1, 8, 8, 2): each patch carries its (row, col)
    shuffled = model.model.pixel_shuffle(feats, 0.5)  # (1, 4, 4, 8)
    for i in range(4):
        for j in range(4):
            got = shuffled[0, i, j].view(4, 2)
            assert set(got[:, 0].tolist()) == {2 * i, 2 * i + 1} and set(got[:, 1].tolist()) == {2 * j, 2 * j + 1}


# ---------------------------------------------------------------------------------- hook layer and our own passes


@pytest.fixture(scope="module")
def hooked(tiny_internvl):
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(tiny_internvl, dtype=torch.float32).eval()
    processor = _processor(tiny_internvl)
    inputs = dict(_inputs(processor))
    with torch.no_grad():
        plain = model(**inputs).logits
    hooks.install(model)
    req = Request(
        inputs["input_ids"],
        model.config.image_token_id,
        inputs["input_ids"].shape[1],
        [_image()],
        processor=processor,
        config=model.config,
    )
    return model, processor, inputs, plain, req


def test_hook_layer_sees_both_towers_and_the_cls_and_is_bit_identical_while_idle(hooked):
    """The InternViT attention goes through transformers' AttentionInterface: a capture on the vision tower
    sees the CLS row over CLS + 64 patches, for every crop (3 tiles and the thumbnail)."""
    model, _, inputs, plain, _ = hooked
    mods = hooks.attention_modules(model)
    assert len(mods["lm"]) == 4 and len(mods["vision"]) == 2
    cls = hooks.Capture(tower="vision", layers=[0, 1], rows=hooks.Rows.span(0, 1), keys=slice(None))
    with torch.no_grad():
        with hooks.edited(model, hooks.Capture(layers=[0, 1], keys=slice(None)), cls):
            observed = model(**inputs).logits
        idle = model(**inputs).logits
    assert torch.equal(plain, idle) and torch.equal(plain, observed)
    assert cls.latest()[0].shape == (4, 4, 1, 65)


def test_pm_language_model_pass_equals_the_models_forward(hooked):
    """PM's own embeddings (tiles and thumbnail, pixel-shuffled) and LM pass equal the model's forward."""
    from transformers import DynamicCache

    model, _, inputs, plain, req = hooked
    with torch.no_grad():
        emb = pm_view.embed(model, req, inputs["input_ids"], inputs["pixel_values"])
        run = pm._LanguageModel(model, pm_view.pass_positions(model, req, emb.shape[1]))
        ours = model.lm_head(run(emb, DynamicCache(config=model.config.text_config)))
    diff = float((ours - plain).abs().max())
    print(f"PM LM pass vs forward: {diff:.2e}")
    assert diff < 1e-5


def _pm(model, **params):
    return pm.PerceptionMagnifier(hooks.num_layers(model), pm_view.image_grid(model), **params)


@pytest.mark.parametrize("rows", ["all", "text"])
def test_pm_map_passes_equal_full_forwards_with_the_blocked_keys(hooked, rows):
    """Pass 0 and every refinement pass (KV prefix reuse + key mask) equal a full forward with those thumbnail
    keys blocked by the hook layer on the same rows (text rows start after the whole image)."""
    model, _, inputs, _, req = hooked
    t = _pm(model, beta=0.0, max_iter=2, block_rows=rows)
    t.generate(model, req, **inputs, max_new_tokens=1, do_sample=False)
    s = t.last_magnified.search
    assert s.iterations >= 2
    pos = req.geometry.base.positions
    assert s.h_star.shape == (pos.numel(),)
    row_spec = hooks.Rows.span(0) if rows == "all" else hooks.Rows.span(req.geometry.span[1])
    worst = 0.0
    for i, blocked in enumerate([np.zeros(pos.numel(), dtype=bool)] + s.blocked):
        cap = hooks.Capture(layers=t.layers, keys=pos)
        block = hooks.Block(layers=range(hooks.num_layers(model)), rows=row_spec, keys=pos[torch.as_tensor(blocked)])
        with torch.no_grad(), hooks.edited(model, block, cap):
            model(**inputs)
        want = pm_search.token_map(cap.stacked()[:, 0, :, 0])
        worst = max(worst, float(np.abs(s.maps[i] * len(t.layers) - want).max()))
    print(f"PM map passes ({rows}) vs blocked forwards: {worst:.2e}")
    assert worst < 1e-5


def test_pm_identity_magnification_decodes_like_generate_and_the_magnified_image_keeps_the_tiles(hooked):
    """alpha=0: the refreshing decode (PM's own LM passes) equals greedy generate; alpha=15: the magnified image
    keeps the size, so the processor cuts it into the same tiles (pixel_values of the same shape)."""
    model, _, inputs, _, req = hooked
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    for refresh in ("once", "every_token"):
        t = _pm(model, alpha=0.0, refresh=refresh, max_iter=1)
        got = t.generate(model, req, **inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert torch.equal(got, want), refresh
    t = _pm(model, alpha=15.0)
    t.generate(model, req, **inputs, max_new_tokens=2, do_sample=False)
    mag = t.last_magnified
    assert mag.grid_map.shape == (4, 4) and mag.image.size == SIZE
    assert mag.pixel_values.shape == inputs["pixel_values"].shape
    assert not np.array_equal(np.asarray(mag.image), np.asarray(req.images[0]))


def test_image_free_pass_equals_the_models_forward_of_the_image_free_prompt(hooked):
    """PAI's CFG: the image-free log-probabilities equal a plain forward of the prompt without its image tokens."""
    from methods import guidance

    model, _, inputs, _, _ = hooked
    with torch.no_grad():
        new = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)[
            :, inputs["input_ids"].shape[1] :
        ]
        text = guidance.drop_image_tokens(inputs["input_ids"], model.config.image_token_id)
        cfg = guidance.ImageFreeGuidance(model, text, gamma=2.0, cutoff=0.0)
        scores = torch.randn(1, model.config.text_config.vocab_size, generator=torch.Generator().manual_seed(0))
        c = torch.log_softmax(scores, dim=-1)
        got = torch.cat(
            [2 * c - cfg(torch.cat([inputs["input_ids"], new[:, :i]], dim=1), scores) for i in range(new.shape[1] + 1)]
        )
        seq = torch.cat([text, new], dim=1)
        want = torch.log_softmax(model(input_ids=seq).logits[0, text.shape[1] - 1 :], dim=-1)
    diff = float((got - want).abs().max())
    print(f"image-free pass vs forward: {diff:.2e}")
    assert diff < 1e-5


def test_compressed_context_equals_the_blocked_full_forward(hooked, tiny_internvl):
    """Re-prompting's compressed prefill: the follow-up's logits equal a full forward with the dropped image
    keys blocked for the follow-up rows."""
    from methods.kv_cache import cache_of, full_cache, with_cache
    from methods.reprompt import Reprompt
    from methods.reprompt_context import forward_from

    model, processor, in1, _, req = hooked
    in2 = _inputs(processor, text="is there a blue circle ? answer using a single word")
    tech = Reprompt(4, mode="compressed", keep_ratio=0.25, keep_query=True)
    kept = tech.kept_image_tokens(model, req, in1)[None]
    with torch.no_grad():
        out = model(**in1, use_cache=True, **with_cache(full_cache()))
    ctx = tech.build_context(model, req, cache_of(out), kept, req.prompt_len)
    pos = req.image_pos
    prefix, suffix = in1["input_ids"], in2["input_ids"][:, int(pos[-1]) + 1 :]
    seq = torch.cat([prefix, suffix], dim=1)
    dropped = pos[[i for i in range(pos.numel()) if i not in set(kept.tolist())]]
    block = hooks.Block(layers=range(4), rows=hooks.Rows.span(prefix.shape[1]), keys=dropped)
    with torch.no_grad():
        got = forward_from(model, ctx, suffix).logits
        with hooks.edited(model, block):
            want = model(input_ids=seq, pixel_values=in1["pixel_values"]).logits[:, prefix.shape[1] :]
    diff = float((got - want).abs().max())
    print(f"compressed context vs blocked forward: {diff:.2e}")
    assert diff < 1e-5


# ---------------------------------------------------------------------------------- wrappers


@pytest.fixture(scope="module")
def stock(tiny_internvl):
    """lmms-eval's own internvl_hf on the checkpoint: its answer and logits for one request."""
    from lmms_eval.models.chat.internvl_hf import InternVLHf

    lm = InternVLHf(pretrained=str(tiny_internvl), device="cpu", device_map="cpu")
    inputs = _inputs(lm.processor, min_patches=lm.min_patches, max_patches=lm.max_patches).to("cpu", lm.model.dtype)
    with torch.no_grad():
        answer = lm.model.generate(**inputs, max_new_tokens=6, do_sample=False)
        logits = lm.model(**inputs).logits
    return inputs, answer, logits


def _wrapper(name, ckpt, chat=True, **kw):
    from lmms_eval_plugins.models import internvl

    cls = getattr(internvl, "InternvlHf" + name.capitalize() + ("Chat" if chat else ""))
    return cls(pretrained=str(ckpt), device="cpu", **kw)


def _lm_inputs(lm):
    return _inputs(lm.processor, min_patches=lm.min_patches, max_patches=lm.max_patches).to("cpu", lm.model.dtype)


IDLE = {
    "pai": {"alpha": 0.0, "use_cfg": False},
    "knockout": {"from_layer": 2, "to_layer": 2},
}


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "simple"])
@pytest.mark.parametrize("name", sorted(IDLE))
def test_idle_wrappers_equal_stock_internvl_hf(tiny_internvl, stock, name, chat):
    lm = _wrapper(name, tiny_internvl, chat=chat, **IDLE[name])
    inputs = _lm_inputs(lm)  # through the RecordingProcessor
    assert torch.equal(inputs["input_ids"], stock[0]["input_ids"])
    assert torch.equal(inputs["pixel_values"], stock[0]["pixel_values"])
    assert lm.processor.last_images[0].size == SIZE
    with torch.no_grad():
        answer = lm.model.generate(**inputs, max_new_tokens=6, do_sample=False)
        logits = lm.model(**inputs).logits
    assert torch.equal(answer, stock[1]) and torch.equal(logits, stock[2])
    assert lm._model.dtype == torch.bfloat16 and lm.is_simple is not chat


def _edits(lm, inputs):
    from lmms_eval_plugins.base import family_request

    req = family_request(lm._model, lm.processor, dict(inputs))
    req.require_one_image("test")
    return req, lm.technique.recipe(lm._model, req)


def test_pai_boosts_every_image_token_and_knockout_blocks_them(tiny_internvl, stock):
    lm = _wrapper("pai", tiny_internvl, alpha=1.0, start_layer=0, use_cfg=False)
    inputs = _lm_inputs(lm)
    req, (boost,) = _edits(lm, inputs)
    assert req.geometry.base.grid_hw == (4, 4) and req.geometry.block("highres").grid_hw == (8, 20)
    assert torch.equal(boost.keys.cpu(), req.image_pos.cpu())  # all 176 tokens: tiles and thumbnail, not <img>/</img>
    assert boost.rows.start == req.prompt_len - 1
    with torch.no_grad():
        out = lm.model(**inputs).logits
    assert torch.isfinite(out).all() and not torch.equal(out, stock[2])
    lm = _wrapper("knockout", tiny_internvl, mode="both")
    req, (block,) = _edits(lm, _lm_inputs(lm))
    assert torch.equal(block.keys.cpu(), req.geometry.all_positions())


@pytest.mark.parametrize("which", ["base", "highres"])
def test_lochead_box_from_either_block(tiny_internvl, which):
    from methods.lochead import parse_box

    lm = _wrapper("lochead", tiny_internvl, heads="all", block=which)
    inputs = _lm_inputs(lm)
    with torch.no_grad():
        out = lm.model.generate(**inputs, max_new_tokens=24, do_sample=False)
    text = lm.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    box = parse_box(text)
    assert box is not None and all(0 <= v <= 1 for v in box) and box[0] <= box[2] and box[1] <= box[3], text
    located = lm.technique.locate(lm._model, _edits(lm, inputs)[0], **inputs)
    assert located.head_maps.shape[1:] == ((4, 4) if which == "base" else (8, 20))


def test_float32_loading_and_remote_code_off(tiny_internvl):
    lm = _wrapper("pai", tiny_internvl, alpha=0.0, dtype="float32")
    assert lm._model.dtype == torch.float32
    with pytest.raises(ModelArgsError, match="dtype"):
        _wrapper("pai", tiny_internvl, dtype="float64")


@pytest.mark.parametrize(
    "name,kw,reason",
    [
        ("paint", {}, "internvl_hf_paint does not support internvl checkpoints.*each merge 4 patches.*InternViT"),
        ("viral", {}, "internvl_hf_viral needs adapter=DIR"),
        (
            "pm",
            {"batch_size": 2},
            "batch_size=2 is not supported .*not yet put into a batch of InternVL \\(HF\\) pixel_values",
        ),
    ],
)
def test_refusals_name_their_reason(tiny_internvl, name, kw, reason):
    with pytest.raises(ModelArgsError, match=reason):
        _wrapper(name, tiny_internvl, **kw)


def test_other_families_are_refused_with_where_they_go(tiny_internvl, tiny_ckpt):
    with pytest.raises(ModelArgsError, match="HF-native InternVL checkpoint.*LLaVA-1.5 / LLaVA-NeXT"):
        _wrapper("pai", tiny_ckpt)
    from lmms_eval_plugins.models.pai import LlavaPaiChat

    with pytest.raises(
        ModelArgsError, match="'internvl' checkpoint.*InternVL \\(HF\\) checkpoints go to the internvl_hf_"
    ):
        LlavaPaiChat(pretrained=str(tiny_internvl), device="cpu")


def test_simple_class_turns_simple_requests_into_the_chat_turn(tiny_internvl):
    """--force_simple: a simple generation request gives the answer the chat class gives the same document."""
    from lmms_eval.api.instance import Instance

    doc = {"image": _image()}
    gen = {"max_new_tokens": 4, "temperature": 0, "do_sample": False}
    answers = []
    for chat in (True, False):
        lm = _wrapper("pai", tiny_internvl, chat=chat, alpha=0.0, use_cfg=False)
        lm.task_dict = {"t": {"test": [doc]}}
        if chat:
            msgs = lambda d: [
                {"role": "user", "content": [{"type": "image", "url": d["image"]}, {"type": "text", "text": TEXT}]}
            ]  # noqa: E731
            args = (TEXT, msgs, dict(gen), 0, "t", "test")
        else:
            args = (TEXT, dict(gen), lambda d: [d["image"]], 0, "t", "test")
        req = Instance(
            request_type="generate_until", arguments=args, idx=0, metadata={"task": "t", "doc_id": 0, "repeats": 1}
        )
        answers.append([r.text if hasattr(r, "text") else r for r in lm.generate_until([req])])
    assert answers[0] == answers[1] and answers[0][0] != ""


def test_loglikelihood_is_the_mean_continuation_loss_and_greedy_flag(tiny_internvl):
    """lmms-eval's internvl_hf has no loglikelihood; ours gives llava_hf's (mean NLL of the continuation, greedy)
    pair: the loss equals transformers' own label loss of the same sequence, and is_greedy is true exactly for
    the model's own greedy continuation."""
    from types import SimpleNamespace

    lm = _wrapper("pai", tiny_internvl, chat=False, alpha=0.0, use_cfg=False, dtype="float32")
    image = _image()
    lm.task_dict = {"t": {"test": [{"image": image}]}}
    prompt, _ = lm._encode_continuation(TEXT, "x", [image])
    with torch.no_grad():
        out = lm._model.generate(**prompt, max_new_tokens=3, do_sample=False)
    greedy = lm.processor.decode(out[0, prompt["input_ids"].shape[1] :])
    requests = [SimpleNamespace(args=(TEXT, c, lambda doc: [doc["image"]], 0, "t", "test")) for c in (greedy, "no")]
    for (score, is_greedy), cont, want in zip(lm.score_continuations(requests), (greedy, "no"), (True, False)):
        p, full = lm._encode_continuation(TEXT, cont, [image])
        labels = full["input_ids"].clone()
        labels[:, : p["input_ids"].shape[1]] = -100
        with torch.no_grad():
            loss = lm._model(**full, labels=labels).loss
        assert score == pytest.approx(float(loss), rel=1e-5) and is_greedy is want, cont


# ---------------------------------------------------------------------------------- the real CLI


def test_cli_internvl_hf_names(tiny_internvl, tmp_path):
    """One lmms-eval process: stock internvl_hf, the idle names (same answers), every working name, the refused
    ones, and first-token POPE (loglikelihood, --force_simple) idle and active."""
    args = f"pretrained={tiny_internvl},device=cpu,device_map=cpu,max_patches=6"
    pope = "shapeworld_pope_random_first_token"
    runs = {
        "stock": ("internvl_hf", "", "tiny_yesno"),
        "pai_idle": ("internvl_hf_pai", ",alpha=0,use_cfg=false", "tiny_yesno"),
        "knockout_idle": ("internvl_hf_knockout", ",from_layer=2,to_layer=2", "tiny_yesno"),
        "pai": ("internvl_hf_pai", ",alpha=1.0,start_layer=0", "tiny_yesno"),
        "knockout": ("internvl_hf_knockout", ",mode=both", "tiny_yesno"),
        "reprompt": ("internvl_hf_reprompt", ",keep_ratio=0.25", "tiny_yesno"),
        "pm": ("internvl_hf_pm", ",max_iter=2", "tiny_yesno"),
        "lochead": ("internvl_hf_lochead", ",heads=all", "tiny_rec"),
        "paint": ("internvl_hf_paint", "", "tiny_yesno"),
        "pope_idle": ("internvl_hf_pai", ",alpha=0,use_cfg=false", pope),
        "pope_pai": ("internvl_hf_pai", ",alpha=1.0,start_layer=0", pope),
    }
    log = testing.run_lmms_eval_many(
        [
            {
                "model": m,
                "model_args": args + extra,
                "tasks": task,
                "output_path": str(tmp_path / key),
                "include_path": str(REPO / "task_configs" if task == pope else TASKS),
                **({"force_simple": True, "limit": 4} if task == pope else {}),
            }
            for key, (m, extra, task) in runs.items()
        ],
        tmp_path / "runs.yaml",
        cwd=REPO,
    )
    samples = {key: testing.read_samples(tmp_path / key, task) for key, (_, _, task) in runs.items()}
    answers = [s["filtered_resps"] for s in samples["stock"]]
    assert testing.results_of(tmp_path / "stock") is not None and len(answers) == 3, log[-3000:]
    for key in ("pai_idle", "knockout_idle"):
        assert [s["filtered_resps"] for s in samples[key]] == answers, key
    for key in ("pai", "knockout", "reprompt", "pm"):
        assert testing.results_of(tmp_path / key) is not None and len(samples[key]) == 3, (key, log[-3000:])
    rec = testing.results_of(tmp_path / "lochead")
    assert rec is not None and 0.0 <= rec["results"]["tiny_rec"]["refcoco_IoU,none"] <= 1.0, log[-3000:]
    assert all(str(s["filtered_resps"]).count(",") >= 3 for s in samples["lochead"])
    assert testing.results_of(tmp_path / "paint") is None and "internvl_hf_paint does not support internvl" in log
    for key in ("pope_idle", "pope_pai"):
        res = testing.results_of(tmp_path / key)
        assert res is not None and len(samples[key]) == 4, (key, log[-3000:])
        assert 0.0 <= res["results"][pope]["pope_accuracy,none"] <= 1.0


# ---------------------------------------------------------------------------------- commands


def test_viral_train_aligns_the_thumbnail_and_internvl_hf_viral_merges_the_adapter(tiny_internvl, stock, tmp_path):
    """`lmms-plugins viral-train` on InternVL: the aligned tokens are the thumbnail's (the geometry's base block, from
    the processor's tiling), two steps train LoRA with the multi_modal_projector, and internvl_hf_viral merges the
    adapter (a change from stock)."""
    import json
    import math

    from test_viral import _save_tiny_dinov2
    from transformers import AutoConfig

    from lmms_eval_plugins.cli import main
    from methods import viral
    from methods.conversation_data import ConversationDataset, collate
    from methods.families import image_geometry

    sizes = ((100, 37), (37, 100), (48, 40), (64, 64))  # 1x3 and 3x1 tiles + thumbnail; one tile alone (twice)
    (tmp_path / "img").mkdir()
    records = []
    for i, size in enumerate(sizes):
        _image(size).save(tmp_path / "img" / f"{i}.png")
        question = "<image>\nis there a red square in the image?"
        records.append(
            {
                "image": f"{i}.png",
                "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "yes"}],
            }
        )
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records))

    processor, config = _processor(tiny_internvl), AutoConfig.from_pretrained(tiny_internvl)
    data = ConversationDataset([{**r, "image": Image.open(tmp_path / "img" / r["image"])} for r in records], processor)
    for pair in ((0, 1), (2, 3)):
        batch = collate([data[i] for i in pair], processor.tokenizer.pad_token_id)
        for i, row, aligned in zip(pair, batch["input_ids"], viral.aligned_tokens(config, batch)):
            base = image_geometry(config, processor, sizes[i], row[None]).base
            assert torch.equal(aligned.positions, base.positions) and aligned.grid == (4, 4) and aligned.whole_image

    run = tmp_path / "run"
    code = main(
        [
            "viral-train",
            "--pretrained", str(tiny_internvl),
            "--data", str(tmp_path / "data.jsonl"),
            "--image-folder", str(tmp_path / "img"),
            "--teacher", str(_save_tiny_dinov2(tmp_path / "teacher")),
            "--layer", "3",
            "--proj-hidden", "16",
            "--lora-r", "4",
            "--lora-alpha", "8",
            "--lora-dropout", "0",
            "--lr", "5e-2",
            "--batch-size", "2",
            "--max-steps", "2",
            "--warmup-ratio", "0",
            "--log-every", "1",
            "--no-progress",
            "--output-dir", str(run),
        ]
    )  # fmt: skip
    assert code in (0, None)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(math.isfinite(row["vra_loss"]) and math.isfinite(row["lm_loss"]) for row in log)
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["multi_modal_projector"]
    lm = _wrapper("viral", tiny_internvl, adapter=str(run))
    with torch.no_grad():
        assert not torch.equal(lm.model(**_lm_inputs(lm)).logits, stock[2])


def test_knockout_sweep_runs_internvl_hf_knockout(tiny_internvl, monkeypatch):
    """`lmms-plugins knockout-sweep` on an InternVL checkpoint, through lmms-eval's evaluator: internvl_hf_knockout's
    chat class (not llava_knockout's), the empty window first, then the window swept, each with its layers."""
    import lmms_eval.evaluator

    from lmms_eval_plugins.commands import knockout_sweep
    from lmms_eval_plugins.models.internvl import InternvlHfKnockoutChat

    seen, evaluate = [], lmms_eval.evaluator.simple_evaluate

    def recorded(model, tasks, **kwargs):
        seen.append((type(model), list(model.technique.layers)))
        return evaluate(model=model, tasks=tasks, **kwargs)

    monkeypatch.setattr(lmms_eval.evaluator, "simple_evaluate", recorded)
    monkeypatch.chdir(REPO)
    rows = knockout_sweep.run_sweep(
        f"pretrained={tiny_internvl},device=cpu", ["tiny_yesno"], [(0, 2)], ["both"], limit=2, include_path=str(TASKS)
    )
    assert seen == [(InternvlHfKnockoutChat, []), (InternvlHfKnockoutChat, [0, 1])]
    assert rows and all(r["window"] == "0:2" and r["mode"] == "both" and r["baseline"] is not None for r in rows)
