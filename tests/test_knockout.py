"""Attention knockout: blocked (query, key) pairs against an eager reference, per layer window."""

import pytest
import torch
from conftest import load, make_inputs
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import sdpa_mask

from methods import hooks
from methods.knockout import Knockout, blocked_pairs, knockout_layers, query_rows
from methods.technique import Request, RequestError

# --- an independent eager reference: the full score matrix, with a hand-listed set of blocked pairs ---

_BLOCKED = {}  # layer -> set of (absolute row, absolute key)


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    n_rep = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    scores = query @ k.transpose(2, 3) * scaling
    q_len, k_len = query.shape[2], key.shape[2]
    if getattr(module, "is_causal", False):
        q_pos = torch.arange(k_len - q_len, k_len)[:, None]
        scores = scores.masked_fill(torch.arange(k_len)[None, :] > q_pos, float("-inf"))
        for r, kk in _BLOCKED.get(module.layer_idx, ()):
            local = r - (k_len - q_len)
            if 0 <= local < q_len:
                scores[:, :, local, kk] = float("-inf")
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    return (probs @ v).transpose(1, 2).contiguous(), probs


AttentionInterface.register("knockout_reference", _reference_attention)
AttentionMaskInterface.register("knockout_reference", sdpa_mask)


def _sequence(model, processor, extra=4):
    """A prompt plus a few continuation tokens, so that the `generated` rows exist in one forward."""
    inputs, _, _ = make_inputs(processor)
    prompt_len = inputs["input_ids"].shape[1]
    cont = torch.tensor([[14, 15, 16, 42][:extra]])
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], cont], dim=1)
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    req = Request(
        input_ids=full["input_ids"], image_token_id=model.config.image_token_id, prompt_len=prompt_len, images=[None]
    )
    return full, req


def _hand_rows(mode, img_start, img_end, prompt_len, seq_len, last_row):
    """The query rows of each mode, written out from the definitions (not from methods.knockout)."""
    first_generated = prompt_len - 1 if last_row == "generated" else prompt_len
    return {
        "generated": range(first_generated, seq_len),
        "query": range(img_end, first_generated),
        "both": range(img_end, seq_len),
        "all": range(img_start, seq_len),
    }[mode]


@pytest.mark.parametrize(
    "mode,window,outside,last_row",
    [
        ("query", (1, 3), False, "generated"),
        ("generated", (0, 4), False, "generated"),
        ("generated", (2, 3), False, "query"),
        ("both", (1, 2), True, "generated"),
        ("all", (0, 2), False, "generated"),
    ],
)
def test_knockout_matches_eager_reference(tiny_ckpt, mode, window, outside, last_row):
    model, processor = load(tiny_ckpt)
    full, req = _sequence(model, processor)
    pos = req.image_pos
    img_start, img_end, n = int(pos[0]), int(pos[-1]) + 1, full["input_ids"].shape[1]
    tech = Knockout(
        hooks.num_layers(model), mode=mode, from_layer=window[0], to_layer=window[1], outside=outside, last_row=last_row
    )
    layers = [l for l in range(4) if (window[0] <= l < window[1]) != outside]
    assert tech.layers == layers
    rows = _hand_rows(mode, img_start, img_end, req.prompt_len, n, last_row)
    pairs = {(r, k) for r in rows for k in range(img_start, img_end) if k <= r}
    assert pairs == blocked_pairs(mode, img_start, img_end, req.prompt_len, n, last_row)
    assert pairs  # every case blocks something
    with torch.no_grad():
        got = tech.forward(model, req, **full).logits
        ref_model, _ = load(tiny_ckpt, "knockout_reference")
        _BLOCKED.clear()
        _BLOCKED.update({l: pairs for l in layers})
        try:
            want = ref_model(**full).logits
        finally:
            _BLOCKED.clear()
        plain = model(**full).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # the knockout changes exactly the rows it blocks (and what follows them causally)
    first_changed = min(r for r, _ in pairs)
    assert torch.equal(got[:, :first_changed], plain[:, :first_changed])
    assert not torch.allclose(got[:, first_changed:], plain[:, first_changed:])


