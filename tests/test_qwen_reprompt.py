"""Re-prompting / pruning and PAI's image-free CFG on Qwen2.5-VL: explicit M-RoPE positions.

The tiny random Qwen2.5-VL of test_qwen.py (a 3x7 merged grid: the text after the image resumes
at start + 7, not at the next slot). Checked against independent calculations: a compressed cache
against the full forward with the dropped image keys blocked (and the positions the model would
infer, which differ); generation from a cut cache against plain / masked generation; the
image-free pass against a direct forward of the image-free prompt at its own positions; both
names through the real lmms-eval CLI."""

import json

import pytest
import torch
from conftest import REPO, TASKS
from test_qwen import PIXELS, _inputs, tiny_qwen  # noqa: F401  (the module-scoped fixture)

from lmms_eval_plugins import testing
from methods import guidance, hooks, positions
from methods.kv_cache import cache_of, with_cache
from methods.reprompt import Reprompt
from methods.reprompt_context import forward_from, generate_from
from methods.technique import Request

GREEDY = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}


@pytest.fixture(scope="module")
def qwen(tiny_qwen):  # noqa: F811
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen, attn_implementation="sdpa").eval()
    hooks.install(model)
    processor = AutoProcessor.from_pretrained(tiny_qwen)
    in1 = dict(_inputs(processor))
    in2 = dict(_inputs(processor, text="how many blue circle are there ?"))
    return model, processor, in1, in2


def _request(model, inputs):
    ids = inputs["input_ids"]
    return Request(
        input_ids=ids,
        image_token_id=model.config.image_token_id,
        prompt_len=ids.shape[1],
        images=[torch.zeros(1)],
        config=model.config,
        inputs={"image_grid_thw": inputs["image_grid_thw"]},
    )


def test_mrope_positions_are_the_models_own(qwen):
    model, _, in1, _ = qwen
    want, _ = model.model.get_rope_index(
        in1["input_ids"], mm_token_type_ids=in1["mm_token_type_ids"], image_grid_thw=in1["image_grid_thw"]
    )
    got = positions.prompt_positions(model, in1["input_ids"], in1["image_grid_thw"])
    assert torch.equal(got, want[:, 0])
    req = _request(model, in1)
    img_start, img_end = int(req.image_pos[0]), int(req.image_pos[-1]) + 1
    _, h, w = (int(v) for v in in1["image_grid_thw"][0])
    assert int(got[0, img_end]) == img_start + max(h, w) // 2 != img_end  # text resumes after the grid, not the slot
    assert positions.next_position(got[:, :img_end]) == img_start + max(h, w) // 2


@pytest.mark.parametrize("keep_query", [True, False])
def test_compressed_cache_equals_the_blocked_full_forward(qwen, keep_query):
    """Suffix logits after the compressed cache (explicit M-RoPE positions) == a full forward of the same
    sequence with the dropped image keys blocked for the appended rows; the positions the model infers
    for the suffix (its cached rope_deltas over cache slots) do not."""
    model, _, in1, in2 = qwen
    req = _request(model, in1)
    tech = Reprompt(4, mode="compressed", keep_ratio=0.25, keep_query=keep_query)
    kept = tech.kept_image_tokens(model, req, in1)[None]
    with torch.no_grad():
        out = model(**in1, use_cache=True)
    ctx = tech.build_context(model, req, cache_of(out), kept, req.prompt_len)
    pos = req.image_pos
    img_end = int(pos[-1]) + 1
    assert ctx.positions.shape == (3, ctx.entries)
    prefix = in1["input_ids"] if keep_query else in1["input_ids"][:, :img_end]
    suffix = in2["input_ids"][:, img_end:]
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
        inferred = model(input_ids=suffix, **with_cache(ctx.cache()), use_cache=True).logits
    diff, wrong = (got - want).abs().max().item(), (inferred - want).abs().max().item()
    print(f"keep_query={keep_query}: explicit M-RoPE max diff {diff:.2e}, inferred positions {wrong:.2e}")
    assert diff < 2e-5
    assert wrong > 1e-3


def test_generation_from_a_cut_cache_continues_at_the_right_positions(qwen):
    model, _, in1, _ = qwen
    req = _request(model, in1)
    img_end = int(req.image_pos[-1]) + 1
    with torch.no_grad():
        plain = model.generate(**in1, **GREEDY)[:, in1["input_ids"].shape[1] :]
        # an uncompressed context (every image token kept, query re-prefilled after it) = plain generate
        tech = Reprompt(4, mode="compressed", keep_ratio=1.0, keep_query=False)
        out = model(**in1, use_cache=True)
        ctx = tech.build_context(model, req, cache_of(out), torch.arange(req.image_pos.numel()), req.prompt_len)
        full = generate_from(model, ctx, in1["input_ids"][:, img_end:], **GREEDY)
        # pruning at 25%: the cut cache + re-prefilled query = the same prompt with the dropped keys masked
        prune = Reprompt(4, mode="prune", keep_ratio=0.25)
        cut = prune.generate(model, req, **in1, **GREEDY)[:, in1["input_ids"].shape[1] :]
        kept = prune.kept_image_tokens(model, req, in1)
        with hooks.edited(model, *prune.prune_edits(req, kept)):
            masked = model.generate(**in1, **GREEDY)[:, in1["input_ids"].shape[1] :]
    assert torch.equal(full, plain)
    assert torch.equal(cut, masked)
    assert prune.records[-1]["kv_entries"] < req.prompt_len


