"""Golden fixtures of cvlab-kaist/VIRAL's data path: ``--version v1`` prompts, ids and labels.

Runs the official preprocessing exactly as ``LazySupervisedDataset.__getitem__`` does for a record
(llava/train/train.py:809-869): ``preprocess_multimodal`` (the ``<image>`` moved to the front of its
turn), then ``preprocess`` -> ``preprocess_v1`` (train.py:414-497: ``conv_vicuna_v1``'s prompt,
``tokenizer_image_token`` for image records, the instruction parts masked with the ``- 2`` offset and,
for rounds after the first, the extra ``- 1`` of non-legacy tokenizers), with the conversation
template ``train()`` selects for ``--version v1`` (train.py:1148-1151) and the tokenizer as ``train()``
loads it (slow ``LlamaTokenizer``, pad = unk). The tokenizer is ``viral_tokenizer.py``'s tiny one, in its
legacy and non-legacy form. Writes ``--out/viral_data_official.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import viral_official as vo  # noqa: E402
import viral_tokenizer  # noqa: E402

RECORDS = [
    {
        "id": "one_turn",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the image?"},
            {"from": "gpt", "value": "There are three shapes."},
        ],
    },
    {
        "id": "image_after_text_three_turns",
        "image": "b.png",
        "conversations": [
            {"from": "human", "value": "How many shapes are there?\n<image>"},
            {"from": "gpt", "value": "Two."},
            {"from": "human", "value": "Is there a red circle left of the square?"},
            {"from": "gpt", "value": "Yes, a red circle."},
            {"from": "human", "value": "Which colour is the triangle?"},
            {"from": "gpt", "value": "green"},
        ],
    },
    {
        "id": "text_only_two_turns",
        "conversations": [
            {"from": "human", "value": "Describe it."},
            {"from": "gpt", "value": "The square is blue and small."},
            {"from": "human", "value": "What is in the image?"},
            {"from": "gpt", "value": "No."},
        ],
    },
    {
        "id": "starts_with_gpt",
        "image": "c.png",
        "conversations": [
            {"from": "gpt", "value": "Yes."},
            {"from": "human", "value": "<image>\nIs there a red circle left of the square?"},
            {"from": "gpt", "value": "No. The square is blue and small."},
        ],
    },
]


def script_flags(path: Path) -> dict:
    """``--flag value`` pairs the training script passes to train_mem.py, as strings (not the launcher's)."""
    words = shlex.split(path.read_text().replace("\\\n", " "), comments=True)
    words = words[next(k for k, w in enumerate(words) if w.endswith("train_mem.py")) + 1 :]
    return {
        w[2:]: words[k + 1]
        for k, w in enumerate(words[:-1])
        if w.startswith("--") and not words[k + 1].startswith("--")
    }


def official_recipe(viral: Path, official, scratch: Path) -> dict:
    """What the preset must match: VIRAL's config.json (the VRA keys), the flags of scripts/v1_5/finetune_lora.sh,
    and the official TrainingArguments those flags give (HfArgumentParser of train.py:1004-1007; the flags
    that need a GPU or DeepSpeed are recorded but not parsed)."""
    import transformers

    config = json.loads((viral / "config.json").read_text())
    flags = script_flags(viral / "scripts" / "v1_5" / "finetune_lora.sh")
    cpu_only = {"deepspeed", "bf16", "tf32", "report_to", "config_path", "dataloader_num_workers"}
    argv = [x for k, v in flags.items() if k not in cpu_only for x in (f"--{k}", v)]
    argv = [a.replace("./checkpoints", str(scratch / "checkpoints")) for a in argv] + ["--use_cpu", "True"]
    parser = transformers.HfArgumentParser(
        (official.ModelArguments, official.DataArguments, official.TrainingArguments)
    )
    _, _, targs = parser.parse_args_into_dataclasses(args=argv)
    keys = (
        "learning_rate",
        "mm_projector_lr",
        "weight_decay",
        "warmup_ratio",
        "warmup_steps",
        "lr_scheduler_type",
        "max_grad_norm",
        "optim",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "num_train_epochs",
        "model_max_length",
        "group_by_modality_length",
    )
    include = next(
        w for w in (viral / "scripts" / "v1_5" / "finetune_lora.sh").read_text().split() if w.startswith("localhost:")
    )
    return {
        "config_json": {
            k: config[k]
            for k in (
                "vra_loss",
                "target_layers",
                "use_multiple_projectors",
                "vra_target",
                "vra_weight",
                "projector_dim",
                "z_dim",
                "mm_projector_lr",
            )
        },
        "finetune_lora_sh": flags,
        "gpus": len(include.split(":")[1].split(",")),
        "training_arguments": {k: getattr(targs, k) for k in keys},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--viral", required=True, type=Path, help="checkout of cvlab-kaist/VIRAL (at adc0791)")
    ap.add_argument("--dinov2", required=True, type=Path, help="checkout of facebookresearch/dinov2")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--scratch", required=True, type=Path)
    args = ap.parse_args()
    vo.install_shims(args.dinov2)
    sys.path.insert(0, str(args.viral))

    import tokenizers
    import transformers
    from llava import conversation as conversation_lib
    from llava.train import train as official

    conversation_lib.default_conversation = conversation_lib.conv_templates["v1"]  # train.py:1148-1149
    data_args = official.DataArguments(is_multimodal=True)
    data_args.mm_use_im_start_end = False  # train.py:1173, from --mm_use_im_start_end False
    out: dict = {"tokenizers": {}}
    for mode in ("nonlegacy", "legacy"):
        path = viral_tokenizer.write(args.scratch / "tokenizer" / mode, legacy=mode == "legacy")
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(path), model_max_length=2048, padding_side="right", use_fast=False
        )  # train.py:1117-1123
        tokenizer.pad_token = tokenizer.unk_token  # train.py:1135-1136
        rows = []
        for record in RECORDS:
            has_image = "image" in record
            sources = copy.deepcopy([record["conversations"]])
            if has_image:
                sources = official.preprocess_multimodal(sources, data_args)
            conv = conversation_lib.default_conversation.copy()
            source = sources[0][1:] if sources[0][0]["from"] != "human" else sources[0]
            conv.messages = []
            for s in source:
                conv.append_message(conv.roles[0] if s["from"] == "human" else conv.roles[1], s["value"])
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                data = official.preprocess(sources, tokenizer, has_image=has_image)
            rows.append(
                {
                    "id": record["id"],
                    "prompt": conv.get_prompt(),
                    "input_ids": data["input_ids"][0].tolist(),
                    "labels": data["labels"][0].tolist(),
                    "printed": printed.getvalue(),
                }
            )
        out["tokenizers"][mode] = {
            "legacy": tokenizer.legacy,
            "tokenizer_model_sha256": hashlib.sha256((path / "tokenizer.model").read_bytes()).hexdigest(),
            "records": rows,
        }
    out["records"] = RECORDS
    out["recipe"] = official_recipe(args.viral, official, args.scratch)
    out["provenance"] = {
        "repository": "cvlab-kaist/VIRAL",
        "commit": vo.VIRAL_COMMIT,
        "files": ["llava/train/train.py", "llava/conversation.py", "llava/mm_utils.py"],
        "command": "bash bench/parity/regenerate.sh --viral /work/official/VIRAL:/work/official/dinov2",
        "stack": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "harness_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "tokenizer_builder_sha256": hashlib.sha256((HERE / "viral_tokenizer.py").read_bytes()).hexdigest(),
        "template": "conv_templates['v1'] = conv_vicuna_v1 (train.py:1148-1149, --version v1)",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "viral_data_official.json").write_text(json.dumps(out, indent=1) + "\n")
    for mode, t in out["tokenizers"].items():
        for r in t["records"]:
            print(mode, r["id"], repr(r["prompt"][-60:]), "labelled", sum(x != -100 for x in r["labels"]), r["printed"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