def test_generated_knockout_with_one_token_answer_row_split(tiny_ckpt):
    """last_row=query: blocking the generated tokens cannot touch the first answer token's logits."""
    model, processor = load(tiny_ckpt)
    full, req = _sequence(model, processor)
    with torch.no_grad():
        plain = model(**full).logits
        tok_split = Knockout(4, mode="generated", last_row="query").forward(model, req, **full).logits
        ans_split = Knockout(4, mode="generated", last_row="generated").forward(model, req, **full).logits
    p = req.prompt_len
    assert torch.equal(tok_split[:, :p], plain[:, :p])
    assert not torch.allclose(ans_split[:, p - 1], plain[:, p - 1])


@pytest.mark.parametrize("window", [(0, 0), (2, 2), (4, 4)])
def test_empty_window_is_the_baseline(tiny, window):
    model, processor, inputs = tiny
    req = Request(
        input_ids=inputs["input_ids"],
        image_token_id=model.config.image_token_id,
        prompt_len=inputs["input_ids"].shape[1],
        images=[None],
    )
    tech = Knockout(4, mode="both", from_layer=window[0], to_layer=window[1])
    assert tech.layers == [] and tech.recipe(model, req) == []
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        got = tech.generate(model, req, **inputs, max_new_tokens=5, do_sample=False)
        assert torch.equal(got, want)
        assert torch.equal(tech.forward(model, req, **inputs).logits, model(**inputs).logits)


def test_generation_uses_the_same_blocks_in_every_decode_step(tiny):
    """Greedy tokens generated under a knockout are the argmax of a full forward under the same knockout."""
    model, processor, inputs = tiny
    p = inputs["input_ids"].shape[1]
    req = Request(
        input_ids=inputs["input_ids"], image_token_id=model.config.image_token_id, prompt_len=p, images=[None]
    )
    tech = Knockout(4, mode="both", from_layer=0, to_layer=4)
    with torch.no_grad():
        seq = tech.generate(model, req, **inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        full = dict(inputs, input_ids=seq, attention_mask=torch.ones_like(seq))
        req_full = Request(input_ids=seq, image_token_id=model.config.image_token_id, prompt_len=p, images=[None])
        logits = tech.forward(model, req_full, **full).logits
    # cached decoding and one full forward round differently (<= 2e-7 measured): each greedy token
    # must be the full forward's argmax up to such a near-tie (the top-2 gaps here are >= 0.02)
    rows = logits[0, p - 1 : -1]
    assert (rows.max(-1).values - rows.gather(-1, seq[0, p:, None])[:, 0] <= 1e-5).all()


def test_layer_windows_and_errors():
    assert knockout_layers(1, 3, 6) == [1, 2]
    assert knockout_layers(1, 3, 6, outside=True) == [0, 3, 4, 5]
    assert knockout_layers(-2, None, 6) == [4, 5]
    assert knockout_layers(3, 3, 6) == []
    with pytest.raises(ValueError, match="0 <= from_layer <= to_layer <= 6"):
        knockout_layers(4, 2, 6)
    with pytest.raises(ValueError, match="0 <= from_layer"):
        knockout_layers(0, 7, 6)
    with pytest.raises(ValueError, match="generated, query, both, all"):
        query_rows("image", 1, 5, 9)
    r = query_rows("query", 2, 18, 29)
    assert (r.start, r.stop) == (18, 28)


def test_mode_all_needs_a_text_prefix(tiny):
    model, _, inputs = tiny
    ids = inputs["input_ids"][:, 2:]  # drop "USER :" so the image starts the prompt
    req = Request(input_ids=ids, image_token_id=model.config.image_token_id, prompt_len=ids.shape[1], images=[None])
    with pytest.raises(RequestError, match="use mode=both"):
        Knockout(4, mode="all").recipe(model, req)
