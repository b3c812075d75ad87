"""PAI: the boost equals the formula, alpha=0 is the baseline, guidance is the official formula
(LALBJ/PAI CFG.py), computed independently here on small hand-made inputs."""

import math

import torch
from conftest import make_inputs
from test_hooks import _reference_logits

from methods import guidance, hooks
from methods.pai import Pai
from methods.technique import Request


def _request(model, processor, inputs, image):
    return Request(
        input_ids=inputs["input_ids"],
        image_token_id=model.config.image_token_id,
        prompt_len=inputs["input_ids"].shape[1],
        images=[image],
        processor=processor,
    )


def test_alpha_zero_is_the_baseline(tiny):
    model, processor, _ = tiny
    inputs, image, _ = make_inputs(processor)
    pai = Pai(hooks.num_layers(model), alpha=0.0, use_cfg=False)
    req = _request(model, processor, inputs, image)
    assert pai.recipe(model, req) == []
    with torch.no_grad():
        base = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        got = pai.generate(model, req, **inputs, max_new_tokens=6, do_sample=False)
        assert torch.equal(base, got)
        assert torch.equal(model(**inputs).logits, pai.forward(model, req, **inputs).logits)


def test_boost_equals_the_formula_on_answer_rows(tiny, tiny_ckpt):
    model, processor, _ = tiny
    inputs, image, _ = make_inputs(processor)
    pai = Pai(hooks.num_layers(model), alpha=0.6, use_cfg=False)
    assert list(pai.layers) == [2, 3]  # paper: layers 2..31, clipped to this model's 4 layers
    req = _request(model, processor, inputs, image)
    with torch.no_grad():
        got = pai.forward(model, req, **inputs).logits
        base = model(**inputs).logits
    n = inputs["input_ids"].shape[1]
    ref = _reference_logits(tiny_ckpt, inputs, {l: ("boost", n - 1, req.image_pos, None, 0.6) for l in (2, 3)})
    assert (got - base).abs().max() > 1e-4
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # only the answer row changes
    torch.testing.assert_close(got[:, :-1], base[:, :-1], atol=0, rtol=0)


def _log_softmax(xs):
    m = max(xs)
    lse = m + math.log(sum(math.exp(x - m) for x in xs))
    return [x - lse for x in xs]


def test_guide_is_the_official_formula():
    """CFG.py:28-58: gamma*(c-u)+u on log-softmax values; tokens below log(0.1)+max(c) are -inf."""
    cond, uncond = [2.0, 1.0, -3.0, 0.5], [1.0, 2.0, 0.0, -1.0]
    c, u = _log_softmax(cond), _log_softmax(uncond)
    got = guidance.guide(torch.tensor([cond]), torch.tensor([uncond]), gamma=1.1, cutoff=0.1)[0]
    for i in range(4):
        if c[i] < math.log(0.1) + max(c):
            assert got[i] == float("-inf")
        else:
            assert math.isclose(got[i].item(), 1.1 * c[i] - 0.1 * u[i], abs_tol=1e-6)
    assert got[2] == float("-inf") and torch.isfinite(got[[0, 1, 3]]).all()  # p=0.004 < 0.1*0.63
    # gamma 1: CFG.py:30-31 returns log_softmax(cond) before the mask
    one = guidance.guide(torch.tensor([cond]), torch.tensor([uncond]), gamma=1.0, cutoff=0.1)[0]
    assert torch.allclose(one, torch.tensor(c), atol=1e-6)
    # no cutoff: the bare combination, also for gamma 0 (= the image-free log-probabilities)
    zero = guidance.guide(torch.tensor([cond]), torch.tensor([uncond]), gamma=0.0, cutoff=0.0)[0]
    assert torch.allclose(zero, torch.tensor(u), atol=1e-6)


def test_parent_rows():
    prev = torch.tensor([[1, 2], [1, 3]])
    assert guidance.parent_rows(prev, torch.tensor([[1, 2, 5], [1, 3, 6]])) is None  # same order
    assert guidance.parent_rows(prev, torch.tensor([[1, 3, 5], [1, 3, 6]])).tolist() == [1, 1]
    assert guidance.parent_rows(prev, torch.tensor([[1, 3, 5], [1, 2, 6]])).tolist() == [1, 0]


def _guidance_steps(model, follow_beams):
    """Three calls of the processor on two beams; beam 0 is replaced by a child of beam 1 at call 3."""
    text = torch.tensor([[1, 5, 6, 7]])
    cfg = guidance.ImageFreeGuidance(model, text, gamma=1.5, cutoff=0.0, follow_beams=follow_beams)
    vocab = model.config.text_config.vocab_size
    scores = torch.zeros(2, vocab)
    ids0 = torch.tensor([[1, 5, 9, 6, 7]] * 2)  # the prompt "with the image" (9 stands for the image)
    cfg(ids0, scores)
    ids1 = torch.cat([ids0, torch.tensor([[10], [11]])], 1)
    cfg(ids1, scores)
    ids2 = torch.cat([ids1[[1, 1]], torch.tensor([[12], [13]])], 1)
    return cfg(ids2, scores)


