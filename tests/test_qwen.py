"""The qwen2_5_vl_* wrappers on a tiny random Qwen2.5-VL built here (non-square images, windowed
vision attention, M-RoPE).

In process: the geometry matches the processor's token counts, the hook layer is bit-identical
while idle, idle wrappers equal lmms-eval's own qwen2_5_vl, edits land where the geometry says,
refusals name their reason. Through the real lmms-eval CLI: stock qwen2_5_vl and every working
name answer every document; a refused name fails with its reason and writes no results."""

import dataclasses
import json

import pytest
import torch
from conftest import REPO, TASKS
from PIL import Image

from lmms_eval_plugins import testing
from methods.params import ModelArgsError
from methods import hooks
from methods.families import image_geometry

PIXELS = {"min_pixels": 12544, "max_pixels": 20000}  # a 48x40 image -> 112x140 -> 4x5 merged grid
SIZE = (100, 37)


def build_tiny_qwen(path, seed: int = 0):
    """A random Qwen2.5-VL (2 vision blocks with 4 attention windows, 4 LM layers with GQA) on the
    ShapeWorld word-level tokenizer and Qwen chat template; weights spread wider than the default
    init so greedy answers depend on the image."""
    from lmms_eval_plugins.shapeworld.qwen_model import QwenGeometry, build_model

    geo = dataclasses.replace(
        QwenGeometry(), image_size=112, vision_layers=2, text_layers=4, window_size=56, fullatt_blocks=(1,)
    )
    model, processor = build_model(seed=seed, geometry=geo)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    processor.image_processor.size = {"shortest_edge": PIXELS["min_pixels"], "longest_edge": PIXELS["max_pixels"]}
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    return build_tiny_qwen(tmp_path_factory.mktemp("tiny_qwen"))


def _image(size=SIZE):
    img = Image.new("RGB", size, (30, 30, 200))
    img.paste((220, 40, 40), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return img


def _inputs(processor, size=SIZE, text="is there a red square in the image?"):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "image", "image": "x"}, {"type": "text", "text": text}]},
    ]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=[prompt], images=[_image(size)], return_tensors="pt")


@pytest.fixture(scope="module")
def stock(tiny_qwen):
    """lmms-eval's own qwen2_5_vl (chat) on the checkpoint: its answer and logits for one request."""
    from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL

    lm = Qwen2_5_VL(pretrained=str(tiny_qwen), device="cpu", device_map="cpu", **PIXELS)
    inputs = _inputs(lm.processor)
    with torch.no_grad():
        answer = lm.model.generate(**inputs, max_new_tokens=6, do_sample=False)
        logits = lm.model(**inputs).logits
    return inputs, answer, logits


def _wrapper(name, ckpt, **kw):
    from lmms_eval_plugins.models import qwen2_5_vl

    cls = getattr(qwen2_5_vl, "Qwen25Vl" + name.capitalize() + "Chat")
    return cls(pretrained=str(ckpt), device="cpu", **{**PIXELS, **kw})


def _request(lm):
    return _inputs(lm.processor)  # through the RecordingProcessor: the wrapper sees the image


def _edits(lm, inputs):
    from lmms_eval_plugins.base import family_request

    req = family_request(lm._model, lm.processor, dict(inputs))
    req.require_one_image("test")
    return req, lm.technique.recipe(lm._model, req)


# ---------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("size", [(48, 40), (100, 37), (37, 100), (336, 224), (64, 64), (500, 120), (30, 200)])
def test_geometry_matches_the_processor(tiny_qwen, size):
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(tiny_qwen)
    processor = AutoProcessor.from_pretrained(tiny_qwen)
    inputs = _inputs(processor, size)
    thw = inputs["image_grid_thw"]
    geo = image_geometry(config, processor, size, inputs["input_ids"], {"image_grid_thw": thw})
    (block,) = geo.blocks
    assert (block.rows, block.cols) == (int(thw[0, 1]) // 2, int(thw[0, 2]) // 2)
    assert torch.equal(geo.all_positions(), (inputs["input_ids"][0] == config.image_token_id).nonzero().flatten())
    # without image_grid_thw: the processor's own smart_resize arithmetic gives the same grid
    again = image_geometry(config, processor, size, inputs["input_ids"])
    assert again.blocks[0].grid_hw == block.grid_hw


def test_non_square_grid(tiny_qwen):
    from transformers import AutoConfig, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_qwen)
    inputs = _inputs(processor)
    geo = image_geometry(AutoConfig.from_pretrained(tiny_qwen), processor, SIZE, inputs["input_ids"], dict(inputs))
    assert geo.base.rows != geo.base.cols


