"""VIRAL beyond LLaVA-1.5: Qwen2.5-VL (the merged tokens, a rows x cols grid) and LLaVA-NeXT (the
base block only), on the tiny random models of tests/test_qwen.py and lmms_eval_plugins.testing.

The VRA loss against an independent calculation (image hidden states reshaped to the grid, the
teacher map resampled by hand-written bilinear interpolation); a short viral-train on Qwen whose
adapter qwen2_5_vl_viral merges (it changes the logits; a zero-B adapter leaves stock outputs);
NeXT aligns exactly the base block's positions; qwen2_5_vl_viral through the real lmms-eval CLI."""

import math

import pytest
import torch
from test_qwen import PIXELS, _cli, _image, _inputs, _wrapper, stock, tiny_qwen  # noqa: F401 (fixtures)
from test_viral import _save_tiny_dinov2, assert_two_finite_steps, two_step_config

from methods import viral
from methods.conversation_data import ConversationDataset, collate
from methods.viral_train import TrainConfig, train

SIZES = ((100, 37), (37, 100))  # Qwen at PIXELS: merged grids 3x7 and 7x3


def _records(sizes=SIZES, answer="yes"):
    return [
        {
            "image": _image(size),
            "conversations": [
                {"from": "human", "value": "<image>\nis there a red square in the image?"},
                {"from": "gpt", "value": answer},
            ],
        }
        for size in sizes
    ]


def _batch(processor, records):
    data = ConversationDataset(records, processor)
    return collate([data[i] for i in range(len(records))], processor.tokenizer.pad_token_id)


def _bilinear(fmap, out_h, out_w):
    """(h, w, C) -> (out_h, out_w, C), bilinear with half-pixel centres (align_corners=False), upsampling only."""
    h, w, _ = fmap.shape

    def taps(i, n_in, n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        return i0, min(i0 + 1, n_in - 1), src - i0

    out = torch.zeros(out_h, out_w, fmap.shape[2], dtype=torch.float64)
    for r in range(out_h):
        r0, r1, a = taps(r, h, out_h)
        for c in range(out_w):
            c0, c1, b = taps(c, w, out_w)
            out[r, c] = (
                (1 - a) * (1 - b) * fmap[r0, c0]
                + (1 - a) * b * fmap[r0, c1]
                + a * (1 - b) * fmap[r1, c0]
                + a * b * fmap[r1, c1]
            )
    return out


def test_vra_loss_on_qwen_merged_tokens_equals_an_independent_calculation(tiny_qwen):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen).eval()
    processor = AutoProcessor.from_pretrained(tiny_qwen)
    batch = _batch(processor, _records())
    grids = [(int(t[1]) // 2, int(t[2]) // 2) for t in batch["image_grid_thw"]]
    assert grids == [(3, 7), (7, 3)]  # non-square, and different per sample
    aligned = viral.aligned_tokens(model.config, batch)
    assert [a.grid for a in aligned] == grids and all(a.whole_image for a in aligned)

    torch.manual_seed(0)
    d_teacher, src = 6, (2, 2)
    teacher = torch.randn(2, src[0] * src[1], d_teacher)  # each sample's teacher map on its own 2x2 grid
    targets = [viral.resample_grid(teacher[b : b + 1], src, grids[b])[0] for b in range(2)]
    proj = viral.VraProjector(model.config.text_config.hidden_size, d_teacher, hidden=16)
    layer = 2
    with torch.no_grad():
        got = viral.viral_step(model, batch, projector=proj, targets=targets, layer=layer, weight=0.5)
        out = model(**batch, output_hidden_states=True)
    cos = []
    for b, (rows, cols) in enumerate(grids):
        img = batch["input_ids"][b] == model.config.image_token_id
        h = out.hidden_states[layer][b][img].reshape(rows, cols, -1)  # the merged tokens are row-major
        y = _bilinear(teacher[b].reshape(*src, d_teacher).double(), rows, cols)
        p = proj(h).double()
        cos += [float(p[r, c] @ y[r, c] / (p[r, c].norm() * y[r, c].norm())) for r in range(rows) for c in range(cols)]
    expected = -sum(cos) / len(cos)  # the mean over every aligned image token of the batch
    assert got["vra_loss"].item() == pytest.approx(expected, abs=1e-5)
    assert got["loss"].item() == pytest.approx(out.loss.item() + 0.5 * expected, abs=1e-5)
    assert got["n_aligned"] == 2


@pytest.fixture(scope="module")
def qwen_run(tiny_qwen, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_viral")
    cfg = two_step_config(tiny_qwen, root / "run", _save_tiny_dinov2(root / "teacher"), 2)
    result = train(cfg, _records(SIZES + ((48, 40), (64, 64))))
    return root / "run", result


def test_viral_train_on_qwen_gives_an_adapter_that_qwen2_5_vl_viral_merges(qwen_run, tiny_qwen, stock, tmp_path):
    run, result = qwen_run
    assert_two_finite_steps(run, "merger")  # Qwen's multimodal projector: the vision merger
    lm = _wrapper("viral", tiny_qwen, adapter=str(run))
    inputs = _inputs(lm.processor)
    with torch.no_grad():
        assert not torch.equal(lm.model(**inputs).logits, stock[2])
    # a zero-B adapter (peft's init) merged in: the stock model, bit for bit
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen)
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=viral_targets())).save_pretrained(
        tmp_path / "zero"
    )
    idle = _wrapper("viral", tiny_qwen, adapter=str(tmp_path / "zero"))
    with torch.no_grad():
        answer = idle.model.generate(**inputs, max_new_tokens=6, do_sample=False)
        logits = idle.model(**inputs).logits
    assert torch.equal(answer, stock[1]) and torch.equal(logits, stock[2])


