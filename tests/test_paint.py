"""PAINT: selection arithmetic against numpy, edits against an eager reference, the CLI end to end."""

import json

import numpy as np
import pytest
import torch
from conftest import REPO, TASKS, load, make_inputs
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import sdpa_mask

from methods.paint import Paint, head_sensitivity_weights, token_margins
from methods.paint_selection import iqr_outliers, select_local, select_tokens, spatial_grid, spatial_official
from methods.technique import Request

# --- selection arithmetic on hand-made maps ---


def _maps(seed, batch=3, n=36):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, n, generator=g)  # distinct values almost surely: no ties in top-k


def test_local_tokens_are_the_top_fraction():
    attn = _maps(0)
    for ratio in (0.25, 0.1, 1.0):
        got = select_local(attn, ratio)
        k = int(36 * ratio)
        for b in range(attn.shape[0]):
            want = set(np.argsort(-attn[b].numpy())[:k].tolist())
            assert set(got[b].nonzero().flatten().tolist()) == want


def test_summary_tokens_are_iqr_outliers():
    attn = _maps(1, n=50) ** 4  # skewed: a few high values
    attn[0, [3, 17]] = 5.0  # planted outliers
    got = iqr_outliers(attn)
    for b in range(attn.shape[0]):
        x = attn[b].numpy().astype(np.float64)
        q1, q3 = np.percentile(x, 25), np.percentile(x, 75)
        want = {i for i, v in enumerate(x) if v > q3 + 1.5 * (q3 - q1)}
        assert set(got[b].nonzero().flatten().tolist()) == want
    assert {3, 17} <= set(got[0].nonzero().flatten().tolist())


def test_selection_is_per_image_and_disjoint():
    local_attn, summary_attn = _maps(2), _maps(3)
    # plant outliers that are also top local patches in image 0 only
    top0 = torch.argsort(local_attn[0], descending=True)[:2]
    summary_attn[0, top0] = 10.0
    sel = select_tokens(local_attn, summary_attn, (6, 6), top_ratio=0.25, spatial_ratio=0.12)
    for b in range(3):
        top = set(np.argsort(-local_attn[b].numpy())[:9].tolist())
        x = summary_attn[b].numpy().astype(np.float64)
        q1, q3 = np.percentile(x, 25), np.percentile(x, 75)
        summary = {i for i, v in enumerate(x) if v > q3 + 1.5 * (q3 - q1)}
        grid = set(spatial_grid(6, 6, 0.12).nonzero().flatten().tolist())
        assert set(sel.summary[b].nonzero().flatten().tolist()) == summary
        assert set(sel.local[b].nonzero().flatten().tolist()) == top - summary
        assert set(sel.spatial[b].nonzero().flatten().tolist()) == grid - summary - top
    assert not set(top0.tolist()) & set(sel.local[0].nonzero().flatten().tolist())
    margins = token_margins(sel, 0.7, 0.4)
    assert torch.all(margins[sel.summary] == 0.4) and torch.all(margins[sel.local | sel.spatial] == 0.7)
    assert torch.all(margins[~(sel.summary | sel.local | sel.spatial)] == 0)