# ---------------------------------------------------------------------------------- hook layer


def test_hook_layer_finds_both_towers_and_is_bit_identical_while_idle(tiny_qwen):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen, attn_implementation="sdpa").eval()
    inputs = _inputs(AutoProcessor.from_pretrained(tiny_qwen))
    with torch.no_grad():
        plain = model(**inputs).logits
        hooks.install(model)
        mods = hooks.attention_modules(model)
        assert len(mods["lm"]) == 4 and len(mods["vision"]) == 2
        with hooks.edited(model, hooks.Capture(layers=[0], keys=slice(None))):  # observation only
            observed = model(**inputs).logits
        idle = model(**inputs).logits
    assert torch.equal(plain, idle) and torch.equal(plain, observed)


# ---------------------------------------------------------------------------------- wrappers

IDLE = {
    "pai": {"alpha": 0.0, "use_cfg": False},
    "knockout": {"from_layer": 2, "to_layer": 2},
}


@pytest.mark.parametrize("name", sorted(IDLE))
def test_idle_wrappers_equal_stock_qwen2_5_vl(tiny_qwen, stock, name):
    lm = _wrapper(name, tiny_qwen, **IDLE[name])
    inputs = _request(lm)
    assert torch.equal(inputs["input_ids"], stock[0]["input_ids"]) and torch.equal(
        inputs["pixel_values"], stock[0]["pixel_values"]
    )
    with torch.no_grad():
        answer = lm.model.generate(**inputs, max_new_tokens=6, do_sample=False)
        logits = lm.model(**inputs).logits
    assert torch.equal(answer, stock[1]) and torch.equal(logits, stock[2])
    assert lm._model.dtype == torch.bfloat16  # as lmms-eval's class loads it


def test_pai_boosts_the_merged_grid_on_the_answer_rows(tiny_qwen, stock):
    lm = _wrapper("pai", tiny_qwen, alpha=1.0, start_layer=0, use_cfg=False)
    inputs = _request(lm)
    req, (boost,) = _edits(lm, inputs)
    block = req.geometry.base
    assert block.rows * block.cols == int(inputs["image_grid_thw"][0, 1:].prod()) // 4
    assert torch.equal(boost.keys.cpu(), req.image_pos.cpu())  # every image token, nothing else
    assert boost.rows.start == req.prompt_len - 1
    with torch.no_grad():
        assert not torch.equal(lm.model(**inputs).logits, stock[2])


def test_knockout_blocks_the_image_keys(tiny_qwen, stock):
    lm = _wrapper("knockout", tiny_qwen, mode="both")
    inputs = _request(lm)
    req, (block,) = _edits(lm, inputs)
    assert torch.equal(block.keys.cpu(), req.geometry.all_positions())
    with torch.no_grad():
        assert not torch.equal(lm.model(**inputs).logits, stock[2])


def test_lochead_box_from_the_non_square_grid(tiny_qwen):
    from methods.lochead import parse_box

    lm = _wrapper("lochead", tiny_qwen, heads="all")
    inputs = _request(lm)
    with torch.no_grad():
        out = lm.model.generate(**inputs, max_new_tokens=24, do_sample=False)
    text = lm.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    box = parse_box(text)
    assert box is not None and all(0 <= v <= 1 for v in box) and box[0] <= box[2] and box[1] <= box[3], text
    located = lm.technique.locate(lm._model, _edits(lm, inputs)[0], **inputs)
    req = _edits(lm, inputs)[0]
    assert located.head_maps.shape[1:] == req.geometry.base.grid_hw


def test_float32_loading(tiny_qwen, stock):
    lm = _wrapper("pai", tiny_qwen, alpha=0.0, dtype="float32")
    assert lm._model.dtype == torch.float32
    with pytest.raises(ModelArgsError, match="dtype"):
        _wrapper("pai", tiny_qwen, dtype="float64")


@pytest.mark.parametrize(
    "name,kw,reason",
    [
        ("paint", {}, "no CLS token"),
        ("viral", {}, "qwen2_5_vl_viral needs adapter=DIR"),
        ("pm", {"batch_size": 2, "refresh": "every_token"}, "batch_size=2 is not supported .*refresh=every_token"),
    ],
)
def test_refusals_name_their_reason(tiny_qwen, name, kw, reason):
    with pytest.raises(ModelArgsError, match=reason):
        _wrapper(name, tiny_qwen, **kw)