def viral_targets():
    from methods.viral_setup import LM_TARGETS

    return LM_TARGETS


def test_qwen_refuses_the_llava_only_teachers(tiny_qwen, tmp_path):
    cfg = TrainConfig(pretrained=str(tiny_qwen), data="", output_dir=str(tmp_path), teacher="self", progress=False)
    with pytest.raises(ValueError, match="LLaVA-1.5 only.*--teacher DIR"):
        train(cfg, _records())


def test_next_aligns_exactly_the_base_block(tmp_path):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from lmms_eval_plugins.testing import build_tiny_llava_next

    ckpt = build_tiny_llava_next(tmp_path / "next")
    model = LlavaNextForConditionalGeneration.from_pretrained(ckpt).eval()
    processor = AutoProcessor.from_pretrained(ckpt)
    batch = _batch(processor, _records(((100, 37), (40, 40))))  # 4 and 2 crops: padded to 4 in the batch
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    aligned = viral.aligned_tokens(model.config, batch)
    for b, a in enumerate(aligned):
        img = (batch["input_ids"][b] == model.config.image_token_id).nonzero().flatten()
        assert img.numel() > side * side  # the high-res block and its newlines follow
        assert a.grid == (side, side) and torch.equal(
            a.positions, img[: side * side]
        )  # the first side^2: the base block
    torch.manual_seed(0)
    targets = torch.randn(2, side * side, 5)
    proj = viral.VraProjector(model.config.text_config.hidden_size, 5, hidden=8)
    with torch.no_grad():
        got = viral.viral_step(model, batch, projector=proj, targets=targets, layer=2, weight=1.0)
        h = model(**batch, output_hidden_states=True).hidden_states[2]
    img = batch["input_ids"] == model.config.image_token_id
    feats = torch.stack([h[b][img[b]][: side * side] for b in range(2)])
    expected = -torch.nn.functional.cosine_similarity(proj(feats), targets, dim=-1).mean()
    assert got["vra_loss"].item() == pytest.approx(expected.item(), abs=1e-6)


def test_qwen2_5_vl_viral_through_the_lmms_eval_cli(qwen_run, tiny_qwen, tmp_path):
    run, _ = qwen_run
    res, log, samples = _cli("qwen2_5_vl_viral", tiny_qwen, tmp_path / "viral", extra=f",adapter={run}")
    assert res is not None and len(samples) == 3, log[-3000:]
    assert 0.0 <= res["results"]["tiny_yesno"]["exact,none"] <= 1.0
