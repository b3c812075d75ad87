"""VIRAL's loss, projector, grid resampling and teachers, against independent calculations."""

import numpy as np
import pytest
import torch
from PIL import Image

from methods import viral, viral_teachers

from conftest import make_inputs


def test_vra_loss_matches_explicit_cosines():
    torch.manual_seed(0)
    h = torch.randn(2, 3, 5)
    y = torch.randn(2, 3, 4)
    proj = viral.VraProjector(5, 4, hidden=6)
    got = viral.vra_loss(h, y, proj)
    torch.set_grad_enabled(False)
    w = [m for m in proj.net if isinstance(m, torch.nn.Linear)]
    total = 0.0
    for b in range(2):
        for t in range(3):
            x = h[b, t]
            for i, lin in enumerate(w):  # Linear, SiLU, Linear, SiLU, Linear
                x = lin.weight @ x + lin.bias
                if i < 2:
                    x = x * torch.sigmoid(x)
            total += float((x @ y[b, t]) / (x.norm() * y[b, t].norm()))
    torch.set_grad_enabled(True)
    assert got.item() == pytest.approx(-total / 6, abs=1e-6)


def test_projector_shapes():
    proj = viral.VraProjector(64, 48)
    assert proj(torch.zeros(2, 7, 64)).shape == (2, 7, 48)
    assert proj.config() == {"d_model": 64, "d_teacher": 48, "hidden": 2048}


def test_resample_grid_identity_and_bilinear_ramp():
    f = torch.randn(1, 9, 2)
    assert viral.resample_grid(f, (3, 3), (3, 3)) is f
    # a linear ramp over the image plane stays a linear ramp under bilinear upsampling
    # (align_corners=False: output cell centre u maps to input coordinate (u + 0.5) / 2 - 0.5)
    h = w = 4
    ramp = torch.tensor([[[float(i + 10 * j)] for i in range(w) for j in range(h)]]).reshape(1, 16, 1)
    ramp = torch.tensor([[float(r + 10 * c)] for r in range(h) for c in range(w)]).unsqueeze(0)
    up = viral.resample_grid(ramp, (4, 4), (8, 8)).reshape(8, 8)
    for r in range(1, 7):  # interior (the border clamps)
        for c in range(1, 7):
            rr, cc = (r + 0.5) / 2 - 0.5, (c + 0.5) / 2 - 0.5
            assert up[r, c].item() == pytest.approx(rr + 10 * cc, abs=1e-5)
    # shrinking a constant map keeps the constant
    const = torch.full((2, 36, 3), 1.5)
    assert torch.allclose(viral.resample_grid(const, (6, 6), (4, 4)), torch.full((2, 16, 3), 1.5))
    with pytest.raises(ValueError, match="grid"):
        viral.resample_grid(torch.zeros(1, 10, 2), (3, 3), (2, 2))


def test_image_token_features_keeps_matching_samples_only():
    ids = torch.tensor([[1, 9, 9, 2], [1, 9, 2, 2], [1, 2, 3, 4], [9, 9, 5, 6]])
    hidden = torch.arange(4 * 4 * 2, dtype=torch.float).reshape(4, 4, 2)
    feats, keep = viral.image_token_features(hidden, ids, 9, n_grid=2)
    assert keep.tolist() == [0, 3]
    assert torch.equal(feats[0], hidden[0, 1:3]) and torch.equal(feats[1], hidden[3, 0:2])
    feats, keep = viral.image_token_features(hidden, ids, 9, n_grid=3)
    assert keep.numel() == 0 and feats.shape == (0, 3, 2)


