"""The shared hook layer: idle = bit-identical, captures = eager attention, edits = hand-made edits."""

import pytest
import torch
from conftest import load, make_inputs
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv

from methods import hooks


def _image_pos(model, inputs):
    return hooks.image_positions(inputs["input_ids"], model.config.image_token_id)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_idle_hook_layer_is_bit_identical(tiny_ckpt, attn):
    plain, processor = load(tiny_ckpt, attn)
    hooked, _ = load(tiny_ckpt, attn)
    assert hooks.install(hooked) == f"hooked_{attn}"
    assert hooked.config.text_config._attn_implementation == f"hooked_{attn}"
    assert hooked.config.vision_config._attn_implementation == f"hooked_{attn}"
    inputs, _, _ = make_inputs(processor)
    with torch.no_grad():
        assert torch.equal(plain(**inputs).logits, hooked(**inputs).logits)
        g_plain = plain.generate(**inputs, max_new_tokens=6, do_sample=False)
        g_hooked = hooked.generate(**inputs, max_new_tokens=6, do_sample=False)
        # an installed edit on rows the prompt never reaches is idle too
        with hooks.edited(hooked, hooks.Boost(layers=[1], rows=hooks.Rows.span(10_000), alpha=1.0)):
            g_far = hooked.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(g_plain, g_hooked) and torch.equal(g_plain, g_far)


def _eager_reference(ckpt, inputs, **kw):
    model, _ = load(ckpt, "eager")
    with torch.no_grad():
        return model(**inputs, output_attentions=True, **kw)


@pytest.mark.parametrize("ckpt_name", ["tiny_ckpt", "tiny_mha_ckpt"])
def test_capture_matches_eager_attention(request, ckpt_name):
    ckpt = request.getfixturevalue(ckpt_name)
    model, processor = load(ckpt)
    inputs, _, _ = make_inputs(processor)
    pos = _image_pos(model, inputs)
    n = hooks.num_layers(model)
    cap = hooks.Capture(layers=range(n), keys=pos)
    with torch.no_grad(), hooks.edited(model, cap):
        model(**inputs)
    ref = _eager_reference(ckpt, inputs).attentions  # tuple over LM layers of (1, H, n, n)
    assert len(ref) == n
    for layer in range(n):
        got = cap.maps[layer][0]
        want = ref[layer][:, :, -1:, pos]
        assert got.shape == want.shape
        torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=0)


def test_capture_decode_steps_match_full_forward(tiny_ckpt):
    model, processor = load(tiny_ckpt)
    inputs, _, _ = make_inputs(processor)
    pos = _image_pos(model, inputs)
    cap = hooks.Capture(layers=[0, 3], keys=pos)
    with torch.no_grad(), hooks.edited(model, cap):
        seq = model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert len(cap.maps[0]) == 4  # prefill + 3 decode steps (the 4th token needs no forward)
    full = {k: v for k, v in inputs.items()}
    full["input_ids"] = seq[:, :-1]
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    ref = _eager_reference(tiny_ckpt, full).attentions
    prompt_len = inputs["input_ids"].shape[1]
    for layer in (0, 3):
        for step in range(4):
            row = prompt_len - 1 + step
            torch.testing.assert_close(
                cap.maps[layer][step], ref[layer][:, :, row : row + 1, pos].float(), atol=1e-5, rtol=0
            )


def test_capture_vision_tower_cls_row(tiny_ckpt):
    model, processor = load(tiny_ckpt)
    inputs, _, _ = make_inputs(processor)
    cap = hooks.Capture(tower="vision", layers=[0, 1], rows=hooks.Rows.span(0, 1), keys=slice(1, None))
    with torch.no_grad(), hooks.edited(model, cap):
        model(**inputs)
    eager, _ = load(tiny_ckpt, "eager")
    with torch.no_grad():
        ref = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    for layer in (0, 1):
        torch.testing.assert_close(cap.maps[layer][0], ref[layer][:, :, 0:1, 1:].float(), atol=1e-5, rtol=0)


