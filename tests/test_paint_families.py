"""PAINT on vision towers without CLS: the CLS-free candidate (selection_source=received), its
arithmetic against independent calculations, its agreement statistics, and the refusals it did
not lift (it does not reproduce the CLS selection where CLS exists: docs/paint.md)."""

import numpy as np
import pytest
import torch
from conftest import load, make_inputs

from lmms_eval_plugins.commands.paint_selection import chance_jaccard, jaccard, spearman
from methods.params import ModelArgsError
from methods.paint import NO_CLS_MEASURED, Paint, token_margins
from methods.paint_selection import TokenSelector, received_attention
from methods.technique import Request


def _probs(seed, shape):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=g) * 2, dim=-1)


@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (1, 2, 3, 7)])  # a square call and one with fewer queries than keys
def test_received_attention_is_the_head_summed_mean_received_share_times_the_key_count(shape):
    probs = _probs(0, shape)
    got = received_attention(probs)
    b, h, q, k = shape
    want = np.zeros((b, k))
    p = probs.double().numpy()
    for i in range(b):
        for key in range(k):
            want[i, key] = sum(p[i, head, row, key] for head in range(h) for row in range(q)) / q * k
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    uniform = received_attention(torch.full((1, 2, 4, 6), 1 / 6))
    torch.testing.assert_close(uniform, torch.full((1, 6), 2.0))  # a uniform head gives 1 per key


def test_received_selection_from_the_tower_matches_an_eager_reference(tiny_ckpt):
    """Through the hook layer inside Paint's own forward: patch queries and patch keys only (CLS
    left out of both), top 25% of layer 0 as local, IQR outliers of the penultimate layer as summary."""
    model, processor = load(tiny_ckpt)
    inputs, image, _ = make_inputs(processor)
    ids = inputs["input_ids"]
    req = Request(
        input_ids=ids,
        image_token_id=model.config.image_token_id,
        prompt_len=ids.shape[1],
        images=[image],
        processor=processor,
    )
    t = Paint.for_model(model, selection_source="received", alpha=1.0, beta=0.5, start_layer=0)
    with torch.no_grad():
        t.forward(model, req, **inputs)
    selector = t.last_selector
    sel = selector.current()

    eager, _ = load(tiny_ckpt, "eager")
    with torch.no_grad():
        att = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    n_layers = len(att)
    score = {}
    for name, layer in (("local", 0), ("summary", n_layers - 2)):
        p = att[layer][0, :, 1:, 1:].double().numpy()  # (heads, patches, patches) without CLS
        score[name] = p.sum(axis=0).mean(axis=0) * p.shape[-1]
    n = score["local"].size
    q1, q3 = np.percentile(score["summary"], 25), np.percentile(score["summary"], 75)
    summary = {i for i in range(n) if score["summary"][i] > q3 + 1.5 * (q3 - q1)}
    local = set(np.argsort(-score["local"])[: int(n * 0.25)].tolist()) - summary
    assert set(sel.summary[0].nonzero().flatten().tolist()) == summary
    assert set(sel.local[0].nonzero().flatten().tolist()) == local
    assert local  # the test selects something
    # the language-model edit boosts exactly this selection
    boost = t.recipe(model, req)[-1]
    boost.selector = selector
    torch.testing.assert_close(boost.margins(), token_margins(sel, 1.0, 0.5))


def test_received_needs_patch_rows_without_cls():
    sel = TokenSelector(0, 1, (2, 2), 0.25, 0.0, source="received")
    assert sel.capture.rows.start == 1 and sel.capture.keys == slice(1, None)
    with pytest.raises(ValueError, match="selection_source='bogus'"):
        Paint(4, 3, (2, 2), selection_source="bogus")
    with pytest.raises(ValueError, match="use spatial=grid"):
        Paint(4, 3, (2, 2), selection_source="received", spatial="official", spatial_ratio=0.5)