@pytest.mark.parametrize(
    "gh,gw,ratio,m", [(24, 24, 0.05, 5), (4, 4, 0.3, 2), (8, 8, 0.05, 2), (6, 10, 0.5, 5), (3, 3, 0.01, 1)]
)
def test_spatial_tokens_cover_the_grid(gh, gw, ratio, m):
    mask = spatial_grid(gh, gw, ratio).view(gh, gw)
    mh, mw = min(m, gh), min(m, gw)
    assert int(mask.sum()) == mh * mw
    for i in range(mh):  # exactly one token in every cell of the m x m partition
        for j in range(mw):
            cell = mask[i * gh // mh : (i + 1) * gh // mh, j * gw // mw : (j + 1) * gw // mw]
            assert int(cell.sum()) == 1
    assert not spatial_grid(gh, gw, 0.0).any()


def test_official_spatial_is_top_row_sums_including_cls():
    g = torch.Generator().manual_seed(5)
    probs = torch.rand(2, 3, 17, 17, generator=g)  # (batch, heads, CLS + 16 patches, keys): rows need not sum to 1
    got = spatial_official(probs, n_patches=16, ratio=0.2)  # int(16 * 0.2) = 3 rows
    assert got.shape == (2, 17)
    for b in range(2):
        sums = probs[b].numpy().astype(np.float64).mean(0).sum(-1)
        assert set(got[b].nonzero().flatten().tolist()) == set(np.argsort(-sums)[:3].tolist())
    assert not spatial_official(probs, 16, 0.05).any()  # int(16 * 0.05) = 0
    sel = select_tokens(_maps(7, batch=2, n=16), _maps(8, batch=2, n=16), (4, 4), 0.25, 0.2, got)
    assert sel.local.shape == sel.summary.shape == sel.spatial.shape == (2, 17)
    assert not sel.local[:, 16].any() and not sel.summary[:, 16].any()  # slot 16 (after the image) is spatial only


def test_head_weights_are_sensitivity_over_mean_capped():
    mass = torch.tensor([[[0.1], [0.3], [0.0], [0.8]]])  # (batch 1, heads 4, rows 1)
    w = head_sensitivity_weights(mass, max_scale=1.5)
    want = [min(m / 0.3, 1.5) for m in (0.1, 0.3, 0.0, 0.8)]
    torch.testing.assert_close(w.flatten(), torch.tensor(want))


# --- the technique on a tiny model ---


def _request(model, inputs, image, processor, prompt_len=None):
    ids = inputs["input_ids"]
    return Request(
        input_ids=ids,
        image_token_id=model.config.image_token_id,
        prompt_len=ids.shape[1] if prompt_len is None else prompt_len,
        images=[image],
        processor=processor,
    )


def test_zero_margins_equal_the_baseline(tiny_ckpt, tmp_path):
    model, processor = load(tiny_ckpt)
    plain, _ = load(tiny_ckpt)
    inputs, image, _ = make_inputs(processor)
    req = _request(model, inputs, image, processor)
    gen = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        want = plain.generate(**inputs, **gen)
        want_logits = plain(**inputs).logits
        for extra in ({}, {"save_visuals": str(tmp_path)}):  # with visuals the vision capture is installed
            t = Paint.for_model(model, alpha=0.0, beta=0.0, spatial_ratio=0.2, **extra)
            assert torch.equal(t.generate(model, req, **inputs, **gen), want)
            assert torch.equal(t.forward(model, req, **inputs).logits, want_logits)
    assert (tmp_path / "paint_0000.png").exists()


_REF = {}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention over all rows; PAINT's edit applied to the full score matrix by hand."""
    n_rep = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    scores = query @ k.transpose(2, 3) * scaling
    q_len, k_len = query.shape[2], key.shape[2]
    causal = getattr(module, "is_causal", False)
    if causal:
        q_pos = torch.arange(k_len - q_len, k_len)[:, None]
        scores = scores.masked_fill(torch.arange(k_len)[None, :] > q_pos, float("-inf"))
    if causal and module.layer_idx in _REF.get("layers", ()):
        img, margin = _REF["image_pos"], _REF["margin"]  # margin: per image token
        for r in range(q_len):
            if k_len - q_len + r < _REF["rows_from"]:
                continue
            pre = torch.softmax(scores[0, :, r].float(), dim=-1)
            mass = pre[:, img].sum(-1)
            for h in range(scores.shape[1]):
                w = 1.0 if _REF["mod"] == "none" else min(float(mass[h] / mass.mean()), _REF["cap"])
                for j, p in enumerate(img.tolist()):
                    a = scores[0, h, r, p].clone()
                    scores[0, h, r, p] = a + margin[j] * w * a.abs()
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    return (probs @ v).transpose(1, 2).contiguous(), probs


AttentionInterface.register("test_paint_reference", _reference_attention)
AttentionMaskInterface.register("test_paint_reference", sdpa_mask)


def _reference_margins(ckpt, pixel_values, grid, top_ratio, spatial_ratio, alpha, beta, spatial="grid"):
    """Per-patch margins from the vision tower's own eager attentions, selected with numpy (the
    official spatial rows with torch in float32: their ranking is decided by float32 rounding)."""
    eager, _ = load(ckpt, "eager")
    with torch.no_grad():
        att = eager.model.vision_tower(pixel_values, output_attentions=True).attentions
    local = att[0][0, :, 0, 1:].sum(0).numpy()
    summary = att[-2][0, :, 0, 1:].sum(0).numpy().astype(np.float64)
    n = local.size
    q1, q3 = np.percentile(summary, 25), np.percentile(summary, 75)
    s_set = {i for i in range(n) if summary[i] > q3 + 1.5 * (q3 - q1)}
    l_set = set(np.argsort(-local)[: int(n * top_ratio)].tolist()) - s_set
    gh, gw = grid
    sp_set = set()
    if spatial_ratio:
        m = max(1, round((spatial_ratio * n) ** 0.5))
        centre = [(lo + hi - 1) // 2 for lo, hi in ((i * gh // m, (i + 1) * gh // m) for i in range(m))]
        sp_set = {r * gw + c for r in centre for c in centre}  # square grids in these tests
    if spatial == "official":
        sp_set = set(
            att[0][0].mean(0).sum(-1).topk(int(n * spatial_ratio)).indices.tolist()
        )  # row N+1 = after the image
        n += 1
    margin = [beta if i in s_set else alpha if i in l_set | sp_set else 0.0 for i in range(n)]
    return margin, (l_set, s_set, sp_set)


@pytest.mark.parametrize(
    "ckpt_name,mod,spatial,variant",
    [
        ("tiny_ckpt", "none", 0.0, "grid"),
        ("tiny_ckpt", "sensitivity", 0.3, "grid"),
        ("tiny_mha_ckpt", "sensitivity", 0.0, "grid"),
        ("tiny_ckpt", "none", 1.0, "official"),  # 16 rows of 17, incl. row 16: the token after the image
    ],
)
def test_edit_matches_eager_reference(request, ckpt_name, mod, spatial, variant):
    ckpt = request.getfixturevalue(ckpt_name)
    model, processor = load(ckpt)
    inputs, image, _ = make_inputs(processor)
    prompt_len = inputs["input_ids"].shape[1]
    # a loglikelihood-style forward: the prompt plus a 3-token continuation (every answer row is edited)
    cont = torch.tensor([[9, 10, 11]])
    full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], cont], 1))
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    req = _request(model, full, image, processor, prompt_len=prompt_len)
    t = Paint.for_model(
        model, alpha=3.0, beta=1.5, head_modulation=mod, spatial_ratio=spatial, spatial=variant, max_head_scale=1.7
    )
    with torch.no_grad():
        got = t.forward(model, req, **full).logits
    sel = t.last_selector.selection
    margin, (l_set, s_set, sp_set) = _reference_margins(
        ckpt, inputs["pixel_values"], t.grid, 0.25, spatial, 3.0, 1.5, variant
    )
    assert set(sel.local[0].nonzero().flatten().tolist()) == l_set
    assert set(sel.summary[0].nonzero().flatten().tolist()) == s_set
    assert set(sel.spatial[0].nonzero().flatten().tolist()) == sp_set - l_set - s_set
    assert any(margin)
    if variant == "official":
        assert 16 in sp_set and margin[16] == 3.0  # the key after the image is boosted (official index mapping)
    ref_model, _ = load(ckpt, "test_paint_reference")
    keys = req.image_pos if variant == "grid" else torch.cat([req.image_pos, req.image_pos[-1:] + 1])
    _REF.update(layers=set(t.layers), image_pos=keys, margin=margin, rows_from=prompt_len - 1, mod=mod, cap=1.7)
    try:
        with torch.no_grad():
            want = ref_model(**full).logits
    finally:
        _REF.clear()
    plain, _ = load(ckpt)
    with torch.no_grad():
        base = plain(**full).logits
    print("effect", (want - base).abs().max().item(), "mismatch", (got - want).abs().max().item())
    assert (want - base).abs().max() > 1e-4  # the edit moves the (small, random-model) logits measurably
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)