def test_llava_checkpoints_are_refused(tiny_ckpt):
    with pytest.raises(ModelArgsError, match="Qwen2.5-VL checkpoint"):
        _wrapper("pai", tiny_ckpt)


# ---------------------------------------------------------------------------------- bench


def test_bench_context_qwen2_5_vl(tmp_path, monkeypatch):
    """`lmms-plugins bench --family qwen2_5_vl`: the 448x336 bench image keeps its size (24x32 patches,
    a 12x16 merged grid), only the working qwen2_5_vl_* names are benched, idle hooks = the plain model."""
    from lmms_eval_plugins.commands import bench

    monkeypatch.setenv("LMMS_PLUGINS_CACHE", str(tmp_path))
    ctx = bench.make_context(layers=4, new_tokens=4, hidden=64, family="qwen2_5_vl")
    assert ctx.inputs["image_grid_thw"].tolist() == [[1, 24, 32]]
    (block,) = ctx.request.geometry.blocks
    assert (block.rows, block.cols) == (12, 16) and ctx.request.image_pos.numel() == 192
    cases = bench.all_cases(ctx)
    names = {k.split(":")[0].split(" ")[0] for k in cases if k.startswith("qwen2_5_vl_")}
    assert names == {
        "qwen2_5_vl_pai",
        "qwen2_5_vl_lochead",
        "qwen2_5_vl_knockout",
        "qwen2_5_vl_pm",
        "qwen2_5_vl_reprompt",
    }
    assert not any(k.startswith("llava_") for k in cases)
    with torch.no_grad():
        assert torch.equal(cases["hooks idle (generate)"][0](), bench.baselines(ctx)["generate"]())


def test_bench_command_interleaves_each_case_with_its_baseline(tmp_path, monkeypatch):
    """The command's rows: one per selected case, its ratio against its own baseline kind, forward passes
    counted (PAI: one per generated token, like greedy generate), CPU time on one torch thread."""
    from types import SimpleNamespace

    from lmms_eval_plugins.commands import bench

    monkeypatch.setenv("LMMS_PLUGINS_CACHE", str(tmp_path))
    threads = torch.get_num_threads()
    args = SimpleNamespace(
        family="qwen2_5_vl",
        layers=4,
        hidden=64,
        new_tokens=3,
        repeats=2,
        only="hooks idle,qwen2_5_vl_pai",
        memory=False,
        markdown=str(tmp_path / "t.md"),
        json=str(tmp_path / "t.json"),
    )
    try:
        assert bench.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    rows = json.loads((tmp_path / "t.json").read_text())
    assert [r["case"] for r in rows] == ["hooks idle (generate)", "qwen2_5_vl_pai (no CFG)"]
    for r in rows:
        assert r["baseline"] == "generate" and r["passes"] == r["baseline_passes"] == 3
        assert r["latency_s"] > 0 and r["latency_ratio"] > 0
    assert "interleaved rounds, CPU time, 1 thread" in (tmp_path / "t.md").read_text()


# ---------------------------------------------------------------------------------- the real CLI


def _cli(name, ckpt, out, task="tiny_yesno", extra=""):
    args = (
        f"pretrained={ckpt},device=cpu,device_map=cpu,min_pixels={PIXELS['min_pixels']},max_pixels={PIXELS['max_pixels']}"
        + extra
    )
    results, log = testing.run_lmms_eval(name, args, task, out, include_path=TASKS, cwd=REPO)
    return results, log, testing.read_samples(out, task)


def test_cli_every_working_name_answers_like_stock_when_idle(tiny_qwen, tmp_path):
    base, log, base_samples = _cli("qwen2_5_vl", tiny_qwen, tmp_path / "stock")
    assert base is not None, log[-3000:]
    answers = [s["filtered_resps"] for s in base_samples]
    assert len(answers) == 3 and any(a.strip() for a in map(str, answers))
    for name, extra in (
        ("qwen2_5_vl_pai", ",alpha=0,use_cfg=false"),
        ("qwen2_5_vl_knockout", ",from_layer=2,to_layer=2"),
    ):
        res, log, samples = _cli(name, tiny_qwen, tmp_path / name, extra=extra)
        assert res is not None, log[-3000:]
        assert res["results"]["tiny_yesno"]["exact,none"] == base["results"]["tiny_yesno"]["exact,none"], name
        assert [s["filtered_resps"] for s in samples] == answers, name