# --- edits against an independent eager implementation that edits the full score matrix by hand ---

_REFERENCE_EDIT = {}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Plain eager attention over all rows; the edit is applied to the full score matrix."""
    n_rep = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    scores = query @ k.transpose(2, 3) * scaling
    q_len, k_len = query.shape[2], key.shape[2]
    if getattr(module, "is_causal", False):
        q_pos = torch.arange(k_len - q_len, k_len)[:, None]
        scores = scores.masked_fill(torch.arange(k_len)[None, :] > q_pos, float("-inf"))
    spec = _REFERENCE_EDIT.get(getattr(module, "layer_idx", None)) if getattr(module, "is_causal", False) else None
    if spec is not None:
        kind, rows_from, keys, heads, alpha = spec
        for r in range(q_len):
            if k_len - q_len + r < rows_from:
                continue
            for h in heads if heads is not None else range(scores.shape[1]):
                a = scores[0, h, r, keys]
                a_h = alpha[h] if isinstance(alpha, list) else alpha
                scores[0, h, r, keys] = a + a_h * a.abs() if kind == "boost" else torch.full_like(a, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    return (probs @ v).transpose(1, 2).contiguous(), probs


AttentionInterface.register("test_reference", _reference_attention)


def _reference_logits(ckpt, inputs, edits_by_layer):
    from transformers import AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionMaskInterface.register("test_reference", sdpa_mask)
    model, _ = load(ckpt, "test_reference")
    _REFERENCE_EDIT.clear()
    _REFERENCE_EDIT.update(edits_by_layer)
    try:
        with torch.no_grad():
            return model(**inputs).logits
    finally:
        _REFERENCE_EDIT.clear()


@pytest.mark.parametrize(
    "edit_kind,heads,alpha",
    [
        ("boost", None, 0.7),
        ("boost", [1, 2], 0.5),
        ("boost", [0, 1, 2, 3], [0.1, 0.9, 0.0, 2.0]),
        ("block", None, None),
    ],
)
def test_logit_edits_match_hand_edit(tiny_ckpt, edit_kind, heads, alpha):
    model, processor = load(tiny_ckpt)
    inputs, _, _ = make_inputs(processor)
    pos = _image_pos(model, inputs)
    prompt_len = inputs["input_ids"].shape[1]
    rows_from = prompt_len - 5
    keys = pos[::3] if edit_kind == "block" else pos
    layers = [1, 3]
    rows = hooks.Rows.span(rows_from)
    if edit_kind == "boost":
        a = torch.tensor(alpha) if isinstance(alpha, list) else alpha
        edit = hooks.Boost(layers=layers, rows=rows, keys=keys, heads=heads, alpha=a)
    else:
        edit = hooks.Block(layers=layers, rows=rows, keys=keys)
    with torch.no_grad(), hooks.edited(model, edit):
        got = model(**inputs).logits
    ref = _reference_logits(tiny_ckpt, inputs, {l: (edit_kind, rows_from, keys, heads, alpha) for l in layers})
    with torch.no_grad():
        base = model(**inputs).logits
    assert (got - base).abs().max() > 1e-4  # the edit does something
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_block_and_capture_compose(tiny_ckpt):
    """A capture sees the probabilities after the block: blocked keys get exactly 0."""
    model, processor = load(tiny_ckpt)
    inputs, _, _ = make_inputs(processor)
    pos = _image_pos(model, inputs)
    cap = hooks.Capture(layers=[2], keys=pos)
    with torch.no_grad(), hooks.edited(model, hooks.Block(layers=[2], keys=pos[:4]), cap):
        model(**inputs)
    got = cap.maps[2][0]
    assert torch.all(got[..., :4] == 0) and torch.all(got[..., 4:] > 0)


def test_no_leak_after_exception(tiny):
    model, processor, inputs = tiny
    with torch.no_grad():
        base = model(**inputs).logits

    class Boom(hooks.AttnEdit):
        changes_scores = True

        def edit_scores(self, scores, layer):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        with hooks.edited(model, hooks.Boost(layers=[0], alpha=3.0), Boom(layers=[2])):
            model(**inputs)
    assert not any(hooks.EDITS_ATTR in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)


def test_nested_edits_and_without_edits(tiny):
    model, processor, inputs = tiny
    pos = _image_pos(model, inputs)
    outer, inner = hooks.Capture(layers=[1], keys=pos), hooks.Capture(layers=[1], keys=pos)
    with torch.no_grad(), hooks.edited(model, outer):
        with hooks.edited(model, inner):
            model(**inputs)
        with hooks.without_edits(model):
            model(**inputs)
        model(**inputs)
    assert len(inner.maps[1]) == 1 and len(outer.maps[1]) == 2


def test_bad_layer_is_refused(tiny):
    model, _, _ = tiny
    with pytest.raises(ValueError, match="layers 0..3"):
        with hooks.edited(model, hooks.Boost(layers=[7], alpha=1.0)):
            pass


def test_capture_memory_is_rows_times_keys(tiny):
    """The capture holds (heads x rows x keys) per layer, never (heads x n x n)."""
    model, _, inputs = tiny
    pos = _image_pos(model, inputs)
    cap = hooks.Capture(layers=range(4), keys=pos)
    with torch.no_grad(), hooks.edited(model, cap):
        model(**inputs)
    assert all(m[0].shape == (1, 4, 1, pos.numel()) for m in cap.maps.values())


# ---------------------------------------------------------------------------------------
# Any transformers VLM whose attention goes through AttentionInterface
# ---------------------------------------------------------------------------------------


def test_boost_keeps_masked_keys_masked(tiny):
    """Boosting every key of every row reaches the causally masked ones: -inf must stay -inf (no NaN)."""
    model, _, inputs = tiny
    scores = torch.tensor([[[[1.0, -2.0, float("-inf")]]]])
    edited = hooks.Boost(layers=[0], alpha=0.5).edit_scores(scores, 0)
    assert torch.equal(edited, torch.tensor([[[[1.5, -1.0, float("-inf")]]]]))
    with (
        torch.no_grad(),
        hooks.edited(model, hooks.Boost(layers=range(hooks.num_layers(model)), rows=hooks.Rows.all(), alpha=0.5)),
    ):
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()


def _tiny_qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=200,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        ),
        vision_config=dict(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            out_hidden_size=64,
            fullatt_block_indexes=[2],
            window_size=32,
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
    )
    return Qwen2_5_VLForConditionalGeneration(cfg)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "qwen2_5_vl"])
def test_attention_modules_found_without_name_patterns(tmp_path, family):
    """LM and vision attention of every family: found by the modeling code's recorded "attentions" + its sub-config,
    in layer order; SigLIP's nn.MultiheadAttention pooling head is not one of them."""
    from transformers import AutoModelForImageTextToText

    from lmms_eval_plugins import testing

    if family == "qwen2_5_vl":
        model = _tiny_qwen2_5_vl()
        expected = {"lm": model.model.language_model.layers, "vision": model.model.visual.blocks}
        found = hooks.attention_modules(model)
        assert [type(m).__name__ for m in found["vision"]] == ["Qwen2_5_VLVisionAttention"] * 3
        assert found["lm"] == [layer.self_attn for layer in expected["lm"]]
        assert found["vision"] == [block.attn for block in expected["vision"]]
        return
    build = testing.build_tiny_llava_next if family == "llava_next" else testing.build_tiny_llava_onevision
    model = AutoModelForImageTextToText.from_pretrained(build(tmp_path / family))
    found = hooks.attention_modules(model)
    assert found["lm"] == [layer.self_attn for layer in model.model.language_model.layers]
    assert found["vision"] == [layer.self_attn for layer in model.model.vision_tower.encoder.layers]


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_idle_hook_layer_is_bit_identical_on_anyres_families(tmp_path, family):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from lmms_eval_plugins import testing

    build = testing.build_tiny_llava_next if family == "llava_next" else testing.build_tiny_llava_onevision
    ckpt = build(tmp_path / family)
    plain = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    hooked = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    hooks.install(hooked)
    processor = AutoProcessor.from_pretrained(ckpt)
    inputs, _, _ = make_inputs(processor, size=(100, 37))  # several tiles + interpolation on OneVision
    with torch.no_grad():
        assert torch.equal(plain(**inputs).logits, hooked(**inputs).logits)
        # and an edit does reach both towers
        with hooks.edited(hooked, hooks.Boost(layers=[0], tower="vision", rows=hooks.Rows.all(), alpha=1.0)):
            assert not torch.equal(plain(**inputs).logits, hooked(**inputs).logits)