def test_bad_settings_are_refused(tiny_ckpt):
    from lmms_eval_plugins.models.paint import PARAMS, SPEC
    from methods.params import ModelArgsError, parse_params

    model, _ = load(tiny_ckpt)
    with pytest.raises(ValueError, match="summary_layer=5 is outside the vision tower's 3 layers"):
        Paint.for_model(model, summary_layer=5)
    with pytest.raises(ValueError, match="layer range"):
        Paint.for_model(model, start_layer=9)
    with pytest.raises(ModelArgsError, match="not one of none, sensitivity"):
        parse_params(PARAMS, {"head_modulation": "all"})
    with pytest.raises(ModelArgsError, match="out of range"):
        parse_params(PARAMS, {"top_ratio": 1.5})
    with pytest.raises(ModelArgsError, match="not one of grid, official"):
        parse_params(PARAMS, {"spatial": "lattice"})
    script = parse_params(PARAMS, {"preset": "script"}, SPEC.presets)
    assert (script["alpha"], script["beta"], script["use_cfg"], script["gamma"]) == (0.9, 0.3, True, 1.1)


# --- end to end through the real lmms-eval CLI ---


def test_cli_chat_and_simple(tiny_ckpt, tmp_path):
    from lmms_eval_plugins.testing import read_samples, run_lmms_eval

    vis = tmp_path / "vis"
    args = f"pretrained={tiny_ckpt},head_modulation=sensitivity,spatial_ratio=0.3,save_visuals={vis},max_visuals=2"
    res, log = run_lmms_eval("llava_fia", args, "tiny_yesno", tmp_path / "chat", include_path=TASKS, cwd=REPO)
    assert res is not None, log[-3000:]
    assert "exact,none" in res["results"]["tiny_yesno"], res["results"]
    assert len(read_samples(tmp_path / "chat", "tiny_yesno")) == 3
    assert sorted(p.name for p in vis.iterdir()) == [
        "paint_0000.json",
        "paint_0000.png",
        "paint_0001.json",
        "paint_0001.png",
    ]
    saved = json.loads((vis / "paint_0000.json").read_text())
    assert saved["grid"] == [4, 4] and len(saved["local"]) + len(saved["summary"]) >= 1
    assert "llava_paint recipe" in log

    res, log = run_lmms_eval(
        "llava_paint",
        f"pretrained={tiny_ckpt},preset=script",
        "tiny_yesno_ll,tiny_yesno",
        tmp_path / "simple",
        include_path=TASKS,
        cwd=REPO,
        extra=["--force_simple"],
    )
    assert res is not None, log[-3000:]
    assert "acc,none" in res["results"]["tiny_yesno_ll"], res["results"]
    assert "exact,none" in res["results"]["tiny_yesno"], res["results"]
    assert '"alpha": 0.9' in log


