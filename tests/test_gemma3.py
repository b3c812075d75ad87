"""The gemma3_* wrappers on a tiny random Gemma 3 built here (a SigLIP tower pooled to a 4x4 grid, a
language model alternating sliding-window and global layers, bidirectional attention among image
tokens).

In process: the geometry matches the processor's tokens, the hook layer is bit-identical while idle
and keeps both of Gemma 3's masks (the sliding window, the image's bidirectional block), idle wrappers
equal lmms-eval's own gemma3, edits land where the geometry says, refusals name their reason. Through
the real lmms-eval CLI: stock gemma3 and the idle names answer alike, the working names answer every
document, the refused ones fail with their reason and write no results."""

import pytest
import torch
from conftest import REPO, TASKS
from PIL import Image

from lmms_eval_plugins import testing
from methods import hooks
from methods.families import image_geometry
from methods.params import ModelArgsError

SIZE = (100, 37)


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    return testing.build_tiny_gemma3(tmp_path_factory.mktemp("tiny_gemma3"))


def _image(size=SIZE):
    img = Image.new("RGB", size, (30, 30, 200))
    img.paste((220, 40, 40), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return img


def _inputs(processor, size=SIZE, text="is there a red square in the image ? answer using a single word"):
    """As lmms-eval's gemma3 builds a request: system message first, the image in the user turn."""
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
        {"role": "user", "content": [{"type": "image", "image": _image(size)}, {"type": "text", "text": text}]},
    ]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def _model(ckpt):
    from transformers import Gemma3ForConditionalGeneration

    return Gemma3ForConditionalGeneration.from_pretrained(ckpt).eval()


def _processor(ckpt):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(ckpt)


# ---------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("size", [(48, 40), (100, 37), (37, 100), (64, 64), (500, 120)])
def test_geometry_matches_the_processor(tiny_gemma3, size):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_gemma3)
    processor = _processor(tiny_gemma3)
    inputs = _inputs(processor, size)
    geo = image_geometry(config, processor, size, inputs["input_ids"])
    (block,) = geo.blocks
    assert (block.rows, block.cols) == (4, 4) and block.region == (0.0, 0.0, 1.0, 1.0)
    soft = (inputs["input_ids"][0] == config.image_token_id).nonzero().flatten()
    assert torch.equal(geo.all_positions(), soft)
    assert torch.equal(inputs["token_type_ids"][0].nonzero().flatten(), soft)  # what the LM's image mask reads


# ---------------------------------------------------------------------------------- hook layer and masks


@pytest.fixture(scope="module")
def hooked(tiny_gemma3):
    model = _model(tiny_gemma3)
    inputs = _inputs(_processor(tiny_gemma3))
    with torch.no_grad():
        plain = model(**inputs).logits
    hooks.install(model)
    return model, inputs, plain


def test_hook_layer_finds_both_towers_and_is_bit_identical_while_idle(hooked):
    model, inputs, plain = hooked
    mods = hooks.attention_modules(model)
    assert len(mods["lm"]) == 4 and len(mods["vision"]) == 2
    with torch.no_grad():
        with hooks.edited(model, hooks.Capture(layers=[0, 1], keys=slice(None))):  # observation only
            observed = model(**inputs).logits
        idle = model(**inputs).logits
    assert torch.equal(plain, idle) and torch.equal(plain, observed)


