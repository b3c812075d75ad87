"""Image-token pruning and compressed-context re-prompting: selection, masks, positions, cache reuse."""

import json

import pytest
import torch
from conftest import load, make_inputs

from methods import hooks
from methods.kv_cache import cache_of
from methods.reprompt import Reprompt
from methods.reprompt_context import CompressedContext, compress, forward_from
from methods.reprompt_scoring import attention_scores, n_keep, select, top_tokens
from methods.technique import Request, RequestError

GREEDY = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)


def _request(model, processor, inputs, image):
    ids = inputs["input_ids"]
    return Request(
        input_ids=ids,
        image_token_id=model.config.image_token_id,
        prompt_len=ids.shape[1],
        images=[image],
        processor=processor,
    )


@pytest.fixture
def two_questions(tiny_ckpt):
    model, processor = load(tiny_ckpt)
    hooks.install(model)
    in1, image, _ = make_inputs(processor, "is there a red circle in the image?")
    in2, _, _ = make_inputs(processor, "how many blue square are there ?")
    return model, processor, image, in1, in2


# --- pure arithmetic ---


def test_selection_arithmetic_on_hand_made_maps():
    assert [n_keep(576, r) for r in (0.02, 0.05, 0.10, 0.25, 1.0)] == [12, 29, 58, 144, 576]
    assert n_keep(16, 0.001) == 1
    # two layers, (batch 1, heads 2, rows 2, keys 4)
    m0 = torch.tensor([[[[0.1, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]], [[0.0, 0.7, 0.1, 0.2], [0.2, 0.1, 0.3, 0.4]]]])
    m1 = torch.tensor(
        [[[[0.9, 0.0, 0.05, 0.05], [0.8, 0.1, 0.05, 0.05]], [[0.6, 0.2, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1]]]]
    )
    scores = attention_scores({3: m1, 1: m0})
    torch.testing.assert_close(scores[0], torch.tensor([0.15, 0.4, 0.2, 0.25]))  # layer 1 first
    torch.testing.assert_close(scores[1], torch.tensor([0.75, 0.1, 0.075, 0.075]))
    # pooled: [0.45, 0.25, 0.1375, 0.1625]
    assert select({1: m0, 3: m1}, 0.5)[None].tolist() == [0, 1]
    per = select({1: m0, 3: m1}, 0.5, "per_layer")
    assert per[1].tolist() == [1, 3] and per[3].tolist() == [0, 1]
    assert top_tokens(torch.tensor([1.0, 2.0, 2.0, 0.5]), 0.25).tolist() == [1]  # tie -> the earlier token
    assert top_tokens(torch.tensor([1.0, 2.0, 2.0, 0.5]), 0.75).tolist() == [0, 1, 2]


def test_scores_are_eager_attention_of_the_query_rows(two_questions, tiny_ckpt):
    model, processor, image, in1, _ = two_questions
    req = _request(model, processor, in1, image)
    pos = req.image_pos
    img_end = int(pos[-1]) + 1
    tech = Reprompt(4, keep_ratio=0.25, score_from_layer=1, score_to_layer=3)
    kept = tech.kept_image_tokens(model, req, in1)[None]
    eager, _ = load(tiny_ckpt, "eager")
    with torch.no_grad():
        att = eager(**in1, output_attentions=True).attentions
    # independent: mean over heads and the rows after the image, then over layers 1 and 2
    score = torch.stack([att[l][0][:, img_end:, pos].mean(dim=(0, 1)) for l in (1, 2)]).mean(0)
    want = sorted(torch.argsort(score, descending=True)[: n_keep(16, 0.25)].tolist())
    assert kept.tolist() == want


# --- pruning ---


def test_prune_keep_all_is_the_baseline(two_questions):
    model, processor, image, in1, _ = two_questions
    req = _request(model, processor, in1, image)
    tech = Reprompt(4, mode="prune", keep_ratio=1.0)
    with torch.no_grad():
        assert torch.equal(tech.generate(model, req, **in1, **GREEDY), model.generate(**in1, **GREEDY))


@pytest.mark.parametrize("selection", ["pooled", "per_layer"])
def test_prune_masks_exactly_the_dropped_image_keys(two_questions, selection):
    """Pruned logits == a forward with hand-built Block edits (per layer) on the rows after the image."""
    model, processor, image, in1, _ = two_questions
    req = _request(model, processor, in1, image)
    tech = Reprompt(4, mode="prune", keep_ratio=0.25, selection=selection)
    kept = tech.kept_image_tokens(model, req, in1)
    pos, img_end = req.image_pos, int(req.image_pos[-1]) + 1
    edits = []
    for layer in range(4):
        idx = kept[None if selection == "pooled" else layer]
        dropped = [int(p) for i, p in enumerate(pos) if i not in set(idx.tolist())]
        assert len(dropped) == 16 - 4
        edits.append(hooks.Block(layers=[layer], rows=hooks.Rows.span(img_end), keys=dropped))
    with torch.no_grad():
        got = tech.forward(model, req, **in1).logits
        with hooks.edited(model, *edits):
            want = model(**in1).logits
        plain = model(**in1).logits
    assert torch.equal(got, want)
    assert torch.equal(got[:, :img_end], plain[:, :img_end]) and not torch.allclose(got[:, -1], plain[:, -1])


