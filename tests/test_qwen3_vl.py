"""The qwen3_vl_* wrappers on a tiny random Qwen3-VL built here (16 px patches merged 2x2, interleaved M-RoPE,
DeepStack features of vision layers 0 and 1 added after LM layers 0 and 1).

In process: the geometry matches the processor's tokens; the hook layer is bit-identical while idle; idle
wrappers equal lmms-eval's own qwen3_vl (answers and logits); every pass of our own over the language model
(PM's map and refinement passes and refreshing decode, re-prompting's compressed context, CFG's image-free
pass) equals the model's own forward, DeepStack included; what knockout's deepstack=keep|drop changes,
measured; refusals name their reason; loglikelihood is the label loss. Through the real lmms-eval CLI (one
process): stock qwen3_vl, the idle names (same answers), every working technique, the refused ones, and
first-token POPE (loglikelihood, --force_simple)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO, TASKS
from PIL import Image

from lmms_eval_plugins import testing
from methods import families, hooks, pm, pm_search, pm_view, positions
from methods.families import image_geometry
from methods.params import ModelArgsError
from methods.technique import Request

PIXELS = {"min_pixels": 64 * 64, "max_pixels": 160 * 160}  # the tiny processor's own (saved) bounds
SIZE = (100, 37)  # -> 64 x 160 px: 4 x 10 patches, a 2 x 5 merged grid
GREEDY = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    return testing.build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny_qwen3_vl"), **PIXELS)


def _image(size=SIZE):
    img = Image.new("RGB", size, (30, 30, 200))
    img.paste((220, 40, 40), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return img


def _inputs(processor, size=SIZE, text="is there a red square in the image?"):
    """As lmms-eval's qwen3_vl builds a request: system message, the image (already a multiple of 32 px after
    qwen_vl_utils), the text; the processor does not resize again."""
    from qwen_vl_utils import process_vision_info

    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {
            "role": "user",
            "content": [{"type": "image", "image": _image(size), **PIXELS}, {"type": "text", "text": text}],
        },
    ]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images, _ = process_vision_info([messages], image_patch_size=16)
    return processor(text=[prompt], images=images, do_resize=False, return_tensors="pt")


def _processor(ckpt):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def qwen3(tiny_qwen3):
    """(model fp32 with the hook layer, processor, inputs, request, plain logits)."""
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()
    processor = _processor(tiny_qwen3)
    inputs = dict(_inputs(processor))
    with torch.no_grad():
        plain = model(**inputs).logits
    hooks.install(model)
    return model, processor, inputs, _request(model, processor, inputs), plain


def _request(model, processor, inputs, image=None):
    ids = inputs["input_ids"]
    return Request(
        ids,
        model.config.image_token_id,
        ids.shape[1],
        [image if image is not None else _resized()],  # the image the processor got (qwen_vl_utils resized it)
        processor=processor,
        config=model.config,
        inputs={"image_grid_thw": inputs["image_grid_thw"]},
    )


def _resized(size=SIZE):
    from qwen_vl_utils import fetch_image

    return fetch_image({"image": _image(size), **PIXELS}, image_patch_size=16)


# ---------------------------------------------------------------------------------- geometry and hooks


@pytest.mark.parametrize("size", [(48, 40), (100, 37), (37, 100), (64, 64), (300, 120), (30, 200)])
def test_geometry_matches_the_processor(tiny_qwen3, size):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_qwen3)
    processor = _processor(tiny_qwen3)
    inputs = _inputs(processor, size)
    geo = image_geometry(config, processor, _resized(size).size, inputs["input_ids"], dict(inputs))
    (block,) = geo.blocks
    _, h, w = (int(v) for v in inputs["image_grid_thw"][0])
    assert (block.rows, block.cols) == (h // 2, w // 2) and block.region == (0.0, 0.0, 1.0, 1.0)
    pads = (inputs["input_ids"][0] == config.image_token_id).nonzero().flatten()
    assert torch.equal(geo.all_positions(), pads)
    # without image_grid_thw: the processor's own smart_resize at factor 32 (16 px patches x 2 merge)
    again = image_geometry(config, processor, _resized(size).size, inputs["input_ids"])
    assert again.blocks[0].grid_hw == block.grid_hw


def test_positions_are_the_models_get_rope_index(qwen3):
    model, _, inputs, _, _ = qwen3
    want, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"])
    got = positions.prompt_positions(model, inputs["input_ids"], inputs["image_grid_thw"])
    assert torch.equal(got, want[:, 0])
    assert model.config.text_config.rope_parameters["mrope_interleaved"]


def test_hook_layer_finds_both_towers_and_is_bit_identical_while_idle(qwen3):
    model, _, inputs, _, plain = qwen3
    mods = hooks.attention_modules(model)
    assert len(mods["lm"]) == 4 and len(mods["vision"]) == 3
    with torch.no_grad():
        with hooks.edited(model, hooks.Capture(layers=[0, 3], keys=slice(None))):
            observed = model(**inputs).logits
        idle = model(**inputs).logits
    assert torch.equal(plain, idle) and torch.equal(plain, observed)


# ---------------------------------------------------------------------------------- our passes = the model's


def test_language_model_pass_with_deepstack_equals_the_forward(qwen3):
    """The adapter's lm_inputs (embeddings + DeepStack's mask and per-layer features) through the language model
    alone, at the model's positions, equals the model's forward; in two chunks (a cache cut inside the image,
    lm_slice) too; without DeepStack's features it does not (the measured size of the injection)."""
    from transformers import DynamicCache

    model, _, inputs, req, plain = qwen3
    ids = inputs["input_ids"]
    with torch.no_grad():
        emb, extras = pm_view.lm_inputs(model, req, ids, inputs["pixel_values"])
        pos = pm_view.pass_positions(model, req, ids.shape[1])
        run = pm._LanguageModel(model, pos, extras)
        whole = model.lm_head(run(emb, DynamicCache(config=model.config.text_config)))
        cut = int(req.image_pos[3])  # three image tokens in the first chunk
        cache = DynamicCache(config=model.config.text_config)
        first = run(emb[:, :cut], cache)
        chunked = model.lm_head(torch.cat([first, run(emb[:, cut:], cache)], dim=1))
        bare = model.lm_head(pm._LanguageModel(model, pos)(emb, DynamicCache(config=model.config.text_config)))
    assert (
        set(extras) == {"visual_pos_masks", "deepstack_visual_embeds"} and len(extras["deepstack_visual_embeds"]) == 2
    )
    assert (whole - plain).abs().max() < 1e-5 and (chunked - plain).abs().max() < 1e-5
    assert (bare - plain).abs().max() > 0.1  # 3.3 on this checkpoint (1.0 on the last row)