def test_compressed_follow_up_and_fastv_run(qwen):
    """A follow-up question answered from the compressed context without the image; FastV's scoring prefill."""
    model, _, in1, in2 = qwen
    tech = Reprompt(4, mode="compressed", keep_ratio=0.25)
    with torch.no_grad():
        tech.generate(model, _request(model, in1), **in1, **GREEDY)
        second = tech.generate(model, _request(model, in2), **in2, **GREEDY)
        fastv = Reprompt(4, mode="fastv", fastv_layer=1, fastv_ratio=0.25)
        edits = fastv.fastv_edits(model, _request(model, in2), in2)
    assert [r["compressed"] for r in tech.records] == [False, True] and second.shape[1] == in2["input_ids"].shape[1] + 6
    n = _request(model, in2).image_pos.numel()
    assert (
        len(edits) == 1 and n - 6 <= edits[0].keys.numel() <= n - 5
    )  # int(21 * 0.25) kept by attention, plus the last


def _image_free_log_probs(model, in1, new_ids):
    """Drive ImageFreeGuidance over the generated tokens after the image prompt's generate (which caches
    its rope_deltas); gamma 2, no cutoff: guided = 2c - u, so u = 2c - guided."""
    text = guidance.drop_image_tokens(in1["input_ids"], model.config.image_token_id)
    cfg = guidance.ImageFreeGuidance(model, text, gamma=2.0, cutoff=0.0)
    seq = in1["input_ids"]
    scores = torch.randn(1, model.config.text_config.vocab_size, generator=torch.Generator().manual_seed(0))
    c = torch.log_softmax(scores, dim=-1)
    got = []
    for i in range(new_ids.shape[1] + 1):
        got.append(2 * c - cfg(torch.cat([seq, new_ids[:, :i]], dim=1), scores))
    return text, torch.cat(got)


def test_image_free_pass_has_its_own_positions(qwen, monkeypatch):
    model, _, in1, _ = qwen
    with torch.no_grad():
        new = model.generate(**in1, **GREEDY)[:, in1["input_ids"].shape[1] :]
        assert model.model.rope_deltas is not None and int(model.model.rope_deltas) != 0  # the trap
        text, got = _image_free_log_probs(model, in1, new)
        seq = torch.cat([text, new], dim=1)
        own = torch.arange(seq.shape[1]).expand(3, 1, -1)  # a text-only prompt: 0..n-1 on every M-RoPE row
        want = torch.log_softmax(model(input_ids=seq, position_ids=own).logits[0, text.shape[1] - 1 :], dim=-1)
        diff = (got - want).abs().max().item()
        monkeypatch.setattr(guidance.positions, "explicit", lambda *a, **k: {})  # the model's own (cached rope_deltas)
        _, stale = _image_free_log_probs(model, in1, new)
    wrong = (stale - want).abs().max().item()
    print(f"image-free pass: explicit positions max diff {diff:.2e}, cached rope_deltas {wrong:.2e}")
    assert diff < 1e-4
    assert wrong > 1e-3


def test_cli_reprompt_and_pai_cfg(tiny_qwen, tmp_path):  # noqa: F811
    args = f"pretrained={tiny_qwen},device=cpu,device_map=cpu,min_pixels={PIXELS['min_pixels']},max_pixels={PIXELS['max_pixels']}"
    out = tmp_path / "reprompt"
    res, log = testing.run_lmms_eval(
        "qwen2_5_vl_reprompt",
        args + ",mode=compressed,keep_ratio=0.25",
        "tiny_repeat",
        out,
        include_path=TASKS,
        cwd=REPO,
    )
    assert res is not None, log[-3000:]
    assert 0.0 <= res["results"]["tiny_repeat"]["exact,none"] <= 1.0
    samples = testing.read_samples(out, "tiny_repeat")
    assert len(samples) == 5 and all(s["filtered_resps"] for s in samples)
    stats = json.loads((out / "reprompt_stats.json").read_text())
    assert stats["compressed_answers"] == 3 and stats["kv_entries_compressed"] < stats["kv_entries_full"]
    out = tmp_path / "pai"
    res, log = testing.run_lmms_eval(
        "qwen2_5_vl_pai", args + ",use_cfg=true,alpha=0.2", "tiny_yesno", out, include_path=TASKS, cwd=REPO
    )
    assert res is not None, log[-3000:]
    assert 0.0 <= res["results"]["tiny_yesno"]["exact,none"] <= 1.0
    assert len(testing.read_samples(out, "tiny_yesno")) == 3
