"""`lmms-plugins bench`: default layers adapted to the model's depth, the --shape preset's widths, and the
device path (--device/--dtype/--depth full) run on a CPU at a tiny width. Behaviour only: no timed assertions."""

import json
from types import SimpleNamespace

import pytest
import torch

from lmms_eval_plugins.commands import bench

TINY = ["text_hidden=64,text_heads=2,kv_heads=2,text_mlp=128", "vision_hidden=32,vision_heads=2,vision_mlp=64"]


def bench_args(tmp_path, **kw):
    args = dict(
        family="llava",
        shape=None,
        layers=None,
        vision_layers=None,
        depth="reduced",
        set=None,
        hidden=None,
        device="cpu",
        dtype="float32",
        new_tokens=2,
        repeats=1,
        only="",
        memory=False,
        batch=0,
        markdown=str(tmp_path / "t.md"),
        json=str(tmp_path / "t.json"),
    )
    return SimpleNamespace(**{**args, **kw})


def run_main(args):
    threads = torch.get_num_threads()
    try:
        assert bench.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(open(args.json).read()), open(args.markdown).read()


def test_fit_layer_keeps_layers_that_exist_and_scales_the_others():
    assert bench.fit_layer(2, 4, 32) == 2  # PAI's start layer exists in 4 layers: the default stays
    assert bench.fit_layer(2, 2, 32) == 0  # 2 of 32 -> 0 of 2
    assert bench.fit_layer(2, 1, 32) == 0
    assert bench.fit_layer(20, 8, 32) == 5  # the same relative depth, rounded down
    assert bench.fit_layer(-2, 24, 24) == -2  # CLIP's penultimate layer
    assert bench.fit_layer(-2, 2, 24) == -2
    assert bench.fit_layer(-2, 1, 24) == 0  # layer 22 of 24 on a 1-layer tower: its only layer
    assert bench.fit_layer(40, 3, 32) == 2  # clamped to the last layer


def test_bench_at_two_layers_adapts_the_default_layers(tmp_path, monkeypatch):
    """`lmms-plugins bench --layers 2`: PAI's and PAINT's start layer 2 does not exist; every case runs, with
    the adapted layers inside the model and printed."""
    from methods.pai import DEFAULTS as pai_defaults
    from methods.pai import Pai
    from methods.paint import DEFAULTS as paint_defaults
    from methods.paint import Paint

    monkeypatch.setenv("LMMS_PLUGINS_CACHE", str(tmp_path))
    ctx = bench.make_context(layers=2, new_tokens=2, hidden=64)
    with pytest.raises(ValueError, match="outside the model's 2"):
        Pai(2, use_cfg=False)  # the default itself: what the bench adapts
    assert ctx.fit_layers("pai", pai_defaults) == {"start_layer": 0}
    assert Pai(2, use_cfg=False, **ctx.fit_layers("pai", pai_defaults)).layers == range(0, 2)
    paint = Paint.for_model(ctx.model, **ctx.fit_layers("paint", paint_defaults))
    assert paint.layers == range(0, 2) and paint.vision_layers == (0, 1)  # 3 CLIP layers: -2 exists
    expected = list(bench.all_cases(ctx))

    rows, text = run_main(bench_args(tmp_path, layers=2, hidden=64))
    assert [r["case"] for r in rows] == expected
    assert any(r["case"].startswith("llava_pai") for r in rows) and any("llava_paint" in r["case"] for r in rows)
    assert all(r["latency_ratio"] > 0 and r["passes"] > 0 or "output_attentions" in r["case"] for r in rows)
    assert "default layers adapted to this depth: pai: start_layer 2 -> 0" in text
    assert "paint: start_layer 2 -> 0 (layer 2 of 32 scaled to 2 lm layers)" in text