@pytest.mark.parametrize("rows", ["all", "text"])
def test_pm_map_passes_equal_full_forwards_with_the_blocked_keys(qwen3, rows):
    """PM's pass 0 and refinement passes (KV prefix reuse + key mask, M-RoPE positions, DeepStack sliced to the
    re-forwarded part) equal the model's forward with those image keys blocked by the hook layer."""
    model, _, inputs, req, _ = qwen3
    t = pm.PerceptionMagnifier(4, None, beta=0.0, max_iter=2, block_rows=rows)
    t.generate(model, req, **inputs, max_new_tokens=1, do_sample=False)
    s = t.last_magnified.search
    pos = req.geometry.base.positions
    assert s.iterations >= 2 and s.h_star.shape == (pos.numel(),)
    row_spec = hooks.Rows.span(0) if rows == "all" else hooks.Rows.span(req.geometry.span[1])
    for i, blocked in enumerate([np.zeros(pos.numel(), dtype=bool)] + s.blocked):
        cap = hooks.Capture(layers=t.layers, keys=pos)
        block = hooks.Block(layers=range(4), rows=row_spec, keys=pos[torch.as_tensor(blocked)])
        with torch.no_grad(), hooks.edited(model, block, cap):
            model(**inputs)
        np.testing.assert_allclose(
            s.maps[i] * len(t.layers), pm_search.token_map(cap.stacked()[:, 0, :, 0]), atol=1e-5, err_msg=f"pass {i}"
        )


