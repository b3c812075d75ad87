"""VIRAL's data path and recipe against the official code (cvlab-kaist/VIRAL @ adc0791, ``--version v1``).

The fixture (tests/fixtures/official/viral/viral_data_official.json) was written by
bench/parity/viral_data_official.py, which ran the official ``preprocess_multimodal`` + ``preprocess_v1``
(conv_vicuna_v1, ``tokenizer_image_token``, the instruction masking with its ``- 2`` and non-legacy ``- 1``
offsets) on four LLaVA-format records with a tiny Llama-style SentencePiece tokenizer
(bench/parity/viral_tokenizer.py: Vicuna's ``USER`` / ``▁US ER`` property) in its legacy and non-legacy
form, through transformers 4.37's slow ``LlamaTokenizer``; and recorded VIRAL's config.json, the flags of
scripts/v1_5/finetune_lora.sh and the official TrainingArguments they give. Here the same tokenizer in
transformers 5 (built from the same pieces) goes through ``conversation_data.encode_v1`` and
``encode_conversation_v1``, and ``VICUNA_V1_TEMPLATE`` is rendered; every id and label must be equal.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from methods import conversation_data as cd
from methods import viral_setup, viral_train

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "official" / "viral" / "viral_data_official.json"
sys.path.insert(0, str(ROOT / "bench" / "parity"))

import viral_tokenizer  # noqa: E402

pytestmark = pytest.mark.skipif(not FIX.exists(), reason="VIRAL data fixture not generated")
MODES = ("nonlegacy", "legacy")


@pytest.fixture(scope="module")
def official():
    return json.loads(FIX.read_text())


@pytest.fixture(scope="module", params=MODES)
def tokenizer(request):
    tok = viral_tokenizer.hf_tokenizer(legacy=request.param == "legacy")
    tok.pad_token = tok.unk_token  # train.py:1135-1136 (assemble_llava does the same)
    return request.param, tok


def _records(official):
    return {r["id"]: r for r in official["records"]}


def test_the_tokenizer_is_the_fixtures(official):
    import hashlib

    assert (ROOT / "bench" / "parity" / "viral_tokenizer.py").exists()
    builder = hashlib.sha256((ROOT / "bench" / "parity" / "viral_tokenizer.py").read_bytes()).hexdigest()
    assert builder == official["provenance"]["tokenizer_builder_sha256"]


def test_prompt_ids_and_labels_equal_preprocess_v1(official, tokenizer):
    mode, tok = tokenizer
    records = _records(official)
    rows = official["tokenizers"][mode]["records"]
    assert len(rows) == 4 and not any(r["printed"] for r in rows)  # no official "tokenization mismatch"
    for row in rows:
        record = records[row["id"]]
        prompt, ids, labels = cd.encode_v1(tok, record["conversations"], "image" in record, image_id=-200)
        assert prompt == row["prompt"], row["id"]
        assert ids == row["input_ids"], row["id"]
        assert labels == row["labels"], row["id"]
        assert sum(x != -100 for x in labels) > 0


def test_labels_are_the_answers_and_their_eos(official, tokenizer):
    """What the official masking amounts to with Vicuna-like pieces: every answer plus its </s>, nothing else."""
    mode, tok = tokenizer
    records = _records(official)
    for row in official["tokenizers"][mode]["records"]:
        record = records[row["id"]]
        answers = [m["value"] for m in record["conversations"] if m["from"] == "gpt"]
        if record["conversations"][0]["from"] == "gpt":
            answers = answers[1:]  # preprocess_v1 drops a first turn that is not the human's
        labelled = [i for i in row["labels"] if i != -100]
        # (decoding puts back the dummy-prefix space of each answer's first piece after a </s>)
        assert tok.decode(labelled) == "</s> ".join(answers) + "</s>", row["id"]
        assert labelled.count(tok.eos_token_id) == len(answers)


def test_the_chat_template_renders_the_official_prompt(official):
    tok = viral_tokenizer.hf_tokenizer(legacy=False)
    records = _records(official)
    for row in official["tokenizers"]["nonlegacy"]["records"]:
        record = records[row["id"]]
        turns = cd._turns(record["conversations"])
        messages = []
        for k, (user, answer) in enumerate(turns):
            image = [{"type": "image"}] if k == 0 and "image" in record else []
            messages.append(
                {"role": "user", "content": image + [{"type": "text", "text": user.replace("<image>", "").strip()}]}
            )
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        text = tok.apply_chat_template(messages, tokenize=False, chat_template=viral_setup.VICUNA_V1_TEMPLATE)
        assert text == "<s>" + row["prompt"], row["id"]
        prefix = tok.apply_chat_template(
            messages[:1], tokenize=False, add_generation_prompt=True, chat_template=viral_setup.VICUNA_V1_TEMPLATE
        )
        assert row["prompt"].startswith(prefix[len("<s>") :]) and prefix.endswith(" ASSISTANT:")
    assert "curious human" not in viral_setup.VICUNA_V1_TEMPLATE and "</s> USER" not in row["prompt"]


def test_encode_conversation_v1_expands_the_image_and_masks_it(official, tokenizer, tmp_path):
    """Through a LlavaProcessor (4 image tokens at 28 px): collapsing the image run gives the official ids
    and labels; the image tokens are never labelled; the pixels are the processor's."""
    from PIL import Image
    from transformers import CLIPImageProcessor, LlavaProcessor

    mode, tok = tokenizer
    tok.add_tokens(["<image>"], special_tokens=True)
    image_id = tok.convert_tokens_to_ids("<image>")
    ip = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=viral_setup.VICUNA_V1_TEMPLATE,
    )
    records = _records(official)
    image = Image.new("RGB", (40, 28), (200, 30, 30))
    for row in official["tokenizers"][mode]["records"]:
        record = records[row["id"]]
        has_image = "image" in record
        item = cd.encode_conversation_v1(processor, image if has_image else None, record["conversations"], 2048)
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        assert ids.count(image_id) == (4 if has_image else 0)
        assert all(lab == -100 for i, lab in zip(ids, labels) if i == image_id)
        collapsed = [(i, lab) for k, (i, lab) in enumerate(zip(ids, labels)) if i != image_id or ids[k - 1] != image_id]
        want = [(-200 if i == -200 else i, lab) for i, lab in zip(row["input_ids"], row["labels"])]
        assert [(-200 if i == image_id else i, lab) for i, lab in collapsed] == want, row["id"]
        assert ("pixel_values" in item) == has_image