def test_llava_15_7b_shape_has_the_7b_widths():
    """--shape llava-1.5-7b builds llava-hf/llava-1.5-7b-hf's config (random weights): the widths at full
    depth, the same widths at a reduced depth, --set overrides; ~7.06B parameters (counted on the meta device)."""
    from transformers import LlavaForConditionalGeneration

    full = bench.shape_config(bench.resolve_shape("llava-1.5-7b", depth="full"))
    text, vision = full.text_config, full.vision_config
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (4096, 32, 32)
    assert (text.intermediate_size, text.vocab_size, text.num_hidden_layers) == (11008, 32000, 32)
    assert (vision.hidden_size, vision.num_attention_heads, vision.intermediate_size) == (1024, 16, 4096)
    assert (vision.num_hidden_layers, vision.image_size, vision.patch_size) == (24, 336, 14)
    assert (vision.image_size // vision.patch_size) ** 2 == 576
    assert full.projector_hidden_act == "gelu" and full.vision_feature_layer == -2
    with torch.device("meta"):
        n = sum(p.numel() for p in LlavaForConditionalGeneration(full).parameters())
    assert 7.0e9 < n < 7.1e9

    reduced = bench.resolve_shape("llava-1.5-7b", layers=4)
    assert (reduced.text_layers, reduced.vision_layers, reduced.text_hidden, reduced.vision_hidden) == (
        4,
        2,
        4096,
        1024,
    )
    tiny = bench.resolve_shape("llava-1.5-7b", 2, 1, overrides=TINY[0].split(","))
    assert (tiny.text_hidden, tiny.text_heads, tiny.text_mlp, tiny.vision_hidden) == (64, 2, 128, 1024)
    assert bench.shape_tokenizer(32000).__len__() == 32000  # every id the random model can generate decodes
    with pytest.raises(ValueError, match="not a shape field"):
        bench.resolve_shape("llava-1.5-7b", overrides=["hidden=64"])


def test_shape_runs_every_case_at_a_tiny_width(tmp_path):
    """`bench --shape llava-1.5-7b --layers 2 --vision-layers 1` with tiny widths (--set): every case runs as a
    ratio against stock; a 1-layer CLIP tower adapts PAINT's penultimate layer."""
    args = bench_args(tmp_path, shape="llava-1.5-7b", layers=2, vision_layers=1, set=TINY)
    spec = bench.context_spec(args)
    ctx = bench.context_of(spec)
    cfg = ctx.model.config
    assert (cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers, cfg.vision_config.num_hidden_layers) == (
        64,
        2,
        1,
    )
    assert cfg.text_config.vocab_size == 32000 and ctx.request.image_pos.numel() == 576
    assert all(p.data_ptr() == q.data_ptr() for p, q in zip(ctx.model.parameters(), ctx.plain.parameters()))
    expected = list(bench.all_cases(ctx))
    with torch.no_grad():  # idle hooks on the shared weights = stock
        assert torch.equal(bench.core_cases(ctx)["hooks idle (generate)"][0](), bench.baselines(ctx)["generate"]())

    rows, text = run_main(args)
    assert [r["case"] for r in rows] == expected
    assert "LLaVA-1.5-7B-shaped random model (LM 2 of 32 layers: hidden 64" in text
    assert "paint: summary_layer -2 -> 0 (layer -2 of 24 scaled to 1 vision layers)" in text
    assert "| n/a |" in text and "peak memory: n/a" in text  # CPU without --memory


def test_device_path_full_depth_bf16_on_cpu(tmp_path):
    """The GPU command's path (`--depth full --dtype bfloat16 --device DEVICE`) on a CPU at a tiny width:
    latency per new token and the attention implementation reported; peak memory n/a without --memory."""
    args = bench_args(
        tmp_path,
        shape="llava-1.5-7b",
        depth="full",
        dtype="bfloat16",
        set=[*TINY, "text_layers=3,vision_layers=2"],  # --set after --depth full: a tiny depth for the test
        only="hooks idle,llava_pai (,pm_once,knockout_query",
    )
    rows, text = run_main(args)
    assert [r["case"] for r in rows] == [
        "hooks idle (generate)",
        "llava_pai (no CFG)",
        "llava_pm: pm_once",
        "llava_knockout: knockout_query_middle",
    ]
    for r in rows:
        assert r["ms_per_new_token"] > 0 and r["baseline_ms_per_new_token"] > 0
    assert "bfloat16 on cpu" in text and "attention: stock sdpa; techniques hooked_sdpa" in text
    assert "flash_attention_2: not used" in text


def test_cpu_peak_memory_of_a_shape_in_a_fresh_process(tmp_path):
    """--memory on a CPU: the fresh process rebuilds the same --shape model from the JSON spec."""
    spec = bench.context_spec(bench_args(tmp_path, shape="llava-1.5-7b", layers=1, vision_layers=1, set=TINY))
    assert isinstance(bench.peak_memory("baseline:forward", spec), int)


def test_shape_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="add --shape"):
        bench.context_spec(bench_args(tmp_path, vision_layers=2))
    with pytest.raises(ValueError, match="--set text_hidden"):
        bench.context_spec(bench_args(tmp_path, shape="llava-1.5-7b", hidden=64))
    with pytest.raises(ValueError, match="needs --family llava"):
        bench.context_spec(bench_args(tmp_path, shape="llava-1.5-7b", family="qwen2_5_vl"))
    full = bench.context_spec(bench_args(tmp_path, shape="llava-1.5-7b", depth="full"))
    assert (full["layers"], full["shape"]["vision_layers"], full["hidden"]) == (32, 24, 4096)