def _batch(processor, texts=("is there a red circle in the image?", "what color is the square?")):
    """A two-sample training batch with an image each; labels on the answer word only."""
    ids, pix, labels = [], [], []
    for k, text in enumerate(texts):
        inputs, _, _ = make_inputs(processor, text, color=(200, 30 + 90 * k, 30))
        ids.append(inputs["input_ids"][0])
        pix.append(inputs["pixel_values"][0])
    n = max(len(x) for x in ids)
    input_ids = torch.stack([torch.cat([x, torch.full((n - len(x),), processor.tokenizer.pad_token_id)]) for x in ids])
    mask = torch.stack([torch.cat([torch.ones(len(x)), torch.zeros(n - len(x))]) for x in ids]).long()
    labels = input_ids.clone()
    labels[:, :-3] = -100
    labels[mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": torch.stack(pix), "labels": labels}


def test_capture_layer_output_is_hidden_states_l(tiny):
    model, processor, inputs = tiny
    n = len(viral.decoder_layers(model))
    with torch.no_grad():
        ref = model(**inputs, output_hidden_states=True).hidden_states
        for layer in range(1, n):  # the last hidden_states entry is after the final norm
            with viral.capture_layer_output(model, layer) as box:
                model(**inputs)
            assert torch.allclose(box[0], ref[layer], atol=1e-6)
    with pytest.raises(ValueError, match="outside 1..4"):
        with viral.capture_layer_output(model, 5):
            pass


def test_viral_step_equals_independent_loss_and_weight_zero_is_lm_loss(tiny):
    model, processor, _ = tiny
    batch = _batch(processor)
    torch.manual_seed(1)
    n_grid = viral.grid_count(model)
    targets = torch.randn(2, n_grid, 12)
    proj = viral.VraProjector(model.config.text_config.hidden_size, 12, hidden=16)
    layer = 2
    got = viral.viral_step(model, batch, projector=proj, targets=targets, layer=layer, weight=0.5)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    h = out.hidden_states[layer]
    img = batch["input_ids"] == model.config.image_token_id
    cos = []
    for b in range(2):
        pred = proj(h[b][img[b]])
        cos += [float(pred[t] @ targets[b, t] / (pred[t].norm() * targets[b, t].norm())) for t in range(n_grid)]
    expected_vra = -sum(cos) / len(cos)
    assert got["vra_loss"].item() == pytest.approx(expected_vra, abs=1e-5)
    assert got["lm_loss"].item() == pytest.approx(out.loss.item(), abs=1e-6)
    assert got["loss"].item() == pytest.approx(out.loss.item() + 0.5 * expected_vra, abs=1e-5)
    assert got["n_aligned"] == 2
    zero = viral.viral_step(model, batch, projector=proj, targets=targets, layer=layer, weight=0.0)
    assert torch.equal(zero["loss"], model(**batch).loss) and zero["vra_loss"] is None


def test_text_only_batch_has_no_vra_term(tiny):
    model, processor, _ = tiny
    enc = processor.tokenizer(["is there a red circle ?"], return_tensors="pt")
    batch = {**enc, "labels": enc["input_ids"].clone()}
    proj = viral.VraProjector(64, 8, hidden=8)
    got = viral.viral_step(model, batch, projector=proj, targets=torch.randn(1, 16, 8), layer=2, weight=0.5)
    assert got["vra_loss"] is None and got["n_aligned"] == 0
    assert torch.equal(got["loss"], model(**batch).loss)


def test_gradient_reaches_layers_up_to_l_and_projector_not_teacher(tiny, tmp_path):
    model, processor, _ = tiny
    batch = _batch(processor)
    teacher = viral_teachers.BackboneTeacher.from_pretrained(_save_tiny_dinov2(tmp_path / "dino"))
    mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
    targets = viral_teachers.teacher_targets(teacher, batch["pixel_values"], mean, std, viral.llm_grid(model))
    proj = viral.VraProjector(64, teacher.dim, hidden=16)
    layer = 2
    model.zero_grad()
    got = viral.viral_step(model, batch, projector=proj, targets=targets, layer=layer, weight=0.5)
    got["vra_loss"].backward()  # the alignment term alone
    layers = viral.decoder_layers(model)

    def grad_norm(mod):
        return sum(float(p.grad.abs().sum()) for p in mod.parameters() if p.grad is not None)

    for i, dec in enumerate(layers):
        if i < layer:
            assert grad_norm(dec) > 0, f"decoder layer {i} gets no gradient"
        else:
            assert grad_norm(dec) == 0, f"decoder layer {i} is after layer {layer} but gets gradient"
    assert grad_norm(proj) > 0
    assert grad_norm(model.model.multi_modal_projector) > 0  # the image tokens' own path
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is frozen
    assert not targets.requires_grad
    self_targets = viral_teachers.teacher_targets(
        viral_teachers.EncoderTeacher(model), batch["pixel_values"], mean, std, (4, 4)
    )
    assert not self_targets.requires_grad  # the own-encoder teacher's targets carry no gradient either


def _save_tiny_dinov2(path, image_size=32, patch=8, hidden=24, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)):
    import json

    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(3)
    cfg = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        image_size=image_size,
        patch_size=patch,
    )
    Dinov2Model(cfg).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(
        json.dumps(
            {"image_mean": list(mean), "image_std": list(std), "crop_size": {"height": image_size, "width": image_size}}
        )
    )
    return path