def test_edits_keep_the_sliding_window_and_the_bidirectional_image_block(hooked):
    """Layer 0 slides (24 keys), layer 1 is global. The last row of a sliding layer gives no weight
    outside its window; an image token's row weighs later image tokens (the model's own bidirectional
    mask, not a causal one); a boost of every image key on every layer stays finite (a masked key
    stays masked: no -inf + inf)."""
    model, inputs, plain = hooked
    ids = inputs["input_ids"][0]
    n = ids.shape[0]
    image = (ids == model.config.image_token_id).nonzero().flatten()
    window = model.config.text_config.sliding_window
    assert model.config.text_config.layer_types[:2] == ["sliding_attention", "full_attention"]
    assert n - window > int(image[0])  # the window cuts the image for the last row
    last = hooks.Capture(layers=[0, 1], rows=hooks.Rows.last(), keys=slice(None))
    first_image_row = hooks.Capture(
        layers=[0, 1], rows=hooks.Rows.span(int(image[0]), int(image[0]) + 1), keys=slice(None)
    )
    boost = hooks.Boost(layers=[0, 1, 2, 3], rows=hooks.Rows.last(), keys=image, alpha=1.0)
    with torch.no_grad(), hooks.edited(model, last, first_image_row, boost):
        boosted = model(**inputs).logits
    sliding, full = last.latest()[0][0, :, 0], last.latest()[1][0, :, 0]
    assert float(sliding[:, : n - window].abs().max()) == 0.0  # outside the window: nothing
    assert float(full[:, : n - window].sum(-1).min()) > 0.0  # a global layer sees them
    later = image[1:]
    for layer in (0, 1):
        assert float(first_image_row.latest()[layer][0, :, 0, later].sum(-1).min()) > 0.01
    assert torch.isfinite(boosted).all() and not torch.equal(boosted, plain)


# ---------------------------------------------------------------------------------- wrappers


@pytest.fixture(scope="module")
def stock(tiny_gemma3):
    """lmms-eval's own gemma3 on the checkpoint: its answer and logits for one request."""
    from lmms_eval.models.simple.gemma3 import Gemma3

    lm = Gemma3(pretrained=str(tiny_gemma3), device="cpu", device_map="cpu", trust_remote_code=False)
    inputs = _inputs(lm.processor)
    with torch.no_grad():
        answer = lm.model.generate(**inputs, max_new_tokens=6, do_sample=False)
        logits = lm.model(**inputs).logits
    return inputs, answer, logits


def _wrapper(name, ckpt, **kw):
    from lmms_eval_plugins.models import gemma3

    cls = getattr(gemma3, "Gemma3" + name.capitalize())
    return cls(pretrained=str(ckpt), device="cpu", **kw)


def _edits(lm, inputs):
    from lmms_eval_plugins.base import family_request

    req = family_request(lm._model, lm.processor, dict(inputs))
    req.require_one_image("test")
    return req, lm.technique.recipe(lm._model, req)


IDLE = {
    "pai": {"alpha": 0.0, "use_cfg": False},
    "knockout": {"from_layer": 2, "to_layer": 2},
}


@pytest.mark.parametrize("name", sorted(IDLE))
def test_idle_wrappers_equal_stock_gemma3(tiny_gemma3, stock, name):
    lm = _wrapper(name, tiny_gemma3, **IDLE[name])
    inputs = _inputs(lm.processor)  # through the RecordingProcessor's chat-template path
    assert torch.equal(inputs["input_ids"], stock[0]["input_ids"])
    assert torch.equal(inputs["pixel_values"], stock[0]["pixel_values"])
    assert lm.processor.last_images[0].size == SIZE and "<start_of_image>" in lm.processor.last_text
    with torch.no_grad():
        answer = lm.model.generate(**inputs, max_new_tokens=6, do_sample=False)
        logits = lm.model(**inputs).logits
    assert torch.equal(answer, stock[1]) and torch.equal(logits, stock[2])
    assert lm._model.dtype == torch.bfloat16  # as lmms-eval's class loads it


def test_pai_boosts_the_grid_on_the_answer_rows(tiny_gemma3, stock):
    lm = _wrapper("pai", tiny_gemma3, alpha=1.0, start_layer=0, use_cfg=False)
    inputs = _inputs(lm.processor)
    req, (boost,) = _edits(lm, inputs)
    assert req.geometry.base.grid_hw == (4, 4)
    assert torch.equal(boost.keys.cpu(), req.image_pos.cpu())  # the 16 soft tokens, not boi/eoi
    assert boost.rows.start == req.prompt_len - 1
    with torch.no_grad():
        out = lm.model(**inputs).logits
    assert torch.isfinite(out).all() and not torch.equal(out, stock[2])