def test_prune_generate_equals_generation_under_the_masks(two_questions):
    """Generation prunes by cutting the cache; the tokens equal greedy generation under the Block masks."""
    model, processor, image, in1, _ = two_questions
    req = _request(model, processor, in1, image)
    tech = Reprompt(4, mode="prune", keep_ratio=0.25)
    with torch.no_grad():
        got = tech.generate(model, req, **in1, **GREEDY)
        with hooks.edited(model, *tech.prune_edits(req, tech.kept_image_tokens(model, req, in1))):
            want = model.generate(**in1, **GREEDY)
        plain = model.generate(**in1, **GREEDY)
    assert torch.equal(got, want) and not torch.equal(got, plain)
    assert tech.records[-1]["kv_entries"] == 2 + 4 + 11 and tech.records[-1]["kv_full"] == 29


# --- compressed contexts ---


def test_compressed_keep_all_reproduces_the_full_context_answer(two_questions):
    """keep_ratio=1: the follow-up's answer == greedy generate on [first prompt, second question] with the image."""
    model, processor, image, in1, in2 = two_questions
    tech = Reprompt(4, mode="compressed", keep_ratio=1.0)
    img_end = int(_request(model, processor, in1, image).image_pos[-1]) + 1
    with torch.no_grad():
        first = tech.generate(model, _request(model, processor, in1, image), **in1, **GREEDY)
        assert torch.equal(first, model.generate(**in1, **GREEDY))  # the first question is the full-context answer
        second = tech.generate(model, _request(model, processor, in2, image), **in2, **GREEDY)
        seq = torch.cat([in1["input_ids"], in2["input_ids"][:, img_end:]], dim=1)
        full = model.generate(
            input_ids=seq, attention_mask=torch.ones_like(seq), pixel_values=in1["pixel_values"], **GREEDY
        )
    n2 = in2["input_ids"].shape[1]
    assert torch.equal(second[:, :n2], in2["input_ids"])  # lmms-eval strips the prompt by its length
    assert torch.equal(second[:, n2:], full[:, seq.shape[1] :])
    assert [r["compressed"] for r in tech.records] == [False, True]


def test_compressed_without_query_keep_all_is_llava_hf(two_questions):
    """keep_query=False, keep_ratio=1: the follow-up sees exactly its own fresh prompt."""
    model, processor, image, in1, in2 = two_questions
    tech = Reprompt(4, mode="compressed", keep_ratio=1.0, keep_query=False)
    with torch.no_grad():
        tech.generate(model, _request(model, processor, in1, image), **in1, **GREEDY)
        second = tech.generate(model, _request(model, processor, in2, image), **in2, **GREEDY)
        assert torch.equal(second, model.generate(**in2, **GREEDY))


def _context(tech, model, processor, image, inputs):
    req = _request(model, processor, inputs, image)
    kept = tech.kept_image_tokens(model, req, inputs)[None]
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    return req, kept, tech.build_context(model, req, cache_of(out), kept, req.prompt_len)