def _shapeworld_ready():
    from lmms_eval_plugins.shapeworld import checkpoint_path

    return (checkpoint_path() / "model.safetensors").exists()


@pytest.mark.skipif(not _shapeworld_ready(), reason="shapeworld-tiny checkpoint not built")
def test_cli_on_shapeworld_tiny(tmp_path):
    from lmms_eval_plugins.testing import run_lmms_eval

    tasks = REPO / "task_configs"
    res, log = run_lmms_eval(
        "llava_paint",
        "pretrained=shapeworld-tiny,preset=full",
        "shapeworld_pope_adversarial,shapeworld_chair",
        tmp_path / "chat",
        include_path=tasks,
        cwd=REPO,
        extra=["--limit", "2"],
    )
    assert res is not None, log[-3000:]
    assert 0 <= res["results"]["shapeworld_pope_adversarial"]["pope_accuracy,none"] <= 1
    assert 0 <= res["results"]["shapeworld_chair"]["coco_cap_chair_i,none"] <= 100
    res, log = run_lmms_eval(
        "llava_paint",
        "pretrained=shapeworld-tiny",
        "shapeworld_pope_random",
        tmp_path / "simple",
        include_path=tasks,
        cwd=REPO,
        extra=["--limit", "2", "--force_simple"],
    )
    assert res is not None, log[-3000:]
    assert 0 <= res["results"]["shapeworld_pope_random"]["pope_accuracy,none"] <= 1


def test_object_patches_marks_covered_cells():
    from lmms_eval_plugins.commands.paint_selection import object_patches

    labels = np.zeros((40, 40), dtype=np.uint8)
    labels[0:10, 0:10] = 1  # all of cell (0, 0)
    labels[10:12, 30:40] = 2  # 20% of cell (1, 3)
    labels[39, 39] = 3  # 1% of cell (3, 3)
    got = object_patches(labels, (4, 4), cover=0.1)
    assert set(np.flatnonzero(got).tolist()) == {0, 1 * 4 + 3}


def test_paper_figures_map_to_lmms_eval_metrics():
    from lmms_eval_plugins.paper_figures import figures_for, paper_figure

    assert paper_figure("llava_paint", "shapeworld_chair", "coco_cap_chair_s").startswith("17.6 (PAINT;")
    assert paper_figure("llava_hf", "coco_cap_chair", "coco_cap_chair_i").startswith("13.8 ")
    assert paper_figure("llava_pai", "shapeworld_chair", "coco_cap_chair_s").startswith("24.6 ")
    assert paper_figure("llava_paint", "shapeworld_pope_random", "pope_accuracy") is None
    rows = figures_for("llava_paint", "shapeworld_chair")
    assert {f.preset for f in rows} >= {"paper", "paper_spatial", "official"}
    assert all(f.differs and f.source for f in rows)