def test_agreement_statistics():
    a = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.7])
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # ranks (0, 2, 1, 4, 3) vs (4, 3, 2, 1, 0): 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 6 * 36 / 120
    assert spearman(a, torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])) == pytest.approx(1 - 6 * 36 / 120)
    x = np.array([1, 1, 0, 0, 1], dtype=bool)
    y = np.array([0, 1, 1, 0, 1], dtype=bool)
    assert jaccard(x, y) == pytest.approx(2 / 4)
    assert chance_jaccard(64, 16, 16) == pytest.approx(4 / 28)  # E|A&B| = 16*16/64 = 4, E|A|B| = 28


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_towers_without_cls_are_refused_with_the_measured_reason(tmp_path, family):
    """Config-only checkpoints: the refusal comes before any weight is loaded."""
    if family == "llava_onevision":
        from transformers import LlavaOnevisionConfig as Config

        from lmms_eval_plugins.models.paint import LlavaPaintChat as Wrapper
    else:
        from transformers import Qwen2_5_VLConfig as Config

        from lmms_eval_plugins.models.qwen2_5_vl import Qwen25VlPaintChat as Wrapper
    Config().save_pretrained(tmp_path)
    with pytest.raises(ModelArgsError, match=f"paint does not support {family} checkpoints") as err:
        Wrapper(pretrained=str(tmp_path), device="cpu")
    assert "no CLS token" in str(err.value) and NO_CLS_MEASURED in str(err.value)
    assert "Jaccard 0.09" in NO_CLS_MEASURED  # the numbers docs/paint.md reports


# `lmms-plugins paint-selection` on each family: the tower crop llava_paint reads, or PAINT's refusal
@pytest.fixture(scope="module")
def selection_ckpts(tmp_path_factory):
    from lmms_eval_plugins import testing

    root = tmp_path_factory.mktemp("paint_selection")
    return {
        "llava": testing.build_tiny_llava(root / "llava"),
        "llava_next": testing.build_tiny_llava_next(root / "llava_next"),
        "qwen3_vl": testing.build_tiny_qwen3_vl(root / "qwen3_vl"),
        "internvl": testing.build_tiny_internvl(root / "internvl"),
    }


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_paint_selection_reads_the_cls_of_the_crop_llava_paint_reads(family, selection_ckpts, tmp_path):
    """The command's local and summary tokens = PAINT's rule computed here from an eager tower's CLS attention on the
    crop that sees the whole image (LLaVA-1.5's only crop, LLaVA-NeXT's base crop 0): summary = values above
    Q3 + 1.5 IQR in the penultimate layer, local = the top 25% in layer 0 minus summary."""
    import json

    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    from lmms_eval_plugins.cli import main
    from lmms_eval_plugins.commands.paint_selection import object_patches
    from lmms_eval_plugins.shapeworld import data

    ckpt, limit = selection_ckpts[family], 3
    out = tmp_path / "selection.json"
    assert main(["paint-selection", "--pretrained", str(ckpt), "--limit", str(limit), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())

    model = AutoModelForImageTextToText.from_pretrained(ckpt, attn_implementation="eager").eval()
    image_processor = AutoImageProcessor.from_pretrained(ckpt)
    vc = model.config.vision_config
    side = vc.image_size // vc.patch_size
    counts = {"local": [0, 0], "summary": [0, 0]}  # (on an object, selected) over the scenes
    for doc in data.chair_docs("test")[:limit]:
        image, labels = data.sample_scene(int(doc["scene_seed"]), data.WORLDS[doc["world"]]).render(with_labels=True)
        pixels = image_processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"]
        if family == "llava_next":
            pixels = pixels[:, 0]  # the base crop: the whole image at the tower's resolution
        with torch.no_grad():
            att = model.model.vision_tower(pixels, output_attentions=True).attentions
        cls = [a[0, :, 0, 1:].sum(0).double().numpy() for a in att]
        q1, q3 = np.percentile(cls[-2], [25, 75])
        summary = set(np.flatnonzero(cls[-2] > q3 + 1.5 * (q3 - q1)).tolist())
        local = set(np.argsort(-cls[0])[: side * side // 4].tolist()) - summary
        on_object = object_patches(labels, (side, side), 0.1)
        for kind, chosen in (("local", local), ("summary", summary)):
            counts[kind][0] += sum(bool(on_object[i]) for i in chosen)
            counts[kind][1] += len(chosen)
    for kind, (hit, n) in counts.items():
        assert rows[kind]["tokens_per_image"] == pytest.approx(n / limit, abs=1e-9)
        assert rows[kind]["on_object"] == pytest.approx(hit / max(n, 1), abs=1e-9)
    assert counts["local"][1] > 0 and counts["summary"][1] > 0


@pytest.mark.parametrize(
    "family, reason",
    [("qwen3_vl", "Qwen3-VL .*has no CLS token"), ("internvl", r"InternVL \(HF\) .*merge 4 patches")],
)
def test_paint_selection_refuses_the_families_paint_refuses(family, reason, selection_ckpts):
    from lmms_eval_plugins.cli import main

    with pytest.raises(SystemExit, match=f"paint-selection: PAINT does not run on {reason}") as err:
        main(["paint-selection", "--pretrained", str(selection_ckpts[family]), "--limit", "1"])
    assert "It runs on LLaVA-1.5, LLaVA-NeXT" in str(err.value)