@pytest.mark.parametrize("keep_query", [True, False])
def test_positions_after_a_compressed_cache(two_questions, keep_query):
    """Suffix logits after the compressed cache == a full forward of the same token sequence in which the
    appended rows cannot see the dropped image tokens; with compact positions instead they differ."""
    model, processor, image, in1, in2 = two_questions
    tech = Reprompt(4, mode="compressed", keep_ratio=0.25, keep_query=keep_query)
    req1, kept, ctx = _context(tech, model, processor, image, in1)
    pos = req1.image_pos
    img_start, img_end, n1 = int(pos[0]), int(pos[-1]) + 1, in1["input_ids"].shape[1]
    assert ctx.entries == img_start + 4 + (n1 - img_end if keep_query else 0)
    assert ctx.full_entries == (n1 if keep_query else img_end)
    suffix = in2["input_ids"][:, img_end:]
    prefix = in1["input_ids"] if keep_query else in1["input_ids"][:, :img_end]
    seq = torch.cat([prefix, suffix], dim=1)
    dropped = [int(p) for i, p in enumerate(pos) if i not in set(kept.tolist())]
    block = hooks.Block(layers=range(4), rows=hooks.Rows.span(prefix.shape[1]), keys=dropped)
    with torch.no_grad():
        got = forward_from(model, ctx, suffix).logits
        with hooks.edited(model, block):
            want = model(input_ids=seq, attention_mask=torch.ones_like(seq), pixel_values=in1["pixel_values"]).logits
        # negative control: the same entries at compact positions 0..kept-1
        compact = CompressedContext(ctx.keys, ctx.values, torch.arange(ctx.entries), ctx.entries, 0, 0, 0)
        wrong = forward_from(model, compact, suffix).logits
    torch.testing.assert_close(got, want[:, prefix.shape[1] :], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(wrong, want[:, prefix.shape[1] :], atol=1e-3)


def test_compressed_without_query_equals_pruning(two_questions):
    """Two implementations of the same thing: cache slicing (compressed, keep_query=False) and key masks (prune)."""
    model, processor, image, in1, _ = two_questions
    comp = Reprompt(4, mode="compressed", keep_ratio=0.25, keep_query=False)
    prune = Reprompt(4, mode="prune", keep_ratio=0.25)
    req, _, ctx = _context(comp, model, processor, image, in1)
    img_end = int(req.image_pos[-1]) + 1
    with torch.no_grad():
        got = forward_from(model, ctx, in1["input_ids"][:, img_end:]).logits
        want = prune.forward(model, req, **in1).logits[:, img_end:]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_compress_keeps_the_chosen_entries():
    from transformers import DynamicCache

    cache = DynamicCache()
    k = torch.arange(2 * 3 * 6 * 2, dtype=torch.float).view(2, 3, 6, 2)[:1]
    cache.update(k, -k, 0)
    cache.update(k + 100, -k - 100, 1)
    ctx = compress(cache, torch.tensor([0, 2, 5]), 6, 6, 1, 3)
    assert torch.equal(ctx.keys[0], k[:, :, [0, 2, 5]]) and torch.equal(ctx.values[1], -k[:, :, [0, 2, 5]] - 100)
    fresh = ctx.cache()
    fresh.update(torch.zeros(1, 3, 1, 2), torch.zeros(1, 3, 1, 2), 0)
    assert fresh.layers[0].keys.shape[2] == 4 and ctx.keys[0].shape[2] == 3  # the stored context is never grown


def test_cache_reuse_lru_and_stats(two_questions, tmp_path):
    model, processor, image, in1, in2 = two_questions
    in3, image3, _ = make_inputs(processor, "is there a red circle in the image?", color=(10, 10, 240))
    tech = Reprompt(4, mode="compressed", keep_ratio=0.25, cache_size=1)
    tech.stats_path = tmp_path / "stats.json"
    with torch.no_grad():
        for inputs, im in [(in1, image), (in2, image), (in3, image3), (in1, image), (in2, image)]:
            tech.generate(model, _request(model, processor, inputs, im), **inputs, max_new_tokens=2, do_sample=False)
    # image, image (hit), image3 (evicts image), image (miss again), image (hit)
    assert [r["compressed"] for r in tech.records] == [False, True, False, False, True]
    assert len(tech.contexts) == 1
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["requests"] == 5 and stats["compressed_answers"] == 2
    assert stats["kv_entries_compressed"] == 2 + 4 + 11 and stats["kv_entries_full"] == 29
    assert stats["ttft_compressed_s"] > 0 and stats["ttft_full_s"] > 0
    assert len((tmp_path / "stats.jsonl").read_text().splitlines()) == 5


def test_primer_answers_every_question_from_the_compressed_context(two_questions):
    model, processor, image, in1, in2 = two_questions
    tech = Reprompt(4, mode="compressed", keep_ratio=1.0, primer="describe this image .")
    with torch.no_grad():
        a1 = tech.generate(model, _request(model, processor, in1, image), **in1, **GREEDY)
        tech.generate(model, _request(model, processor, in2, image), **in2, **GREEDY)
        primer = processor.tokenizer("describe this image .", add_special_tokens=False, return_tensors="pt")[
            "input_ids"
        ]
        img_end = int(_request(model, processor, in1, image).image_pos[-1]) + 1
        seq = torch.cat([in1["input_ids"][:, :img_end], primer, in1["input_ids"][:, img_end:]], dim=1)
        full = model.generate(
            input_ids=seq, attention_mask=torch.ones_like(seq), pixel_values=in1["pixel_values"], **GREEDY
        )
    assert [r["compressed"] for r in tech.records] == [True, True]
    assert torch.equal(a1[:, in1["input_ids"].shape[1] :], full[:, seq.shape[1] :])


def test_bad_settings_are_refused(two_questions):
    model, processor, image, in1, _ = two_questions
    with pytest.raises(ValueError, match="keep_ratio"):
        Reprompt(4, keep_ratio=0.0)
    with pytest.raises(ValueError, match="per_layer needs mode=prune"):
        Reprompt(4, mode="compressed", selection="per_layer")
    with pytest.raises(ValueError, match="layer range"):
        Reprompt(4, score_from_layer=3, score_to_layer=2)
    with pytest.raises(RequestError, match="use mode=prune"):
        Reprompt(4, mode="compressed").forward(model, _request(model, processor, in1, image), **in1)
    with pytest.raises(RequestError, match="exactly one image"):
        Reprompt(4).generate(
            model,
            _request(model, processor, in1, image).__class__(
                input_ids=in1["input_ids"], image_token_id=4, prompt_len=29
            ),
            **in1,
        )


# --- the official selection (selection=describe) and FastV ---


def test_describe_selection_is_cached_per_image_and_decode_only(two_questions):
    """One describe pass per image (reused for a second question); prune_rows=decode leaves the prefill
    untouched: the first answer token's logits equal the baseline's."""
    model, processor, image, in1, in2 = two_questions
    n = hooks.num_layers(model)
    tech = Reprompt(
        n,
        mode="prune",
        selection="describe",
        keep_ratio=0.25,
        describe="describe the image",
        describe_tokens=3,
        prune_rows="decode",
    )
    req1, req2 = _request(model, processor, in1, image), _request(model, processor, in2, image)
    with torch.no_grad():
        out = tech.generate(model, req1, **in1, **GREEDY, output_scores=True, return_dict_in_generate=True)
        base = model.generate(**in1, **GREEDY, output_scores=True, return_dict_in_generate=True)
        tech.generate(model, req2, **in2, **GREEDY)
    assert len(tech.selections) == 1
    kept = next(iter(tech.selections.values()))
    assert sorted(kept) == list(range(n)) and all(len(k) == int(0.25 * req1.image_pos.numel()) for k in kept.values())
    assert torch.equal(out.scores[0], base.scores[0])


def test_fastv_keep_all_is_the_baseline_and_bad_layers_refused(two_questions):
    model, processor, image, in1, _ = two_questions
    n = hooks.num_layers(model)
    req = _request(model, processor, in1, image)
    with torch.no_grad():
        got = Reprompt(n, mode="fastv", fastv_layer=1, fastv_ratio=1.0).generate(model, req, **in1, **GREEDY)
        want = model.generate(**in1, **GREEDY)
        pruned = Reprompt(n, mode="fastv", fastv_layer=1, fastv_ratio=0.1).forward(model, req, **in1).logits
        plain = model(**in1).logits
    assert torch.equal(got, want)
    first = int(req.image_pos[0])
    assert torch.equal(pruned[:, :first], plain[:, :first])  # nothing before the image changes
    with pytest.raises(ValueError, match="fastv_layer"):
        Reprompt(n, mode="fastv", fastv_layer=n).fastv_edits(model, req, dict(in1))
    with pytest.raises(ValueError, match="needs mode=prune"):
        Reprompt(n, mode="compressed", selection="describe")


@pytest.mark.parametrize("strategy", ["qs", "q", "s"])
def test_official_compressed_context_answers_every_question(two_questions, strategy):
    """cache_strategy: one describe pass per image; both questions (the first too) answered from its context."""
    model, processor, image, in1, in2 = two_questions
    n = hooks.num_layers(model)
    tech = Reprompt(
        n, mode="compressed", keep_ratio=0.25, cache_strategy=strategy, describe="describe the image", describe_tokens=3
    )
    req1, req2 = _request(model, processor, in1, image), _request(model, processor, in2, image)
    with torch.no_grad():
        out1 = tech.generate(model, req1, **in1, **GREEDY)
        out2 = tech.generate(model, req2, **in2, **GREEDY)
    assert out1.shape[1] == in1["input_ids"].shape[1] + 6 and out2.shape[1] == in2["input_ids"].shape[1] + 6
    ctx = next(iter(tech.contexts.values()))
    n_img, k = req1.image_pos.numel(), int(0.25 * req1.image_pos.numel())
    describe_len = tech.describe_ids(req1).shape[1]
    want = {"qs": describe_len - n_img + k, "q": describe_len - n_img, "s": k}[strategy]
    assert len(tech.contexts) == 1 and ctx.entries == want
    assert [r["compressed"] for r in tech.records] == [True, True]
    with pytest.raises(ValueError, match="cache_strategy"):
        Reprompt(n, mode="prune", cache_strategy=strategy)