def test_bench_family_internvl_at_a_tiny_width(tmp_path, monkeypatch):
    """`lmms-plugins bench --family internvl`: InternVL's HF geometry (448 px tiles, pixel shuffle: a 448x336 image
    = 4x3 tiles + the thumbnail, 13 x 256 = 3328 image tokens), its own internvl_hf_* names benched but PAINT
    (refused), idle hooks = the plain model, and the command's rows against the family's baseline."""
    monkeypatch.setenv("LMMS_PLUGINS_CACHE", str(tmp_path))
    ctx = bench.make_context(layers=2, new_tokens=2, hidden=64, family="internvl")
    geo = ctx.request.geometry
    assert [(b.name, b.rows, b.cols) for b in geo.blocks] == [("base", 16, 16), ("highres", 48, 64)]
    assert ctx.request.image_pos.numel() == 13 * 256 and ctx.inputs["pixel_values"].shape[0] == 13
    cases = bench.all_cases(ctx)
    names = {k.split(":")[0].split(" ")[0] for k in cases if k.startswith("internvl_hf_")}
    assert names == {f"internvl_hf_{t}" for t in ("pai", "pm", "lochead", "knockout", "reprompt")}
    with torch.no_grad():
        assert torch.equal(cases["hooks idle (generate)"][0](), bench.baselines(ctx)["generate"]())

    args = bench_args(tmp_path, family="internvl", layers=2, hidden=64, only="hooks idle,internvl_hf_pai,prune")
    rows, text = run_main(args)
    assert [r["case"] for r in rows] == [
        "hooks idle (generate)",
        "internvl_hf_pai (no CFG)",
        "internvl_hf_reprompt: prune 5%",
    ]
    assert all(r["latency_ratio"] > 0 and r["passes"] >= r["baseline_passes"] == 2 for r in rows)
    assert "InternVL (HF)-shaped random model (2 LM layers of width 64; a 448x336 image = 3328 image tokens" in text


def test_batch_throughput_table_at_a_tiny_width(tmp_path):
    """`bench --shape llava-1.5-7b --batch N` at a tiny width: stock, PAI (with and without CFG), PAINT,
    knockout and PM generate N different requests one at a time and as one left-padded batch; the table reports both
    per request, the gain, and each against stock at the same batch size. Behaviour only, no timed assertion."""
    args = bench_args(tmp_path, shape="llava-1.5-7b", layers=2, vision_layers=1, set=TINY, batch=3)
    rows, text = run_main(args)
    assert [r["case"] for r in rows] == [
        "stock (plain generate)",
        "pai (no CFG)",
        "pai (CFG)",
        "paint (no CFG)",
        "knockout (query, middle layers)",
        "pm (once: each request's search alone, one batched generate)",
    ]
    for r in rows:
        assert r["batch"] == 3 and r["s_per_request_1"] > 0 and r["s_per_request_n"] > 0
        assert r["gain"] == pytest.approx(r["s_per_request_1"] / r["s_per_request_n"])
    assert rows[0]["vs_stock_n"] == 1.0 and "| throughput gain |" in text and "batch 3 against batch 1" in text
    ctx = bench.context_of(bench.context_spec(args))
    pairs = bench.batch_requests(ctx, 3)
    assert len({im.size for im, _ in pairs}) == 3 and len({len(t) for _, t in pairs}) == 3  # a padded batch
