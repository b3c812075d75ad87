"""PAI: the boost equals the formula, alpha=0 is the baseline, guidance equals its formula."""

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
    pai = Pai(hooks.num_layers(model), alpha=0.0)
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
    pai = Pai(hooks.num_layers(model), alpha=0.6)
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


def test_guide_formula():
    cond = torch.tensor([[2.0, 1.0, -3.0, 0.5]])
    uncond = torch.tensor([[1.0, 2.0, 0.0, -1.0]])
    got = guidance.guide(cond, uncond, gamma=1.1, cutoff=0.1)
    p = torch.softmax(cond, -1)[0]
    for i in range(4):
        if p[i] >= 0.1 * p.max():
            assert torch.isclose(got[0, i], 2.1 * cond[0, i] - 1.1 * uncond[0, i])
        else:
            assert got[0, i] == float("-inf")
    assert got[0, 2] == float("-inf")  # p=0.0049 < 0.1*0.57
    assert torch.equal(guidance.guide(cond, uncond, gamma=0.0, cutoff=0.0), cond)


def test_cfg_first_token_is_the_guided_argmax(tiny):
    model, processor, _ = tiny
    inputs, image, _ = make_inputs(processor)
    pai = Pai(hooks.num_layers(model), alpha=0.0, use_cfg=True, gamma=3.0, cutoff=0.0)
    req = _request(model, processor, inputs, image)
    with torch.no_grad():
        out = pai.generate(model, req, **inputs, max_new_tokens=1, do_sample=False)
        cond = model(**inputs).logits[:, -1]
        text_ids = inputs["input_ids"][:, inputs["input_ids"][0] != model.config.image_token_id]
        uncond = model(input_ids=text_ids).logits[:, -1]
    want = (4.0 * cond - 3.0 * uncond).argmax(-1)
    assert out[0, -1] == want[0]


def test_cfg_loglikelihood_forward(tiny):
    model, processor, _ = tiny
    inputs, image, _ = make_inputs(processor)
    ids = inputs["input_ids"]
    full = dict(inputs)
    full["input_ids"] = torch.cat([ids, ids[:, -3:]], dim=1)  # a 3-token "continuation"
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    labels = torch.full_like(full["input_ids"], -100)
    labels[:, -3:] = full["input_ids"][:, -3:]
    pai = Pai(hooks.num_layers(model), alpha=0.0, use_cfg=True, gamma=1.0, cutoff=0.0)
    req = Request(full["input_ids"], model.config.image_token_id, ids.shape[1], [image])
    with torch.no_grad():
        out = pai.forward(model, req, **full, labels=labels)
        cond = model(**full).logits
        uncond = model(input_ids=full["input_ids"][:, full["input_ids"][0] != model.config.image_token_id]).logits
    n_img = full["input_ids"].shape[1] - uncond.shape[1]
    guided = 2 * cond[:, -4:-1] - uncond[:, -4 - 0 : -1]
    assert uncond.shape[1] == full["input_ids"].shape[1] - n_img
    want = torch.nn.functional.cross_entropy(guided[0], full["input_ids"][0, -3:])
    torch.testing.assert_close(out.loss, want, atol=1e-5, rtol=1e-5)