def test_a_model_that_declares_no_attention_modules_is_refused():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"_attn_implementation": "sdpa"})()
            self.attn = torch.nn.MultiheadAttention(8, 2)

    with pytest.raises(ValueError, match="declares no attention modules"):
        hooks.attention_modules(Plain())


def _hybrid_llava(out_dir=None):
    """A tiny LLaVA whose LM is Qwen3.5's hybrid stack: Gated DeltaNet (linear attention, no
    AttentionInterface) in layers 0..2, softmax attention in layer 3. Saved with a processor when
    ``out_dir`` is given."""
    from transformers import LlavaForConditionalGeneration, Qwen3_5TextConfig

    from lmms_eval_plugins import testing

    tok = testing.build_tokenizer()
    cfg = testing.tiny_llava_config(
        tok, image_size=32, patch_size=8, vision_hidden=32, vision_layers=2, vision_heads=4,
        text_hidden=64, text_layers=4, text_heads=4, kv_heads=2,
    )  # fmt: skip
    cfg.text_config = Qwen3_5TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=2,
        linear_key_head_dim=16, linear_value_head_dim=16,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    if out_dir is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(out_dir)
        testing.tiny_llava_processor(tok, 32, 8).save_pretrained(out_dir)
    return model


def test_layers_that_bypass_attention_interface_are_refused():
    """A hybrid LM (linear-attention layers between softmax ones): the attention-module list would skip
    layers 0..2, so "layer 0" would silently be layer 3 and edits of the others no-ops. Refused instead,
    naming the layers and their mixer."""
    model = _hybrid_llava()
    message = r"lm layers 0\.\.2 of 4 in LlavaForConditionalGeneration \(Qwen3_5DecoderLayer with linear_attn: Qwen3_5GatedDeltaNet\)"
    with pytest.raises(hooks.UnroutedLayers, match=message):
        hooks.attention_modules(model)
    with pytest.raises(hooks.UnroutedLayers, match="AttentionInterface"):
        hooks.num_layers(model, "vision")  # whichever tower is asked, the model is refused
    with pytest.raises(hooks.UnroutedLayers), hooks.edited(model, hooks.Boost(layers=[0], alpha=1.0)):
        pass


@pytest.mark.parametrize("technique", ["pai", "paint", "knockout", "lochead", "pm", "reprompt", "viral"])
def test_every_wrapper_refuses_a_hybrid_language_model(tmp_path_factory, technique):
    """Each llava_<technique> refuses at construction, naming itself and the layer type (never a silent no-op)."""
    import importlib

    from methods.params import ModelArgsError

    ckpt = tmp_path_factory.getbasetemp() / "hybrid_llava"
    if not (ckpt / "config.json").exists():
        _hybrid_llava(ckpt)
    module = importlib.import_module(f"lmms_eval_plugins.models.{technique}")
    cls = getattr(module, f"Llava{technique.capitalize()}Chat")
    with pytest.raises(ModelArgsError, match=rf"llava_{technique} cannot run on .*Qwen3_5GatedDeltaNet"):
        cls(pretrained=str(ckpt), device="cpu")
