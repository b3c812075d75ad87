"""Golden fixtures of cvlab-kaist/VIRAL's training loop: the official ``LLaVATrainer.train()`` for a few steps.

Where ``viral_official.py`` drives one forward/backward/clip/AdamW step by hand, this runs the Hugging Face
Trainer loop that the official ``train()`` (llava/train/train.py:1003-1207) hands the model to, with the
TrainingArguments of ``scripts/v1_5/finetune_lora.sh`` (``--lora_enable True --lora_r 128 --lora_alpha 256
--mm_projector_lr 2e-5 --learning_rate 2e-4 --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine
--group_by_modality_length True --gradient_accumulation_steps 2 --num_train_epochs 1``, the Trainer's default
``max_grad_norm`` 1.0, ``optim`` adamw_torch from the official ``TrainingArguments``), on the model of
``viral_official.py`` (same tiny LLaVA-1.5, tiny DINOv2, VRA projector, LoRA A matrices). The loop (gradient
accumulation, the scheduler stepped once per optimizer step, warm-up rounding, clipping, AdamW) is
transformers 4.37.2's ``Trainer._inner_training_loop`` itself; the dataset is 16 fixed samples (ids, labels,
pixels) in the official ``DataCollatorForSupervisedDataset``.

Changed from the script, each for CPU or determinism (recorded in provenance.json): no DeepSpeed (ZeRO-2 keeps
the Trainer's own torch AdamW and clips by ``gradient_clipping: auto`` = max_grad_norm), fp32 instead of bf16,
no tf32, no gradient checkpointing (same arithmetic, recomputed), 0 data-loader workers, per-device batch 2
(8) on one process, LoRA dropout 0 (0.05: the Trainer puts the model in train mode, so dropout would make the
run random), no saving, no wandb.

Recorded: the order the sampler chose (``LengthGroupedSampler`` with modality grouping, seed 42), every
micro-batch's NTP and VRA loss (the official forward logs them to wandb: the stub keeps them), every optimizer
step's learning rate per group and the gradient norm before clipping, and the trained weights afterwards
(the multimodal projector whole, layer 16's q_proj LoRA A/B whole, the norm of every LoRA B and of every LoRA
A's change). Writes ``--out/viral_loop_official.safetensors`` and ``--out/loop_provenance.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_pre_hook  # noqa: E402

import tiny_llava15 as tiny  # noqa: E402
import viral_official as vo  # noqa: E402
import viral_tiny as vt  # noqa: E402

N_SAMPLES = 16
BATCH = 2
GRAD_ACCUM = 2
LORA_DROPOUT = 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--viral", required=True, type=Path, help="checkout of cvlab-kaist/VIRAL (at adc0791)")
    ap.add_argument("--dinov2", required=True, type=Path, help="checkout of facebookresearch/dinov2")
    ap.add_argument("--model", required=True, type=Path, help="tiny_llava15.build output")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--scratch", required=True, type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    vo.install_shims(args.dinov2)
    losses: list[dict] = []
    sys.modules["wandb"].log = lambda d, **k: losses.append({k2: float(v) for k2, v in d.items()})
    sys.path.insert(0, str(args.viral))

    import peft
    import transformers
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    from llava.train.llava_trainer import LLaVATrainer
    from llava.train.train import DataCollatorForSupervisedDataset, ModelArguments, TrainingArguments
    from llava.train.train import find_all_linear_names
    from peft import LoraConfig, get_peft_model

    # the model as viral_official.py builds it (train.py:1042-1107, 1153-1187), LoRA dropout 0
    config = transformers.AutoConfig.from_pretrained(
        str(vo.viral_config(args.model, args.scratch)), trust_remote_code=True
    )
    model = LlavaLlamaForCausalLM.from_pretrained(
        str(args.model / "original"), config=config, torch_dtype=torch.float32, attn_implementation="eager"
    )
    model.config.use_cache = False
    enc = model.alignment_encoder
    enc.load_state_dict({**vt.teacher_state(), "pos_embed": enc.pos_embed.detach().clone()}, strict=True)
    with torch.no_grad():
        for name, p in model.alignment_projector.projector.named_parameters():
            p.copy_(vt.projector_state(tiny.TEXT["hidden_size"])[name])
    lora = LoraConfig(
        r=vt.LORA["r"],
        lora_alpha=vt.LORA["alpha"],
        target_modules=find_all_linear_names(model),
        lora_dropout=LORA_DROPOUT,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    vt.set_lora_a(model)
    model_args = ModelArguments(
        model_name_or_path=str(args.model / "original"),
        version="v1",
        vision_tower=str(args.model / "original" / "clip"),
        mm_vision_select_layer=-2,
        mm_projector_type="mlp2x_gelu",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
    )
    model.get_model().initialize_vision_modules(model_args=model_args, fsdp=None)
    model.get_vision_tower().to(dtype=torch.float32)  # train.py:1158 casts it to fp16 when not bf16
    base = model.base_model.model
    lora_a0 = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    samples = vt.loop_samples(N_SAMPLES)
    pixels = tiny.fixed_pixels(N_SAMPLES, seed=vt.LOOP_PIXEL_SEED)

    class Samples(torch.utils.data.Dataset):
        """The official dataset's items (input_ids with IMAGE_TOKEN_INDEX, labels, image) for fixed samples."""

        def __len__(self):
            return N_SAMPLES

        @property
        def modality_lengths(self):  # LazySupervisedDataset.modality_lengths: word counts, > 0 for image samples
            return [len(before) + len(after) for before, after, _ in samples]

        def __getitem__(self, i):
            before, after, n_answer = samples[i]
            ids = [1, *before, tiny.IMAGE_TOKEN_INDEX, *after]
            labels = [-100] * (len(ids) - n_answer) + after[-n_answer:]
            return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "image": pixels[i], "index": i}

    pad = type("Tok", (), {"pad_token_id": 0, "model_max_length": 2048})()  # train.py: pad = unk (id 0) for v1
    official_collate = DataCollatorForSupervisedDataset(tokenizer=pad)
    order: list[list[int]] = []

    def collate(instances):
        order.append([int(x["index"]) for x in instances])
        return official_collate(instances)

    targs = TrainingArguments(
        output_dir=str(args.scratch / "trainer"),
        lora_enable=True,
        lora_r=vt.LORA["r"],
        lora_alpha=vt.LORA["alpha"],
        lora_dropout=LORA_DROPOUT,
        mm_projector_lr=2e-5,
        group_by_modality_length=True,
        num_train_epochs=1,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=GRAD_ACCUM,
        learning_rate=2e-4,
        weight_decay=0.0,
        warmup_ratio=0.03,
        lr_scheduler_type="cosine",
        logging_steps=1,
        model_max_length=2048,
        save_strategy="no",
        evaluation_strategy="no",
        dataloader_num_workers=0,
        use_cpu=True,
        report_to=[],
    )
    trainer = LLaVATrainer(model=model, args=targs, train_dataset=Samples(), data_collator=collate)
    steps: list[dict] = []
    clip = trainer.accelerator.clip_grad_norm_

    def clip_and_record(parameters, max_norm, *a, **k):
        norm = clip(parameters, max_norm, *a, **k)
        steps.append({"grad_norm": float(norm)})
        return norm

    trainer.accelerator.clip_grad_norm_ = clip_and_record
    names: dict = {}

    def before_step(optimizer, *_):
        if not names:
            names.update({id(p): n for n, p in model.named_parameters()})
        steps[-1]["lrs"] = [g["lr"] for g in optimizer.param_groups]
        steps[-1]["group_params"] = [len(g["params"]) for g in optimizer.param_groups]
        steps[-1]["betas"] = [list(g["betas"]) for g in optimizer.param_groups]
        steps[-1]["eps"] = [g["eps"] for g in optimizer.param_groups]
        steps[-1]["weight_decay"] = [g["weight_decay"] for g in optimizer.param_groups]
        steps[-1]["group_kinds"] = [sorted({_kind(names[id(p)]) for p in g["params"]}) for g in optimizer.param_groups]

    hook = register_optimizer_step_pre_hook(before_step)
    result = trainer.train()
    hook.remove()

    mm = base.model.mm_projector
    q = base.model.layers[vt.TARGET_LAYER - 1].self_attn.q_proj
    norm_b = torch.zeros(len(base.model.layers), len(vt.LORA_MODULES))
    norm_da = torch.zeros_like(norm_b)
    for i, layer in enumerate(base.model.layers):
        for j, name in enumerate(vt.LORA_MODULES):
            mod = getattr(layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp, name)
            norm_b[i, j] = mod.lora_B["default"].weight.norm()
            a_name = [n for n in lora_a0 if f"layers.{i}." in n and f".{name}." in n]
            assert len(a_name) == 1, a_name
            norm_da[i, j] = (mod.lora_A["default"].weight - lora_a0[a_name[0]]).norm()
    tensors = {
        "mm_projector.0.weight": mm[0].weight,
        "mm_projector.0.bias": mm[0].bias,
        "mm_projector.2.weight": mm[2].weight,
        "mm_projector.2.bias": mm[2].bias,
        f"lora_B.{vt.TARGET_LAYER - 1}.q_proj": q.lora_B["default"].weight,
        f"lora_A.{vt.TARGET_LAYER - 1}.q_proj": q.lora_A["default"].weight,
        "norm.lora_B": norm_b,
        "norm.lora_A_change": norm_da,
    }
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(args.out / "viral_loop_official.safetensors"), metadata={"format": "pt"})
    total = trainer.state.max_steps
    prov = {
        "repository": "cvlab-kaist/VIRAL",
        "commit": vo.VIRAL_COMMIT,
        "files": ["llava/train/train.py", "llava/train/llava_trainer.py", "scripts/v1_5/finetune_lora.sh"],
        "command": "bash bench/parity/regenerate.sh --viral /work/official/VIRAL:/work/official/dinov2",
        "stack": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "shim_sha256": hashlib.sha256((HERE / "cpu_shim.py").read_bytes()).hexdigest(),
        "harness_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "model": {k: json.loads((args.model / "model_info.json").read_text())[k] for k in ("seed", "fingerprint")},
        "training_arguments": {
            k: getattr(targs, k)
            for k in (
                "learning_rate",
                "mm_projector_lr",
                "weight_decay",
                "warmup_ratio",
                "lr_scheduler_type",
                "max_grad_norm",
                "optim",
                "adam_beta1",
                "adam_beta2",
                "adam_epsilon",
                "per_device_train_batch_size",
                "gradient_accumulation_steps",
                "num_train_epochs",
                "group_by_modality_length",
                "lora_r",
                "lora_alpha",
                "lora_dropout",
                "seed",
            )
        },
        "changed_from_finetune_lora_sh": {
            "deepspeed": "none (zero2.json: the Trainer's torch AdamW, clipping at max_grad_norm)",
            "bf16/tf32": "fp32 on CPU",
            "gradient_checkpointing": "off",
            "dataloader_num_workers": 0,
            "per_device_train_batch_size": f"{BATCH} (8), one process (2 GPUs)",
            "lora_dropout": f"{LORA_DROPOUT} (0.05): deterministic",
        },
        "samples": [[len(b), len(a), n] for b, a, n in samples],
        "pixels": f"tiny_llava15.fixed_pixels({N_SAMPLES}, seed={vt.LOOP_PIXEL_SEED})",
        "order": order,
        "micro_batch_losses": losses,
        "steps": steps,
        "max_steps": total,
        "warmup_steps": targs.get_warmup_steps(total),
        "train_loss": result.training_loss,
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
    }
    (args.out / "loop_provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
    print(json.dumps({k: prov[k] for k in ("order", "steps", "max_steps", "warmup_steps")}, indent=1))
    return 0


def _kind(name: str) -> str:
    for key in ("lora_", "mm_projector", "alignment_projector"):
        if key in name:
            return key.strip("_")
    return "other"


if __name__ == "__main__":
    raise SystemExit(main())