def test_backbone_teacher_uses_its_own_normalisation(tmp_path, tiny):
    model, processor, _ = tiny
    path = _save_tiny_dinov2(tmp_path / "dino")
    teacher = viral_teachers.BackboneTeacher.from_pretrained(path)
    assert (teacher.image_size, teacher.patch_size, teacher.dim) == (32, 8, 24)
    # an image at the LLaVA input size: the CLIP processor only rescales and normalises it
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    pix = processor.image_processor(images=[Image.fromarray(arr)], return_tensors="pt")["pixel_values"]
    feats, grid = teacher.features(pix, processor.image_processor.image_mean, processor.image_processor.image_std)
    own = (
        torch.tensor(arr, dtype=torch.float32).permute(2, 0, 1)[None] / 255
        - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    ) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = teacher.backbone(pixel_values=own).last_hidden_state[:, 1:]
    assert grid == (4, 4) and torch.allclose(feats, ref, atol=1e-4)
    assert not any(p.requires_grad for p in teacher.parameters())
    # a teacher at another resolution is resampled to the LLM grid
    small = viral_teachers.BackboneTeacher.from_pretrained(path, image_size=16)
    y = viral_teachers.teacher_targets(
        small, pix, processor.image_processor.image_mean, processor.image_processor.image_std, (4, 4)
    )
    assert y.shape == (1, 16, 24)
    with pytest.raises(FileNotFoundError, match="config.json"):
        viral_teachers.BackboneTeacher.from_pretrained(tmp_path)


def test_encoder_teacher_is_the_towers_feature_layer(tiny):
    model, processor, inputs = tiny
    teacher = viral_teachers.load_teacher("self", model)
    feats, grid = teacher.features(inputs["pixel_values"])
    with torch.no_grad():
        ref = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
    assert grid == (4, 4) and torch.allclose(feats, ref) and teacher.dim == 32
    assert viral_teachers.load_teacher("none", model) is None


def test_teacher_pixels_reproduce_the_llava_processor_geometry(tiny):
    """Re-processing the original image with the teacher's path at the LLaVA size and CLIP
    statistics gives the LLaVA processor's pixels: same resize, same crop, same field of view."""
    _, processor, _ = tiny
    rng = np.random.default_rng(1)
    for size in ((40, 30), (30, 52)):
        img = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
        ip = processor.image_processor
        want = ip(images=[img], return_tensors="pt")["pixel_values"]
        got = viral_teachers.teacher_pixels([img], 32, ip.image_mean, ip.image_std, viral_teachers.crop_fraction(ip))
        assert got.shape == want.shape and torch.allclose(got, want, atol=2e-2), (
            (got - want).abs().max()
        )  # <= one 8-bit grey level


@pytest.mark.parametrize("kind", ["sam", "depth_anything"])
def test_other_local_teachers_load_and_give_patch_features(kind, tmp_path):
    """Tiny random SAM (vision encoder: a feature map after its neck) and Depth Anything (its DINOv2
    backbone's last stage) saved locally load as backbone teachers and give one feature per patch."""
    from PIL import Image
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        SamConfig,
        SamModel,
        SamVisionConfig,
    )

    if kind == "sam":
        vc = SamVisionConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            output_channels=8,
            image_size=64,
            patch_size=16,
            mlp_dim=32,
            global_attn_indexes=[1],
            window_size=2,
        )
        SamModel(SamConfig(vision_config=vc.to_dict())).save_pretrained(tmp_path)
        want_grid, want_dim = (4, 4), 8
    else:
        bb = Dinov2Config(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
            out_indices=[2],
            reshape_hidden_states=False,
        )
        cfg = DepthAnythingConfig(
            backbone_config=bb.to_dict(),
            neck_hidden_sizes=[8],
            fusion_hidden_size=8,
            reassemble_factors=[1],
            head_hidden_size=8,
        )
        DepthAnythingForDepthEstimation(cfg).save_pretrained(tmp_path)
        want_grid, want_dim = (4, 4), 16
    teacher = viral_teachers.BackboneTeacher.from_pretrained(tmp_path)
    feats, grid = teacher.features_from_images([Image.new("RGB", (50, 40), (200, 30, 30))])
    assert grid == want_grid and feats.shape == (1, want_grid[0] * want_grid[1], want_dim) and teacher.dim == want_dim
    assert torch.isfinite(feats).all()
    targets = viral_teachers.teacher_targets_from_images(teacher, [Image.new("RGB", (50, 40))], (3, 3))
    assert targets.shape == (1, 9, want_dim)


def two_step_config(pretrained, output_dir, teacher, layer: int):
    """The viral-train settings of the families' two-step tests: a small LoRA, a 16-wide VRA projector, lr 5e-2."""
    from methods.viral_train import TrainConfig

    return TrainConfig(
        pretrained=str(pretrained),
        data="",
        output_dir=str(output_dir),
        teacher=str(teacher),
        layer=layer,
        weight=0.5,
        proj_hidden=16,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        lr=5e-2,
        batch_size=2,
        max_steps=2,
        log_every=1,
        progress=False,
        warmup_ratio=0.0,
    )


def assert_two_finite_steps(run, projector: str) -> None:
    """Two logged steps with a finite VRA loss, and the adapter saved with the family's projector trained fully."""
    import json
    import math

    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(row["vra_loss"] is not None and math.isfinite(row["vra_loss"]) for row in log)
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == [projector]
