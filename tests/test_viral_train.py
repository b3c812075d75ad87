"""VIRAL training end to end on a tiny random LLaVA (CPU), resuming, merging, and the real lmms-eval CLI."""

import json
import math
import shutil

import pytest
import torch
from conftest import REPO, make_inputs
from PIL import Image

from lmms_eval_plugins.testing import read_samples, run_lmms_eval
from methods import viral
from methods.viral_train import TrainConfig, train

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200), "yellow": (220, 200, 20)}


def _data(root):
    """Eight images; the assistant always answers "yes" to the tiny_yesno question."""
    (root / "img").mkdir(parents=True)
    records = []
    for i, (_name, rgb) in enumerate(list(COLOURS.items()) * 2):
        Image.new("RGB", (40, 36), rgb).save(root / "img" / f"{i}.png")
        q = f"<image>\nis there a {list(COLOURS)[(i + 1) % 4]} square in the image?"
        records.append(
            {"image": f"{i}.png", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "yes"}]}
        )
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    return root / "data.jsonl"


def _config(ckpt, data, out, **kw):
    base = dict(
        pretrained=str(ckpt),
        data=str(data),
        image_folder=str(data.parent / "img"),
        output_dir=str(out),
        layer=2,
        proj_hidden=32,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        lr=1e-2,
        batch_size=4,
        max_steps=12,
        log_every=1,
        progress=False,
        warmup_ratio=0.0,
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    """The tiny random LLaVA with a 30x larger lm_head: a random model's tiny output layer (frozen
    under LoRA) otherwise caps how confident a few LoRA steps can make it."""
    from transformers import LlavaForConditionalGeneration

    from lmms_eval_plugins.testing import build_tiny_llava

    path = build_tiny_llava(tmp_path_factory.mktemp("viral_base"))
    model = LlavaForConditionalGeneration.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def trained(base_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("viral_train")
    data = _data(root)
    result = train(_config(base_ckpt, data, root / "run", save_every=6))
    return root, data, result


def test_training_loss_finite_and_decreasing_and_outputs_saved(trained):
    root, _, result = trained
    log = [json.loads(line) for line in (root / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13)) and result["step"] == 12
    lm = [r["lm_loss"] for r in log]
    vra = [r["vra_loss"] for r in log]
    assert all(torch.isfinite(torch.tensor(lm + vra)))
    assert lm[-1] < 0.3 * lm[0] and max(lm[-3:]) < min(lm[:3]), lm  # the LM term falls
    assert min(vra[-3:]) < vra[0], vra  # the alignment term falls (cosine rises)
    out = root / "run"
    for f in (
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "vra_projector.safetensors",
        "viral_config.json",
        "checkpoints/step-000006/optimizer.safetensors",
    ):
        assert (out / f).exists(), f
    settings = json.loads((out / "viral_config.json").read_text())
    assert settings["teacher"] == "self" and settings["layer"] == 2 and settings["teacher_info"]["dim"] == 32
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))  # nothing pickled


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(trained, base_ckpt):
    from safetensors.torch import load_file

    root, data, _ = trained
    other = root / "resumed"
    shutil.copytree(root / "run" / "checkpoints" / "step-000006", other / "checkpoints" / "step-000006")
    result = train(_config(base_ckpt, data, other, resume=True))
    assert result["step"] == 12
    a = load_file(str(root / "run" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(other / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    # and the resumed run did train: its adapter moved away from the checkpoint's
    c = load_file(str(other / "checkpoints" / "step-000006" / "adapter" / "adapter_model.safetensors"))
    assert any(not torch.allclose(b[k], c[k]) for k in b)


def test_merge_adapter_equals_the_peft_model(trained, base_ckpt):
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    root, _, _ = trained
    processor = AutoProcessor.from_pretrained(base_ckpt)
    inputs, _, _ = make_inputs(processor, "is there a red square in the image?")
    with torch.no_grad():
        base = LlavaForConditionalGeneration.from_pretrained(base_ckpt).eval()
        plain = base(**inputs).logits
        peft_logits = PeftModel.from_pretrained(base, str(root / "run" / "adapter")).eval()(**inputs).logits
        merged = LlavaForConditionalGeneration.from_pretrained(base_ckpt).eval()
        viral.merge_adapter(merged, root / "run")
        got = merged(**inputs).logits
    assert torch.allclose(got, peft_logits, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        viral.merge_adapter(merged, root)


def test_llava_viral_through_the_lmms_eval_cli(trained, base_ckpt, tmp_path):
    root, _, _ = trained
    results, log = run_lmms_eval(
        "llava_viral",
        f"pretrained={base_ckpt},adapter={root / 'run'}",
        "tiny_yesno",
        tmp_path,
        include_path="tests/tasks",
        cwd=REPO,
    )
    assert results is not None, log[-3000:]
    assert results["config"]["model_backend"].endswith("LlavaViralChat (chat)")
    answers = [s["filtered_resps"] for s in read_samples(tmp_path, "tiny_yesno")]
    answers = [a[0] if isinstance(a, list) else a for a in answers]
    assert len(answers) == 3 and all(a.strip().startswith("yes") for a in answers), answers  # what the adapter learnt
    assert results["results"]["tiny_yesno"]["exact,none"] == pytest.approx(2 / 3)


def test_llava_viral_without_adapter_says_what_to_pass(base_ckpt):
    from lmms_eval_plugins.models.viral import LlavaViralChat
    from methods.params import ModelArgsError

    with pytest.raises(ModelArgsError, match="llava_viral needs adapter=DIR"):
        LlavaViralChat(pretrained=str(base_ckpt))
    with pytest.raises(FileNotFoundError, match="viral-train"):
        LlavaViralChat(pretrained=str(base_ckpt), adapter=str(base_ckpt))


def test_alignment_command_writes_table_and_curve(trained, base_ckpt, tmp_path):
    from PIL import Image

    from lmms_eval_plugins.cli import main

    root, _, _ = trained
    code = main(
        [
            "alignment",
            "--model",
            f"baseline={base_ckpt}",
            "--model",
            f"viral={base_ckpt},adapter={root / 'run'}",
            "--reference",
            "self",
            "--images",
            str(root / "img"),
            "--topk",
            "5",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    result = json.loads((tmp_path / "alignment.json").read_text())
    assert set(result["tables"]) == {"baseline", "viral"}
    for table in result["tables"].values():
        assert [r["layer"] for r in table] == [0, 1, 2, 3, 4]  # embeddings + 4 decoder layers
        assert all(-1.0 <= r["cknna"] <= 1.0 + 1e-9 and 0.0 <= r["cka"] <= 1.0 + 1e-9 for r in table)
    assert result["tables"]["baseline"] != result["tables"]["viral"]  # the adapter changed the states
    assert (
        "| layer | baseline CKNNA | baseline CKA | viral CKNNA | viral CKA |" in (tmp_path / "alignment.md").read_text()
    )
    assert result["estimator"] == "unbiased" and "CKNNA (unbiased HSIC, k=5" in (tmp_path / "alignment.md").read_text()
    assert Image.open(tmp_path / "alignment.png").size == (900, 380)


def test_training_records_from_an_lmms_eval_task_split(tmp_path):
    from lmms_eval_plugins.viral_data import task_records

    yaml = (REPO / "tests" / "tasks" / "tiny_ll.yaml").read_text()
    yaml = yaml.replace("task: tiny_yesno_ll", "task: tiny_ll_train").replace(
        "test_split: test", "test_split: test\ntraining_split: test"
    )
    yaml = yaml.replace("tests/tasks/tiny.jsonl", str(REPO / "tests" / "tasks" / "tiny.jsonl"))
    (tmp_path / "tiny_ll_train.yaml").write_text(yaml)
    shutil.copy(REPO / "tests" / "tasks" / "tiny_utils.py", tmp_path)
    records = task_records(["tiny_ll_train"], str(tmp_path))
    assert [r["conversations"][1]["value"] for r in records] == ["yes", "no", "yes"]  # multiple-choice index -> option
    assert records[2]["conversations"][0]["value"] == "is there a blue square in the image?"
    assert records[0]["image"].size == (48, 40)
    with pytest.raises(ValueError, match="no validation split"):
        task_records(["tiny_ll_train"], str(tmp_path), split="validation")


@pytest.fixture(scope="module")
def parts(base_ckpt, tmp_path_factory):
    """The tiny LLaVA taken apart as the official recipe starts: a base LLM (+ tokenizer), a CLIP
    vision tower (+ image processor) and a stage-1 projector file in LLaVA's key layout."""
    from transformers import AutoProcessor, CLIPVisionModel, LlamaForCausalLM, LlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("viral_parts")
    model = LlavaForConditionalGeneration.from_pretrained(base_ckpt)
    proc = AutoProcessor.from_pretrained(base_ckpt)
    llm = LlamaForCausalLM(model.config.text_config)
    llm.model.load_state_dict(model.model.language_model.state_dict())
    llm.lm_head.load_state_dict(model.lm_head.state_dict())
    llm.save_pretrained(root / "llm")
    proc.tokenizer.save_pretrained(root / "llm")
    clip = CLIPVisionModel(model.config.vision_config)
    clip.load_state_dict(model.model.vision_tower.state_dict())
    clip.save_pretrained(root / "clip")
    proc.image_processor.save_pretrained(root / "clip")
    mm = model.model.multi_modal_projector
    torch.save(
        {
            "model.mm_projector.0.weight": mm.linear_1.weight,
            "model.mm_projector.0.bias": mm.linear_1.bias,
            "model.mm_projector.2.weight": mm.linear_2.weight,
            "model.mm_projector.2.bias": mm.linear_2.bias,
        },
        root / "mm_projector.bin",
    )
    return root, model, proc


def test_assembled_llava_from_parts_equals_the_checkpoint(parts):
    from methods.viral_setup import assemble_llava

    root, model, proc = parts
    assembled, aproc = assemble_llava(root / "llm", root / "clip", root / "mm_projector.bin")
    inputs, _, _ = make_inputs(proc)
    with torch.no_grad():
        want = model.eval()(**inputs).logits
        got = assembled(**inputs).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert aproc.tokenizer.convert_tokens_to_ids("<image>") == assembled.config.image_token_id
    with pytest.raises(FileNotFoundError, match="vicuna-7b-v1.5"):
        assemble_llava(root / "missing", root / "clip", root / "mm_projector.bin")


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    import sys

    sys.path.insert(0, str(REPO / "bench" / "parity"))
    import viral_tiny

    path = tmp_path_factory.mktemp("dinov2")
    viral_tiny.save_teacher(path)
    return path


def test_preset_official_end_to_end_from_base_llm_and_stage1_projector(parts, dinov2_dir, tmp_path, capsys):
    """preset=official (DINOv2 through the official input path, official groups and schedule, effective
    batch through accumulation, frozen N(0, 0.02) projector, teacher Linear layers re-drawn) runs and
    saves the recipe with the adapter; sizes scaled down so it takes seconds."""
    from methods.viral_train import PRESETS

    root, _, _ = parts
    data = _data(tmp_path / "data")
    cfg = TrainConfig(
        pretrained="",
        base_llm=str(root / "llm"),
        vision_tower=str(root / "clip"),
        mm_projector=str(root / "mm_projector.bin"),
        data=str(data),
        image_folder=str(data.parent / "img"),
        output_dir=str(tmp_path / "run"),
        preset="official",
        teacher=str(dinov2_dir),
        layer=2,
        proj_hidden=32,
        lora_r=8,
        lora_alpha=16,
        batch_size=2,
        effective_batch=4,
        max_steps=2,
        log_every=1,
        progress=False,
    )
    result = train(cfg)
    assert result["step"] == 2 and result["vra_loss"] is not None
    saved = json.loads((tmp_path / "run" / "viral_config.json").read_text())
    r = saved["recipe"]
    assert r["preset"] == "official" and r["teacher_input"] == "official" and r["schedule"] == "official"
    assert (
        r["mm_projector"]["lr"] == PRESETS["official"]["mm_projector_lr"]
        and r["lora"]["lr"] == PRESETS["official"]["lr"]
    )
    assert r["batch"] == {"per_device": 2, "grad_accum": 2, "effective": 4} and r["pad_to_square"] is True
    assert r["conversation"] == "v1" and math.isfinite(result["lm_loss"])  # official v1 ids, labels not all masked
    assert "frozen" in r["projector"] and len(r["reproduced_official_bugs"]) == 2
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()
    assert "viral-train recipe" in capsys.readouterr().out
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    # warm-up ceil(0.03 * 2) = 1 step: factor 0 for the first optimizer step, then the cosine from 1
    assert log[0]["lrs"] == pytest.approx(
        {"main": PRESETS["official"]["lr"], "mm": PRESETS["official"]["mm_projector_lr"]}
    )


def test_preset_official_names_the_teacher_to_download(base_ckpt, tmp_path):
    data = _data(tmp_path / "data")
    cfg = _config(base_ckpt, data, tmp_path / "run", preset="official", teacher=str(tmp_path / "nowhere"), max_steps=1)
    with pytest.raises(FileNotFoundError, match="facebook/dinov2-base"):
        train(cfg)


def test_cli_preset_official_prints_and_saves_the_recipe(base_ckpt, dinov2_dir, tmp_path, capsys):
    """`lmms-plugins viral-train --preset official` with explicit flags overriding the preset (sizes for CPU)."""
    from lmms_eval_plugins.cli import main

    data = _data(tmp_path / "data")
    out = tmp_path / "run"
    rc = main(
        [
            "viral-train",
            "--preset",
            "official",
            "--pretrained",
            str(base_ckpt),
            "--data",
            str(data),
            "--image-folder",
            str(data.parent / "img"),
            "--output-dir",
            str(out),
            "--teacher",
            str(dinov2_dir),
            "--layer",
            "1,2",
            "--multiple-projectors",
            "--loss",
            "similarity",
            "--proj-hidden",
            "16",
            "--lora-r",
            "4",
            "--lora-alpha",
            "8",
            "--batch-size",
            "4",
            "--effective-batch",
            "8",
            "--max-steps",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 0
    recipe = json.loads((out / "viral_config.json").read_text())["recipe"]
    assert recipe["layers"] == [1, 2] and recipe["multiple_projectors"] and recipe["loss"] == "similarity"
    assert recipe["teacher_input"] == "official" and recipe["batch"]["grad_accum"] == 2
    from safetensors.torch import load_file

    assert {k.split(".")[0] for k in load_file(str(out / "vra_projector.safetensors"))} == {
        "0",
        "1",
    }  # one projector per layer
    assert '"preset": "official"' in capsys.readouterr().out