def test_pm_identity_magnification_decodes_like_generate(qwen3):
    """alpha=0: a flat map, the identity magnification; PM's refreshing decode (its own passes on the magnified
    stream, DeepStack included) equals greedy generate token for token."""
    model, _, inputs, req, _ = qwen3
    with torch.no_grad():
        want = model.generate(**inputs, **GREEDY)
        for refresh in ("once", "every_token"):
            t = pm.PerceptionMagnifier(4, None, alpha=0.0, refresh=refresh, max_iter=1)
            assert torch.equal(t.generate(model, req, **inputs, **GREEDY), want), refresh


def test_compressed_context_equals_the_blocked_full_forward(qwen3):
    """Re-prompting: the kept entries of the model's own prefill (DeepStack already in them), then a new question
    at explicit M-RoPE positions == a full forward of the same sequence with the dropped image keys blocked."""
    from methods.kv_cache import cache_of
    from methods.reprompt import Reprompt
    from methods.reprompt_context import forward_from

    model, processor, in1, req, _ = qwen3
    in2 = _inputs(processor, text="how many blue circle are there ?")
    tech = Reprompt(4, mode="compressed", keep_ratio=0.3, keep_query=True)
    kept = tech.kept_image_tokens(model, req, in1)[None]
    with torch.no_grad():
        out = model(**in1, use_cache=True)
    ctx = tech.build_context(model, req, cache_of(out), kept, req.prompt_len)
    pos = req.image_pos
    prefix, suffix = in1["input_ids"], in2["input_ids"][:, int(pos[-1]) + 1 :]
    seq = torch.cat([prefix, suffix], dim=1)
    dropped = pos[[i for i in range(pos.numel()) if i not in set(kept.tolist())]]
    block = hooks.Block(layers=range(4), rows=hooks.Rows.span(prefix.shape[1]), keys=dropped)
    with torch.no_grad():
        got = forward_from(model, ctx, suffix).logits
        with hooks.edited(model, block):
            want = model(
                input_ids=seq,
                pixel_values=in1["pixel_values"],
                image_grid_thw=in1["image_grid_thw"],
                mm_token_type_ids=(seq == model.config.image_token_id).int(),
            ).logits[:, prefix.shape[1] :]
    assert (got - want).abs().max() < 1e-5


def test_pruned_generation_equals_the_masked_generation(qwen3):
    from methods.reprompt import Reprompt

    model, _, inputs, req, _ = qwen3
    prune = Reprompt(4, mode="prune", keep_ratio=0.3)
    with torch.no_grad():
        cut = prune.generate(model, req, **inputs, **GREEDY)
        with hooks.edited(model, *prune.prune_edits(req, prune.kept_image_tokens(model, req, inputs))):
            masked = model.generate(**inputs, **GREEDY)
    assert torch.equal(cut, masked) and prune.records[-1]["kv_entries"] < req.prompt_len


def test_cfg_image_free_pass_equals_the_forward_of_the_text_prompt(qwen3):
    """PAI's CFG pass while decoding (methods/guidance.py): the image-free prompt plus the generated tokens at their
    own explicit positions (no image, so no DeepStack) == a direct forward of that text; the positions the model
    would infer from the image prompt's cached rope_deltas do not give it."""
    from test_qwen_reprompt import _image_free_log_probs

    model, _, inputs, _, _ = qwen3
    with torch.no_grad():
        new = model.generate(**inputs, **GREEDY)[:, inputs["input_ids"].shape[1] :]
        assert model.model.rope_deltas is not None and int(model.model.rope_deltas) != 0
        text, got = _image_free_log_probs(model, inputs, new)
        seq = torch.cat([text, new], dim=1)
        own = torch.arange(seq.shape[1]).expand(3, 1, -1)
        want = torch.log_softmax(model(input_ids=seq, position_ids=own).logits[0, text.shape[1] - 1 :], dim=-1)
    assert (got - want).abs().max() < 1e-5  # 4.8e-6 on this checkpoint; the cached rope_deltas' positions: 2.8


# ---------------------------------------------------------------------------------- knockout and DeepStack