def test_cfg_with_beams_follows_the_beams(tiny):
    model, _, _ = tiny
    with torch.no_grad():
        got = _guidance_steps(model, follow_beams=True)
        # the image-free history of both rows is beam 1's: text + 11, then their own new token
        want_u = model(input_ids=torch.tensor([[1, 5, 6, 7, 11, 12], [1, 5, 6, 7, 11, 13]])).logits[:, -1]
        quirk = _guidance_steps(model, follow_beams=False)
        # official (CFG.py:43-47): row 0's cache keeps the dropped beam's token 10
        quirk_u = model(input_ids=torch.tensor([[1, 5, 6, 7, 10, 12], [1, 5, 6, 7, 11, 13]])).logits[:, -1]
    zeros = torch.zeros_like(want_u)
    torch.testing.assert_close(got, guidance.guide(zeros, want_u, 1.5, 0.0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(quirk, guidance.guide(zeros, quirk_u, 1.5, 0.0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0], quirk[0])


def test_cfg_beam_search_runs(tiny):
    model, processor, _ = tiny
    inputs, image, _ = make_inputs(processor)
    for quirks in (False, True):
        pai = Pai(hooks.num_layers(model), alpha=0.5, use_cfg=True, official_quirks=quirks)
        with torch.no_grad():
            out = pai.generate(
                model,
                _request(model, processor, inputs, image),
                **inputs,
                max_new_tokens=4,
                num_beams=2,
                do_sample=False,
            )
        assert out.shape == (1, inputs["input_ids"].shape[1] + 4)


def _first_step_scores(model, pai, req, inputs):
    with torch.no_grad():
        out = pai.generate(
            model, req, **inputs, max_new_tokens=2, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    return out.scores


def test_cfg_first_token_is_guided_not_boosted(tiny):
    """attention.py:90,125 + CFG.py:48-49: under CFG the prefill is unboosted, later tokens boosted."""
    model, processor, _ = tiny
    inputs, image, _ = make_inputs(processor)
    req = _request(model, processor, inputs, image)
    n = hooks.num_layers(model)
    plain = _first_step_scores(model, Pai(n, alpha=0.0, use_cfg=True, gamma=3.0, cutoff=0.0), req, inputs)
    boosted = _first_step_scores(
        model, Pai(n, alpha=2.0, start_layer=0, use_cfg=True, gamma=3.0, cutoff=0.0), req, inputs
    )
    first = _first_step_scores(
        model, Pai(n, alpha=2.0, start_layer=0, use_cfg=True, gamma=3.0, cutoff=0.0, boost_first_step=True), req, inputs
    )
    with torch.no_grad():
        cond = model(**inputs).logits[:, -1]
        text_ids = inputs["input_ids"][:, inputs["input_ids"][0] != model.config.image_token_id]
        uncond = model(input_ids=text_ids).logits[:, -1]
    want = 3.0 * torch.log_softmax(cond, -1) - 2.0 * torch.log_softmax(uncond, -1)
    torch.testing.assert_close(plain[0], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(boosted[0], plain[0], atol=0, rtol=0)  # first token: no boost
    assert (first[0] - plain[0]).abs().max() > 1e-3  # boost_first_step: boosted
    if torch.equal(plain[0].argmax(-1), boosted[0].argmax(-1)):
        assert (boosted[1] - plain[1]).abs().max() > 1e-3  # second token: boosted


def test_gamma_one_official_quirk_turns_the_boost_off(tiny):
    model, processor, _ = tiny
    inputs, image, _ = make_inputs(processor)
    req = _request(model, processor, inputs, image)
    n = hooks.num_layers(model)
    assert Pai(n, alpha=0.5, use_cfg=True, gamma=1.0, official_quirks=True).recipe(model, req) == []
    assert Pai(n, alpha=0.5, use_cfg=True, gamma=1.0).recipe(model, req) != []


def test_cfg_loglikelihood_forward(tiny):
    model, processor, _ = tiny
    inputs, image, _ = make_inputs(processor)
    ids = inputs["input_ids"]
    full = dict(inputs)
    full["input_ids"] = torch.cat([ids, ids[:, -3:]], dim=1)  # a 3-token "continuation"
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    labels = torch.full_like(full["input_ids"], -100)
    labels[:, -3:] = full["input_ids"][:, -3:]
    pai = Pai(hooks.num_layers(model), alpha=0.0, use_cfg=True, gamma=2.0, cutoff=0.0)
    req = Request(full["input_ids"], model.config.image_token_id, ids.shape[1], [image])
    with torch.no_grad():
        out = pai.forward(model, req, **full, labels=labels)
        cond = model(**full).logits
        uncond = model(input_ids=full["input_ids"][:, full["input_ids"][0] != model.config.image_token_id]).logits
    c, u = torch.log_softmax(cond[:, -4:-1], -1), torch.log_softmax(uncond[:, -4:-1], -1)
    guided = 2.0 * (c - u) + u
    want = torch.nn.functional.cross_entropy(guided[0], full["input_ids"][0, -3:])
    torch.testing.assert_close(out.loss, want, atol=1e-5, rtol=1e-5)
    # under CFG the row that predicts the first answer token is not boosted (as in generation)
    boost = Pai(hooks.num_layers(model), alpha=0.5, use_cfg=True).recipe(model, req)[0]
    assert boost.rows == hooks.Rows.span(ids.shape[1])
