"""shapeworld-llava: the testbed in LLaVA-1.5's own geometry (issue 24).

The training command runs end to end on a small configuration, and a run stopped and resumed
ends where an uninterrupted one does; the shipped checkpoint has LLaVA-1.5's geometry and loads
through stock ``llava_hf`` and through a wrapper in the real lmms-eval CLI."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lmms_eval_plugins.paths import CHECKPOINTS, tasks_dir
from lmms_eval_plugins.shapeworld import train
from lmms_eval_plugins.testing import read_samples, run_lmms_eval

CKPT = CHECKPOINTS["shapeworld-llava"]
SMALL = [
    "--arch",
    "llava-1.5",
    "--geometry",
    "image_size=56,text_layers=2,vision_layers=1",
    "--pool-size",
    "24",
    "--vision-steps",
    "3",
    "--align-steps",
    "2",
    "--mix-steps",
    "6",
    "--fine-steps",
    "3",
    "--batch",
    "4",
    "--probe-size",
    "8",
    "--save-every",
    "2",
    "--eval-limit",
    "0",
    "--threads",
    "1",
]


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def test_training_command_resumes_where_it_stopped(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(["--out", str(straight), *SMALL])
    # stopped inside the coarse phase, resumed across the switch to the full grid
    train.main(["--out", str(resumed), *SMALL, "--stop-after", "3"])
    assert (resumed / "training_state.pt").is_file() and not (resumed / "model.safetensors").exists()
    train.main(["--out", str(resumed), *SMALL, "--resume"])
    assert not (resumed / "training_state.pt").exists()  # the finished run cleans its state
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), rtol=0, atol=1e-4, msg=k)  # fp16-saved weights
    # the resumed run really trained past the stop: its weights moved from the stopped state
    from lmms_eval_plugins.shapeworld.model import build_model

    model, processor = build_model(0, train.parse_geometry("llava-1.5", "image_size=56,text_layers=2,vision_layers=1"))
    train.save_checkpoint(model, processor, tmp_path / "fresh")
    fresh = _weights(tmp_path / "fresh")
    assert fresh.keys() == b.keys()
    assert (
        max((b[k].float() - fresh[k].float()).abs().max().item() for k in b) > 1e-3
    )  # 8 steps at lr 1e-3: 40x the tolerance above


def test_init_from_starts_a_further_run_from_a_checkpoint(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    train.main(["--out", str(first), *SMALL])
    # a further run of zero steps saves exactly the weights it started from
    zero = ["--vision-steps", "0", "--align-steps", "0", "--mix-steps", "0", "--fine-steps", "0"]
    train.main(["--out", str(second), *SMALL, *zero, "--init-from", str(first)])
    a, b = _weights(first), _weights(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = SMALL.copy()
    other[other.index("--geometry") + 1] = "image_size=56,text_layers=3,vision_layers=1"
    with pytest.raises(SystemExit, match="config differs"):
        train.main(["--out", str(tmp_path / "third"), *other, "--init-from", str(first)])


def test_resume_refuses_a_corrupt_state(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "training_state.pt").write_bytes(b"not a state")
    with pytest.raises(SystemExit, match="not a readable training state"):
        train.main(["--out", str(out), *SMALL, "--resume"])


def test_geometry_overrides_are_checked():
    with pytest.raises(SystemExit, match="KEY=INT"):
        train.parse_geometry("llava-1.5", "image_sise=56")


def test_progressive_pool_downsamples_like_the_processor():
    """The coarse grid's pixels (a resize of the normalised 336 px pixels) match what the processor
    makes of the same scene at 168 px, up to the processor's 8-bit rounding of the resized image."""
    from lmms_eval_plugins.shapeworld.model import GEOMETRIES, build_processor
    from lmms_eval_plugins.shapeworld.scenes import TRAIN_WORLD, derive_seed, sample_scene

    geometry = GEOMETRIES["llava-1.5"]
    processor = build_processor(geometry)
    pool = train.ProgressivePool(2, "fit", TRAIN_WORLD, processor, geometry, {12, 24}, log=lambda m: None)
    pool.grid = 12
    small = pool.pixels(torch.tensor([0, 1]))
    assert small.shape == (2, 3, 168, 168)
    img = sample_scene(derive_seed("fit", 0), TRAIN_WORLD).render()
    import dataclasses

    ref = build_processor(dataclasses.replace(geometry, image_size=168)).image_processor(
        images=[img], return_tensors="pt"
    )["pixel_values"]
    assert (small[0] - ref[0]).abs().mean() < 0.05  # normalised units (std 1); a wrong scene or layout is ~1
    boxes, mask = pool.box_targets(torch.tensor([0]))
    assert boxes.shape == (1, 144, 4) and mask.any() and (boxes[mask] > 0).any()


@pytest.mark.skipif(not (CKPT / "model.safetensors").exists(), reason="shapeworld-llava not built")
def test_shipped_checkpoint_has_llava15_geometry():
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(CKPT)
    assert config.vision_config.image_size == 336 and config.vision_config.patch_size == 14
    assert config.image_seq_length == 576 and config.vision_feature_layer == -2
    assert config.vision_feature_select_strategy == "default" and config.projector_hidden_act == "gelu"
    assert config.text_config.model_type == "llama" and config.text_config.num_hidden_layers >= 8
    processor = AutoProcessor.from_pretrained(CKPT)
    from PIL import Image

    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a star in the image?"}]}],
        add_generation_prompt=True,
    )
    assert text.startswith("USER: <image>\n") and text.endswith(" ASSISTANT:")
    ids = processor(images=[Image.new("RGB", (336, 336))], text=[text], return_tensors="pt")["input_ids"]
    assert int((ids == config.image_token_id).sum()) == 576
    info = json.loads((CKPT / "train_info.json").read_text())
    assert "--arch llava-1.5" in info["command"] and info["hardware"]


@pytest.mark.skipif(not (CKPT / "model.safetensors").exists(), reason="shapeworld-llava not built")
@pytest.mark.parametrize("model, name", [("llava_hf", str(CKPT)), ("llava_pai", "shapeworld-llava")])
def test_stock_llava_hf_and_a_wrapper_load_it_in_the_cli(tmp_path, model, name):
    results, out = run_lmms_eval(
        model,
        f"pretrained={name},device_map=cpu,device=cpu",
        "shapeworld_pope_random,shapeworld_rec",
        tmp_path,
        include_path=tasks_dir(),
        extra=("--limit", "3"),
    )
    assert results is not None, out[-3000:]
    assert 0.0 <= results["results"]["shapeworld_pope_random"]["pope_accuracy,none"] <= 1.0
    assert 0.0 <= results["results"]["shapeworld_rec"]["refcoco_IoU,none"] <= 1.0
    answers = [r["filtered_resps"][0] for r in read_samples(tmp_path, "shapeworld_pope_random")]
    assert len(answers) == 3 and all(a.strip() for a in answers), answers  # an error inside generate would be ""