def test_a_length_mismatch_masks_the_whole_sample_as_the_official_code(official):
    """preprocess_v1 counts non-pad ids; a pad id inside the text (here ▁the) makes the count differ and the
    official code then ignores the sample ("tokenization mismatch"); ours too, with a warning."""
    tok = viral_tokenizer.hf_tokenizer(legacy=False)
    tok.pad_token = "▁the"
    record = _records(official)["one_turn"]
    with pytest.warns(UserWarning, match="tokenization mismatch"):
        _, _, labels = cd.encode_v1(tok, record["conversations"], True, image_id=-200)
    assert set(labels) == {-100}


def test_preset_official_matches_the_official_recipe(official):
    """The preset against VIRAL's config.json, finetune_lora.sh and the TrainingArguments it gives."""
    recipe = official["recipe"]
    preset = viral_train.PRESETS["official"]
    cfg, ta, sh = recipe["config_json"], recipe["training_arguments"], recipe["finetune_lora_sh"]
    assert preset["proj_hidden"] == cfg["projector_dim"] == 2048
    assert [preset["layer"]] == cfg["target_layers"] and preset["weight"] == cfg["vra_weight"]
    assert not cfg["use_multiple_projectors"] and not preset.get("multiple_projectors", False)
    assert preset["warmup_ratio"] == ta["warmup_ratio"] == 0.03 and ta["warmup_steps"] == 0
    assert preset["schedule"] == "official" and ta["lr_scheduler_type"] == "cosine"
    assert preset["lr"] == ta["learning_rate"] and preset["mm_projector_lr"] == ta["mm_projector_lr"]
    assert preset["weight_decay"] == ta["weight_decay"] and preset["max_grad_norm"] == ta["max_grad_norm"]
    assert (preset["lora_r"], preset["lora_alpha"], preset["lora_dropout"]) == (
        ta["lora_r"],
        ta["lora_alpha"],
        ta["lora_dropout"],
    )
    assert preset["batch_size"] == ta["per_device_train_batch_size"]
    assert (
        preset["effective_batch"]
        == ta["per_device_train_batch_size"] * ta["gradient_accumulation_steps"] * recipe["gpus"]
    )
    assert preset["epochs"] == ta["num_train_epochs"] and preset["max_length"] == ta["model_max_length"]
    assert preset["conversation"] == "v1" == sh["version"] and preset["pad_to_square"] == (
        sh["image_aspect_ratio"] == "pad"
    )
    # AdamW as the loop builds it (torch defaults) = the official adamw_torch settings
    assert ta["optim"] == "adamw_torch"
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    assert opt.defaults["betas"] == (ta["adam_beta1"], ta["adam_beta2"]) and opt.defaults["eps"] == ta["adam_epsilon"]


def test_preset_projector_is_the_official_alignment_projector_shape(official):
    """Width 2048 end to end: Linear(d, 2048), SiLU, Linear(2048, 2048), SiLU, Linear(2048, z_dim)
    (llava_llama.py:93-105 with config.json's projector_dim and z_dim)."""
    cfg = viral_train.apply_preset(viral_train.TrainConfig(pretrained="", data="", output_dir="", preset="official"))
    z = official["recipe"]["config_json"]["z_dim"]
    projector = viral_setup.make_projector(cfg, 64, z)
    linears = [m for m in projector.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 2048), (2048, 2048), (2048, z)]
    assert [type(m).__name__ for m in projector.net] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert not any(p.requires_grad for p in projector.parameters())  # frozen, as peft leaves the official one