def test_knockout_blocks_the_image_keys(tiny_gemma3, stock):
    lm = _wrapper("knockout", tiny_gemma3, mode="both")
    inputs = _inputs(lm.processor)
    req, (block,) = _edits(lm, inputs)
    assert torch.equal(block.keys.cpu(), req.geometry.all_positions())
    with torch.no_grad():
        out = lm.model(**inputs).logits
    assert torch.isfinite(out).all() and not torch.equal(out, stock[2])


def test_lochead_box_from_the_grid(tiny_gemma3):
    from methods.lochead import parse_box

    lm = _wrapper("lochead", tiny_gemma3, heads="all")
    inputs = _inputs(lm.processor)
    with torch.no_grad():
        out = lm.model.generate(**inputs, max_new_tokens=24, do_sample=False)
    text = lm.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    box = parse_box(text)
    assert box is not None and all(0 <= v <= 1 for v in box) and box[0] <= box[2] and box[1] <= box[3], text
    req = _edits(lm, inputs)[0]
    located = lm.technique.locate(lm._model, req, **inputs)
    assert located.head_maps.shape[1:] == (4, 4)


def test_float32_loading_and_remote_code_off(tiny_gemma3):
    lm = _wrapper("pai", tiny_gemma3, alpha=0.0, dtype="float32")
    assert lm._model.dtype == torch.float32
    with pytest.raises(ModelArgsError, match="dtype"):
        _wrapper("pai", tiny_gemma3, dtype="float64")


@pytest.mark.parametrize(
    "name,kw,reason",
    [
        ("paint", {}, "gemma3_paint does not support gemma3 checkpoints.*SigLIP vision tower has no CLS token"),
        ("pm", {}, "gemma3_pm does not support gemma3 checkpoints.*both directions.*0.107"),
        ("viral", {}, "gemma3_viral needs adapter=DIR"),
    ],
)
def test_refusals_name_their_reason(tiny_gemma3, name, kw, reason):
    with pytest.raises(ModelArgsError, match=reason):
        _wrapper(name, tiny_gemma3, **kw)


def test_pm_refusal_is_measured(hooked):
    """The number in PM's refusal: a causal-only pass of the language model against the model's forward."""
    from transformers import DynamicCache

    from methods import families

    model, inputs, plain = hooked
    with torch.no_grad():
        emb = families.adapter(model.config).embed_image(model, inputs["input_ids"], inputs["pixel_values"], {})
        causal = model.model.language_model(
            inputs_embeds=emb, use_cache=True, cache=DynamicCache(config=model.config.text_config)
        ).last_hidden_state
        diff = (model.lm_head(causal) - plain).abs().max()
    assert 0.05 < float(diff) < 0.2  # 0.107 on this checkpoint: far above float noise


def test_other_families_are_refused_with_where_they_go(tiny_gemma3, tiny_ckpt):
    with pytest.raises(ModelArgsError, match="Gemma 3 image-text checkpoint.*LLaVA-1.5 / LLaVA-NeXT"):
        _wrapper("pai", tiny_ckpt)
    from lmms_eval_plugins.models.pai import LlavaPaiChat

    with pytest.raises(ModelArgsError, match="'gemma3' checkpoint.*Gemma 3 checkpoints go to the gemma3_\\* names"):
        LlavaPaiChat(pretrained=str(tiny_gemma3), device="cpu")