def _knockout_logits(model, req, inputs, injection, **params):
    from methods.knockout import Knockout

    t = Knockout(4, injection=injection, **params)
    with torch.no_grad():
        return t.forward(model, req, **inputs).logits[0, -1]


def test_knockout_deepstack_keep_or_drop(qwen3):
    """Knockout cuts attention edges. DeepStack's features live in the image positions' own states, so dropping
    them too changes nothing where every later row is cut off the image in every layer (mode=both, all layers),
    and changes the answer row wherever image keys are still read (window after:1 leaves layers 0-1 open).
    The numbers are docs/qwen3_vl.md's (a random tiny model: no trained Qwen3-VL exists here)."""
    model, _, inputs, req, plain = qwen3
    full_keep = _knockout_logits(model, req, inputs, "keep", mode="both")
    full_drop = _knockout_logits(model, req, inputs, "drop", mode="both")
    win_keep = _knockout_logits(model, req, inputs, "keep", mode="both", window="after:1")
    win_drop = _knockout_logits(model, req, inputs, "drop", mode="both", window="after:1")
    none_drop = _knockout_logits(model, req, inputs, "drop", mode="both", from_layer=2, to_layer=2)
    print(
        "knockout keep vs drop, last-row max |logit diff|: all layers "
        f"{(full_keep - full_drop).abs().max():.2e}, after:1 {(win_keep - win_drop).abs().max():.3f}, "
        f"no knockout {(plain[0, -1] - none_drop).abs().max():.3f}"
    )
    assert (full_keep - full_drop).abs().max() < 1e-5
    assert (win_keep - win_drop).abs().max() > 1e-2
    assert (plain[0, -1] - none_drop).abs().max() > 1e-2  # the injection matters to the unblocked model


# ---------------------------------------------------------------------------------- wrappers


@pytest.fixture(scope="module")
def stock(tiny_qwen3):
    """lmms-eval's own qwen3_vl on the checkpoint: its answer and logits for one request."""
    from lmms_eval.models.simple.qwen3_vl import Qwen3_VL

    lm = Qwen3_VL(pretrained=str(tiny_qwen3), device="cpu", device_map="cpu", **PIXELS)
    inputs = _inputs(lm.processor)
    with torch.no_grad():
        answer = lm.model.generate(**inputs, max_new_tokens=6, do_sample=False)
        logits = lm.model(**inputs).logits
    return inputs, answer, logits


def _wrapper(name, ckpt, chat=True, **kw):
    from lmms_eval_plugins.models import qwen3_vl

    cls = getattr(qwen3_vl, "Qwen3Vl" + name.capitalize() + ("Chat" if chat else ""))
    return cls(pretrained=str(ckpt), device="cpu", **{**PIXELS, **kw})


IDLE = {"pai": {"alpha": 0.0, "use_cfg": False}, "knockout": {"from_layer": 2, "to_layer": 2}}


@pytest.mark.parametrize("name", sorted(IDLE))
def test_idle_wrappers_equal_stock_qwen3_vl(tiny_qwen3, stock, name):
    lm = _wrapper(name, tiny_qwen3, **IDLE[name])
    inputs = _inputs(lm.processor)
    assert torch.equal(inputs["pixel_values"], stock[0]["pixel_values"])
    with torch.no_grad():
        answer = lm.model.generate(**inputs, max_new_tokens=6, do_sample=False)
        logits = lm.model(**inputs).logits
    assert torch.equal(answer, stock[1]) and torch.equal(logits, stock[2])
    assert lm._model.dtype == torch.bfloat16  # as lmms-eval's class loads it