def test_cli_active_techniques_and_a_refusal(tiny_qwen, tmp_path):
    for name, extra in (("qwen2_5_vl_pai", ",alpha=1.0,start_layer=0"), ("qwen2_5_vl_knockout", ",mode=both")):
        res, log, samples = _cli(name, tiny_qwen, tmp_path / name, extra=extra)
        assert res is not None and len(samples) == 3, log[-3000:]
        assert 0.0 <= res["results"]["tiny_yesno"]["exact,none"] <= 1.0
    res, log, samples = _cli("qwen2_5_vl_lochead", tiny_qwen, tmp_path / "lochead", task="tiny_rec", extra=",heads=all")
    assert res is not None and len(samples) > 0, log[-3000:]
    assert 0.0 <= res["results"]["tiny_rec"]["refcoco_IoU,none"] <= 1.0
    assert all(s["filtered_resps"] and str(s["filtered_resps"]).count(",") >= 3 for s in samples)
    res, log, _ = _cli("qwen2_5_vl_paint", tiny_qwen, tmp_path / "paint")
    assert res is None and "qwen2_5_vl_paint does not support qwen2_5_vl checkpoints" in log and "no CLS token" in log


# ---------------------------------------------------------------------------------- loglikelihood


def test_loglikelihood_is_the_mean_continuation_loss_and_greedy_flag(tiny_qwen):
    """lmms-eval's qwen2_5_vl has no loglikelihood; ours gives llava_hf's (mean NLL of the continuation,
    greedy) pair, the prompt built as the class's generation builds it: the loss equals transformers' own
    label loss of the same sequence, and is_greedy is true exactly for the model's greedy continuation."""
    from types import SimpleNamespace

    from lmms_eval_plugins.models.qwen2_5_vl import Qwen25VlPai

    lm = Qwen25VlPai(pretrained=str(tiny_qwen), device="cpu", alpha=0.0, use_cfg=False, dtype="float32", **PIXELS)
    image = _image()
    lm.task_dict = {"t": {"test": [{"image": image}]}}
    context = "<image>is there a red square in the image?"
    prompt, _ = lm._encode_continuation("is there a red square in the image?", "x", [image])
    with torch.no_grad():
        out = lm._model.generate(**prompt, max_new_tokens=2, do_sample=False)
    greedy = lm.processor.decode(out[0, prompt["input_ids"].shape[1] :])
    requests = [SimpleNamespace(args=(context, c, lambda doc: [doc["image"]], 0, "t", "test")) for c in (greedy, " no")]
    for (score, is_greedy), cont, want in zip(lm.score_continuations(requests), (greedy, " no"), (True, False)):
        p, full = lm._encode_continuation("is there a red square in the image?", cont, [image])
        labels = full["input_ids"].clone()
        labels[:, : p["input_ids"].shape[1]] = -100
        with torch.no_grad():
            loss = lm._model(**full, labels=labels).loss
        assert score == pytest.approx(float(loss), rel=1e-5) and is_greedy is want, cont


def test_cli_first_token_pope_on_qwen_and_gemma3(tiny_qwen, tmp_path):
    """First-token POPE (a loglikelihood task) through the CLI on the two families whose lmms-eval classes
    have no loglikelihood: qwen2_5_vl_pai (--force_simple) and gemma3_pai, idle and active."""
    task = "shapeworld_pope_random_first_token"
    gemma = testing.build_tiny_gemma3(tmp_path / "gemma3")
    pixels = f",min_pixels={PIXELS['min_pixels']},max_pixels={PIXELS['max_pixels']}"
    for name, ckpt, extra in (
        ("qwen2_5_vl_pai", tiny_qwen, pixels + ",alpha=0,use_cfg=false"),
        ("qwen2_5_vl_pai", tiny_qwen, pixels + ",alpha=1.0,start_layer=0"),
        ("gemma3_pai", gemma, ",alpha=0,use_cfg=false"),
        ("gemma3_knockout", gemma, ",mode=both"),
    ):
        out = tmp_path / f"{name}{extra.count('alpha=0')}"
        res, log = testing.run_lmms_eval(
            name,
            f"pretrained={ckpt},device=cpu,device_map=cpu" + extra,
            task,
            out,
            include_path=REPO / "task_configs",
            extra=["--limit", "4", "--force_simple"],
            cwd=REPO,
        )
        assert res is not None, (name, log[-3000:])
        assert 0.0 <= res["results"][task]["pope_accuracy,none"] <= 1.0 and len(testing.read_samples(out, task)) == 4