def test_compressed_context_equals_the_blocked_full_forward(hooked, tiny_gemma3):
    """Re-prompting from a compressed cache on a model with sliding-window layers: the prefill keeps every
    entry (``kv_cache.full_cache``: a sliding layer's own cache would keep only its window), and the
    suffix's logits equal a full forward with the dropped image keys blocked for the suffix rows (the
    window of 24 keys reaches back into the prompt, so it is exercised)."""
    from methods.kv_cache import cache_of, full_cache, with_cache
    from methods.reprompt import Reprompt
    from methods.reprompt_context import forward_from
    from methods.technique import Request

    model, in1, _ = hooked
    in2 = _inputs(_processor(tiny_gemma3), text="is there a blue circle ? answer using a single word")
    req = Request(
        input_ids=in1["input_ids"],
        image_token_id=model.config.image_token_id,
        prompt_len=in1["input_ids"].shape[1],
        config=model.config,
    )
    tech = Reprompt(4, mode="compressed", keep_ratio=0.25, keep_query=True)
    kept = tech.kept_image_tokens(model, req, in1)[None]
    with torch.no_grad():
        out = model(**in1, use_cache=True, **with_cache(full_cache()))
    ctx = tech.build_context(model, req, cache_of(out), kept, req.prompt_len)
    pos = req.image_pos
    prefix, suffix = in1["input_ids"], in2["input_ids"][:, int(pos[-1]) + 1 :]
    seq = torch.cat([prefix, suffix], dim=1)
    assert suffix.shape[1] + (prefix.shape[1] - int(pos[0])) > model.config.text_config.sliding_window
    dropped = pos[[i for i in range(pos.numel()) if i not in set(kept.tolist())]]
    block = hooks.Block(layers=range(4), rows=hooks.Rows.span(prefix.shape[1]), keys=dropped)
    with torch.no_grad():
        got = forward_from(model, ctx, suffix).logits
        with hooks.edited(model, block):
            want = model(
                input_ids=seq,
                pixel_values=in1["pixel_values"],
                token_type_ids=(seq == model.config.image_token_id).long(),
            ).logits[:, prefix.shape[1] :]
    assert (got - want).abs().max() < 2e-5


def test_viral_aligns_the_grid_and_gemma3_viral_merges_the_adapter(tiny_gemma3, stock, tmp_path):
    """viral-train on Gemma 3: the aligned tokens are the 16 soft tokens on their 4x4 grid (the whole image),
    the projector trained next to LoRA is multi_modal_projector, and gemma3_viral merges the adapter."""

    from test_viral import _save_tiny_dinov2, assert_two_finite_steps, two_step_config

    from methods import viral
    from methods.conversation_data import ConversationDataset, collate
    from methods.viral_train import train

    records = [
        {
            "image": _image(size),
            "conversations": [
                {"from": "human", "value": "<image>\nis there a red square in the image?"},
                {"from": "gpt", "value": "yes"},
            ],
        }
        for size in ((100, 37), (37, 100), (48, 40), (64, 64))
    ]
    processor = _processor(tiny_gemma3)
    data = ConversationDataset(records[:2], processor)
    batch = collate([data[0], data[1]], processor.tokenizer.pad_token_id)
    assert "token_type_ids" in batch  # Gemma 3's image mask travels with the training batch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_gemma3)
    for row, aligned in zip(batch["input_ids"], viral.aligned_tokens(config, batch)):
        soft = (row == config.image_token_id).nonzero().flatten()
        assert torch.equal(aligned.positions, soft) and aligned.grid == (4, 4) and aligned.whole_image
    cfg = two_step_config(tiny_gemma3, tmp_path / "run", _save_tiny_dinov2(tmp_path / "teacher"), 2)
    train(cfg, records)
    assert_two_finite_steps(tmp_path / "run", "multi_modal_projector")
    lm = _wrapper("viral", tiny_gemma3, adapter=str(tmp_path / "run"))
    with torch.no_grad():
        assert not torch.equal(lm.model(**_inputs(lm.processor)).logits, stock[2])


def test_bench_context_gemma3(tmp_path, monkeypatch):
    """`lmms-plugins bench --family gemma3`: Gemma 3's geometry (896 px, 256 tokens on a 16x16 grid), its own
    names benched but the refused ones (PAINT, PM), idle hooks = the plain model."""
    from lmms_eval_plugins.commands import bench

    monkeypatch.setenv("LMMS_PLUGINS_CACHE", str(tmp_path))
    ctx = bench.make_context(layers=4, new_tokens=2, hidden=64, family="gemma3")
    assert ctx.request.geometry.base.grid_hw == (16, 16) and ctx.request.image_pos.numel() == 256
    cases = bench.all_cases(ctx)
    names = {k.split(":")[0].split(" ")[0] for k in cases if k.startswith("gemma3_")}
    assert names == {"gemma3_pai", "gemma3_lochead", "gemma3_knockout", "gemma3_reprompt"}
    with torch.no_grad():
        assert torch.equal(cases["hooks idle (generate)"][0](), bench.baselines(ctx)["generate"]())