def test_simple_class_serves_each_request_its_own_image(tiny_qwen3):
    """lmms-eval's simple qwen3_vl prepares the next request while answering one; our simple classes do not, so
    the request a technique sees carries the image of the prompt being answered (two sizes, two grids)."""
    lm = _wrapper("lochead", tiny_qwen3, chat=False, heads="all")
    docs = [{"image": _image((100, 37))}, {"image": _image((37, 100))}, {"image": _image((64, 64))}]
    lm.task_dict = {"t": {"test": docs}}
    seen = []
    real = lm.technique.generate

    def spy(model, req, **kwargs):
        seen.append((req.images[0].size, tuple(int(v) for v in req.inputs["image_grid_thw"][0])))
        return real(model, req, **kwargs)

    lm.technique.generate = spy
    gen = {"max_new_tokens": 3, "temperature": 0, "until": ["\n\n\n"]}
    from lmms_eval.api.instance import Instance

    requests = [
        Instance(
            "generate_until",
            (f"where is the red square {i}", dict(gen), lambda doc: [doc["image"]], i, "t", "test"),
            i,
            {"task": "t", "doc_id": i, "repeats": 1},
        )
        for i in range(3)
    ]
    lm.generate_until(requests)
    assert len(seen) == 3
    for size, (_, h, w) in seen:
        assert (size[0] // 16, size[1] // 16) == (w, h)


def test_knockout_wrapper_logs_its_deepstack_choice(tiny_qwen3):
    lm = _wrapper("knockout", tiny_qwen3, mode="both", deepstack="drop")
    assert lm.technique.describe()["injection"] == "drop"
    with pytest.raises(ModelArgsError, match="deepstack"):
        _wrapper("knockout", tiny_qwen3, deepstack="remove")


def test_lochead_box_from_the_non_square_grid(tiny_qwen3):
    from methods.lochead import parse_box

    lm = _wrapper("lochead", tiny_qwen3, heads="all")
    inputs = _inputs(lm.processor)
    with torch.no_grad():
        out = lm.model.generate(**inputs, max_new_tokens=24, do_sample=False)
    text = lm.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    box = parse_box(text)
    assert box is not None and all(0 <= v <= 1 for v in box), text


def test_float32_loading_without_remote_code(tiny_qwen3, monkeypatch):
    """dtype=float32 loads float32; lmms-eval's model-class lookup (a config read with trust_remote_code=True) is
    never called."""
    import lmms_eval.models.simple.qwen3_vl as module

    def remote(*a, **k):
        raise AssertionError("lmms-eval's _resolve_model_class (trust_remote_code=True) was called")

    monkeypatch.setattr(module, "_resolve_model_class", remote)
    lm = _wrapper("pai", tiny_qwen3, alpha=0.0, dtype="float32")
    assert lm._model.dtype == torch.float32 and module._resolve_model_class is remote
    with pytest.raises(ModelArgsError, match="dtype"):
        _wrapper("pai", tiny_qwen3, dtype="float64")


@pytest.mark.parametrize(
    "name,kw,reason",
    [
        ("paint", {}, "qwen3_vl_paint does not support qwen3_vl checkpoints.*Qwen3-VL vision tower.*has no CLS token"),
        ("viral", {}, "qwen3_vl_viral needs adapter=DIR"),
        ("pm", {"batch_size": 2, "refresh": "every_token"}, "batch_size=2 is not supported .*decodes token by token"),
    ],
)
def test_refusals_name_their_reason(tiny_qwen3, name, kw, reason):
    with pytest.raises(ModelArgsError, match=reason):
        _wrapper(name, tiny_qwen3, **kw)


def test_other_families_are_refused_with_where_they_go(tiny_qwen3, tiny_ckpt):
    with pytest.raises(ModelArgsError, match="dense Qwen3-VL checkpoint.*Qwen2.5-VL checkpoints go to the qwen2_5_vl"):
        _wrapper("pai", tiny_ckpt)
    from lmms_eval_plugins.models.pai import LlavaPaiChat

    with pytest.raises(ModelArgsError, match="Qwen3-VL checkpoints go to the qwen3_vl_\\* names"):
        LlavaPaiChat(pretrained=str(tiny_qwen3), device="cpu")


def test_every_family_fact_is_the_adapters():
    fam = families.adapter("qwen3_vl")
    assert fam.deepstack and fam.mrope and not fam.vision_cls and fam.lmms_eval_model == "qwen3_vl"
    assert not any(f.deepstack for t, f in families.ADAPTERS.items() if t != "qwen3_vl")


# ---------------------------------------------------------------------------------- loglikelihood


def test_loglikelihood_is_the_mean_continuation_loss_and_greedy_flag(tiny_qwen3):
    """lmms-eval's qwen3_vl raises NotImplementedError; ours (Qwen2.5-VL's, with qwen3_vl's image path) gives the
    mean NLL of the continuation (= transformers' label loss) and whether it is the greedy one."""
    lm = _wrapper("pai", tiny_qwen3, chat=False, alpha=0.0, use_cfg=False, dtype="float32")
    image = _image()
    lm.task_dict = {"t": {"test": [{"image": image}]}}
    context = "<image>is there a red square in the image?"
    prompt, _ = lm._encode_continuation(context.replace("<image>", ""), "x", [image])
    assert torch.equal(prompt["input_ids"], _inputs(lm.processor)["input_ids"])  # as generation builds it
    with torch.no_grad():
        out = lm._model.generate(**prompt, max_new_tokens=2, do_sample=False)
    greedy = lm.processor.decode(out[0, prompt["input_ids"].shape[1] :])
    requests = [SimpleNamespace(args=(context, c, lambda doc: [doc["image"]], 0, "t", "test")) for c in (greedy, " no")]
    scores = lm.score_continuations(requests)
    for (score, is_greedy), cont, want in zip(scores, (greedy, " no"), (True, False)):
        p, full = lm._encode_continuation(context.replace("<image>", ""), cont, [image])
        labels = full["input_ids"].clone()
        labels[:, : p["input_ids"].shape[1]] = -100
        with torch.no_grad():
            loss = lm._model(**full, labels=labels).loss
        assert score == pytest.approx(float(loss), rel=1e-5) and is_greedy is want, cont


# ---------------------------------------------------------------------------------- the real CLI


def test_cli_qwen3_vl_names(tiny_qwen3, tmp_path):
    """One lmms-eval process: stock qwen3_vl, the idle names (its answers), every working technique, the refused
    ones (their reason, no results), and first-token POPE through our loglikelihood (--force_simple)."""
    args = f"pretrained={tiny_qwen3},device=cpu,device_map=cpu,min_pixels={PIXELS['min_pixels']},max_pixels={PIXELS['max_pixels']}"
    runs = {
        "stock": ("qwen3_vl", "", "tiny_yesno"),
        "pai_idle": ("qwen3_vl_pai", ",alpha=0,use_cfg=false", "tiny_yesno"),
        "knockout_idle": ("qwen3_vl_knockout", ",from_layer=2,to_layer=2", "tiny_yesno"),
        "pai": ("qwen3_vl_pai", ",alpha=1.0,start_layer=0", "tiny_yesno"),
        "pai_cfg": ("qwen3_vl_pai", ",alpha=1.0,start_layer=0,use_cfg=true", "tiny_yesno"),
        "knockout": ("qwen3_vl_knockout", ",mode=both,window=after:1", "tiny_yesno"),
        "knockout_drop": ("qwen3_vl_knockout", ",mode=both,window=after:1,deepstack=drop", "tiny_yesno"),
        "pm": ("qwen3_vl_pm", ",max_iter=2", "tiny_yesno"),
        "reprompt": ("qwen3_vl_reprompt", ",keep_ratio=0.3", "tiny_yesno"),
        "lochead": ("qwen3_vl_lochead", ",heads=all", "tiny_rec"),
        "paint": ("qwen3_vl_paint", "", "tiny_yesno"),
        "viral": ("qwen3_vl_viral", "", "tiny_yesno"),
    }
    configs = [
        {
            "model": m,
            "model_args": args + extra,
            "tasks": task,
            "output_path": str(tmp_path / key),
            "include_path": str(TASKS),
        }
        for key, (m, extra, task) in runs.items()
    ]
    pope = "shapeworld_pope_random_first_token"
    # the chat class resizes a 336 px ShapeWorld image at qwen_vl_utils' defaults (not min/max_pixels) and the
    # processor does not resize again: PM's magnified image must be processed alike (Request.image_kwargs)
    configs.append(
        {
            "model": "qwen3_vl_pm",
            "model_args": args + ",max_iter=2",
            "tasks": "shapeworld_pope_random",
            "output_path": str(tmp_path / "pm_shapeworld"),
            "include_path": str(REPO / "task_configs"),
            "limit": 2,
        }
    )
    for key, extra in (("pope_idle", ",alpha=0,use_cfg=false"), ("pope_pm", "")):
        name = "qwen3_vl_pai" if key == "pope_idle" else "qwen3_vl_pm"
        configs.append(
            {
                "model": name,
                "model_args": args + extra,
                "tasks": pope,
                "output_path": str(tmp_path / key),
                "include_path": str(REPO / "task_configs"),
                "limit": 3,
                "force_simple": True,
            }
        )
    log = testing.run_lmms_eval_many(configs, tmp_path / "runs.yaml", cwd=REPO)
    samples = {key: testing.read_samples(tmp_path / key, task) for key, (_, _, task) in runs.items()}
    answers = [s["filtered_resps"] for s in samples["stock"]]
    assert testing.results_of(tmp_path / "stock") is not None and len(answers) == 3, log[-3000:]
    for key in ("pai_idle", "knockout_idle"):
        assert [s["filtered_resps"] for s in samples[key]] == answers, key
    for key in ("pai", "pai_cfg", "knockout", "knockout_drop", "pm", "reprompt"):
        assert testing.results_of(tmp_path / key) is not None and len(samples[key]) == 3, (key, log[-3000:])
    rec = testing.results_of(tmp_path / "lochead")
    assert rec is not None and 0.0 <= rec["results"]["tiny_rec"]["refcoco_IoU,none"] <= 1.0, log[-3000:]
    assert testing.results_of(tmp_path / "paint") is None and "qwen3_vl_paint does not support qwen3_vl" in log
    assert testing.results_of(tmp_path / "viral") is None and "qwen3_vl_viral needs adapter=DIR" in log
    assert testing.results_of(tmp_path / "pm_shapeworld") is not None, log[-3000:]
    for key in ("pope_idle", "pope_pm"):
        res = testing.results_of(tmp_path / key)
        assert res is not None, (key, log[-3000:])
        assert (
            0.0 <= res["results"][pope]["pope_accuracy,none"] <= 1.0
            and len(testing.read_samples(tmp_path / key, pope)) == 3
        )


def test_bench_context_qwen3_vl(tmp_path, monkeypatch):
    """`lmms-plugins bench --family qwen3_vl`: Qwen3-VL's geometry (448x336 -> 448x320: a 10x14 merged grid), its own names
    benched but PAINT (refused), idle hooks = the plain model."""
    from lmms_eval_plugins.commands import bench

    monkeypatch.setenv("LMMS_PLUGINS_CACHE", str(tmp_path))
    ctx = bench.make_context(layers=3, new_tokens=2, hidden=64, family="qwen3_vl")
    assert ctx.request.geometry.base.grid_hw == (10, 14) and ctx.request.image_pos.numel() == 140
    cases = bench.all_cases(ctx)
    names = {k.split(":")[0].split(" ")[0] for k in cases if k.startswith("qwen3_vl_")}
    assert names >= {"qwen3_vl_pai", "qwen3_vl_lochead", "qwen3_vl_knockout", "qwen3_vl_reprompt", "qwen3_vl_pm"}
    assert "qwen3_vl_paint" not in names
    with torch.no_grad():
        assert torch.equal(cases["hooks idle (generate)"][0](), bench.baselines(ctx)["generate"]())


def test_viral_aligns_the_merged_grid_and_qwen3_vl_viral_merges_the_adapter(tiny_qwen3, stock, tmp_path):
    """viral-train on Qwen3-VL: the aligned tokens are the merged image tokens on their rows x cols grid, the merger
    is trained next to LoRA, and qwen3_vl_viral merges the adapter (a change from stock)."""

    from test_viral import _save_tiny_dinov2, assert_two_finite_steps, two_step_config
    from transformers import AutoConfig

    from methods import viral
    from methods.conversation_data import ConversationDataset, collate
    from methods.viral_train import train

    records = [
        {
            "image": _resized(size),
            "conversations": [
                {"from": "human", "value": "<image>\nis there a red square in the image?"},
                {"from": "gpt", "value": "yes"},
            ],
        }
        for size in ((100, 37), (37, 100), (48, 40), (64, 64))
    ]
    processor = _processor(tiny_qwen3)
    data = ConversationDataset(records[:2], processor)
    batch = collate([data[0], data[1]], processor.tokenizer.pad_token_id)
    config = AutoConfig.from_pretrained(tiny_qwen3)
    for row, thw, aligned in zip(batch["input_ids"], batch["image_grid_thw"], viral.aligned_tokens(config, batch)):
        pads = (row == config.image_token_id).nonzero().flatten()
        assert torch.equal(aligned.positions, pads) and aligned.grid == (int(thw[1]) // 2, int(thw[2]) // 2)
    cfg = two_step_config(tiny_qwen3, tmp_path / "run", _save_tiny_dinov2(tmp_path / "teacher"), 3)
    train(cfg, records)
    assert_two_finite_steps(tmp_path / "run", "merger")
    lm = _wrapper("viral", tiny_qwen3, adapter=str(tmp_path / "run"))
    with torch.no_grad():
        assert not torch.equal(lm.model(**_inputs(lm.processor)).logits, stock[2])


def test_heads_discovery_reads_the_merged_grid_and_matches_an_eager_forward(tiny_qwen3):
    """discover-heads on Qwen3-VL: each sample's maps over its rows x cols merged grid equal a stock eager
    forward's attention (DeepStack is the model's own forward there), and so does the ranking."""
    from test_lochead_families import _check_against_eager

    seen = _check_against_eager(tiny_qwen3)
    assert len({g for _, g in seen}) == 3 and any(r != c for _, (r, c) in seen)


def test_pm_reprocesses_the_magnified_image_as_the_class_processed_the_prompt(qwen3):
    """lmms-eval's qwen3_vl calls the processor with do_resize=False on an image qwen_vl_utils already resized (the
    chat class at qwen_vl_utils' own bounds, not min/max_pixels): PM's magnified image goes through the processor
    with the same options (Request.image_kwargs), so it keeps the prompt's grid; without them the processor's
    saved bounds would resize it and PM refuses the request."""
    import dataclasses

    from methods.technique import RequestError

    model, processor, _, _, _ = qwen3
    big = Image.new("RGB", (320, 320), (30, 30, 200))  # 102400 px: above the tiny processor's max_pixels (25600)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "is there a red square?"}]}]
    prompt = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    inputs = dict(processor(text=[prompt], images=[big], do_resize=False, return_tensors="pt"))
    req = dataclasses.replace(_request(model, processor, inputs, big), image_kwargs={"do_resize": False})
    assert [int(v) for v in inputs["image_grid_thw"][0]] == [1, 20, 20]
    assert torch.equal(pm_view.pixels(req, big), inputs["pixel_values"])
    with pytest.raises(RequestError, match="processes to image_grid_thw"):
        pm_view.pixels(dataclasses.replace(req, image_kwargs={}), big)


def test_knockout_sweep_loads_the_checkpoint_familys_class_and_keeps_the_deepstack_choice(tiny_qwen3, monkeypatch):
    """`lmms-plugins knockout-sweep` on a Qwen3-VL checkpoint: qwen3_vl_knockout's class (not llava_knockout's),
    and every swept window keeps deepstack=drop."""
    import lmms_eval.evaluator

    from lmms_eval_plugins.commands import knockout_sweep
    from lmms_eval_plugins.models.qwen3_vl import Qwen3VlKnockoutChat

    seen = []

    def fake_evaluate(model, tasks, **kwargs):
        seen.append((type(model), model.technique.injection, list(model.technique.layers)))
        return {"results": {t: {"exact,none": 0.5} for t in tasks}}

    monkeypatch.setattr(lmms_eval.evaluator, "simple_evaluate", fake_evaluate)
    monkeypatch.chdir(REPO)
    args = f"pretrained={tiny_qwen3},device=cpu,min_pixels={PIXELS['min_pixels']},max_pixels={PIXELS['max_pixels']}"
    knockout_sweep.run_sweep(args + ",deepstack=drop", ["tiny_yesno"], [(0, 2)], ["both"], include_path="tests/tasks")
    assert seen == [(Qwen3VlKnockoutChat, "drop", []), (Qwen3VlKnockoutChat, "drop", [0, 1])]