# ---------------------------------------------------------------------------------- the real CLI


def test_cli_gemma3_names(tiny_gemma3, tmp_path):
    """One lmms-eval process: stock gemma3, the idle names (same answers), the active ones, the refused ones."""
    args = f"pretrained={tiny_gemma3},device=cpu,device_map=cpu"
    runs = {
        "stock": ("gemma3", "", "tiny_yesno"),
        "pai_idle": ("gemma3_pai", ",alpha=0,use_cfg=false", "tiny_yesno"),
        "knockout_idle": ("gemma3_knockout", ",from_layer=2,to_layer=2", "tiny_yesno"),
        "pai": ("gemma3_pai", ",alpha=1.0,start_layer=0", "tiny_yesno"),
        "knockout": ("gemma3_knockout", ",mode=both", "tiny_yesno"),
        "reprompt": ("gemma3_reprompt", ",keep_ratio=0.25", "tiny_yesno"),
        "lochead": ("gemma3_lochead", ",heads=all", "tiny_rec"),
        "paint": ("gemma3_paint", "", "tiny_yesno"),
        "pm": ("gemma3_pm", "", "tiny_yesno"),
    }
    log = testing.run_lmms_eval_many(
        [
            {
                "model": m,
                "model_args": args + extra,
                "tasks": task,
                "output_path": str(tmp_path / key),
                "include_path": str(TASKS),
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
    for key in ("pai", "knockout", "reprompt"):
        assert testing.results_of(tmp_path / key) is not None and len(samples[key]) == 3, (key, log[-3000:])
    rec = testing.results_of(tmp_path / "lochead")
    assert rec is not None and 0.0 <= rec["results"]["tiny_rec"]["refcoco_IoU,none"] <= 1.0, log[-3000:]
    assert all(str(s["filtered_resps"]).count(",") >= 3 for s in samples["lochead"])
    for key in ("paint", "pm"):
        assert testing.results_of(tmp_path / key) is None and f"gemma3_{key} does not support gemma3" in log, key


# ---------------------------------------------------------------------------------- loglikelihood


def _ll_request(context, target, image):
    from types import SimpleNamespace

    return SimpleNamespace(args=(context, target, lambda doc: [doc["image"]], 0, "t", "test"))


def test_loglikelihood_is_the_mean_continuation_loss_and_greedy_flag(tiny_gemma3):
    """lmms-eval's gemma3 has no loglikelihood; ours gives llava_hf's (mean NLL of the continuation, greedy)
    pair: the loss equals transformers' own label loss of the same sequence, and is_greedy is true exactly
    for the model's own greedy continuation."""
    lm = _wrapper("pai", tiny_gemma3, alpha=0.0, use_cfg=False, dtype="float32")
    image = _image()
    lm.task_dict = {"t": {"test": [{"image": image}]}}
    context = "<image>is there a red square in the image ?"
    prompt, _ = lm._encode_continuation(context.replace("<image>", ""), "x", [image])
    with torch.no_grad():
        out = lm._model.generate(**prompt, max_new_tokens=3, do_sample=False)
    greedy = lm.processor.decode(out[0, prompt["input_ids"].shape[1] :])
    scores = lm.score_continuations([_ll_request(context, greedy, image), _ll_request(context, "no", image)])
    for (score, is_greedy), cont, want_greedy in zip(scores, (greedy, "no"), (True, False)):
        p, full = lm._encode_continuation(context.replace("<image>", ""), cont, [image])
        labels = full["input_ids"].clone()
        labels[:, : p["input_ids"].shape[1]] = -100
        with torch.no_grad():
            loss = lm._model(**full, labels=labels).loss
        assert score == pytest.approx(float(loss), rel=1e-5) and is_greedy is want_greedy, cont
