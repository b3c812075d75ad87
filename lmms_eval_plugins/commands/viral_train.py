"""`lmms-plugins viral-train`: fine-tune a checkpoint of any family with an adapter with VIRAL (LoRA + accelerate).

    lmms-plugins viral-train --pretrained llava-hf/llava-1.5-7b-hf --data llava_665k.json \\
        --image-folder data/ --teacher /models/dinov2-base --output-dir runs/viral
    accelerate launch --num_processes 8 -m lmms_eval_plugins.cli viral-train ...   # several GPUs

then evaluate: lmms-eval --model llava_viral --model_args pretrained=BASE,adapter=runs/viral ...

Families (the aligned tokens are each adapter's ``aligned_block``): LLaVA-1.5 (every image token, the
square grid), LLaVA-NeXT/OneVision (the base block only), Qwen2.5-VL and Qwen3-VL (the merged tokens,
rows x cols; evaluate with qwen2_5_vl_viral / qwen3_vl_viral and the min_pixels/max_pixels the processor
was trained at), Gemma 3 (the pooled grid), InternVL (HF) (the thumbnail's grid; tiles unaligned;
evaluate with internvl_hf_viral). Beyond LLaVA-1.5 the teacher is a backbone directory seeing the
original image (--teacher DIR --teacher-input image).
"""

from __future__ import annotations

import argparse
import dataclasses

from methods import families, viral
from methods.viral_train import PRESETS

# the families viral-train takes, as users name them (every family with an adapter)
FAMILY_NAMES = ", ".join(dict.fromkeys(f.display_name for _, f in sorted(families.ADAPTERS.items())))


def register(sub) -> None:
    p = sub.add_parser(
        "viral-train",
        help="fine-tune with VIRAL's visual representation alignment (peft LoRA + accelerate)",
        description=__doc__,
        formatter_class=_Formatter,
    )
    p.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help="official: cvlab-kaist/VIRAL's recipe (DINOv2 teacher through the official input path, layer 16, "
        "lambda 0.5, LoRA r128/alpha256 at 2e-4, multimodal projector at 2e-5, warm-up 3%% + cosine, no weight "
        "decay, effective batch 32, bf16 where supported, pad to square, and the official code's frozen VRA "
        "projector / re-drawn teacher Linear layers); flags given explicitly override it",
    )
    p.add_argument(
        "--pretrained",
        default=None,
        help=f"base checkpoint of {FAMILY_NAMES} (directory, hub id, shapeworld-tiny, shapeworld-tiny-qwen)",
    )
    p.add_argument(
        "--base-llm",
        default=None,
        help="instead of --pretrained, the official starting point: a base LLM directory (vicuna-7b-v1.5) ...",
    )
    p.add_argument("--vision-tower", default=None, help="... a CLIP vision directory (clip-vit-large-patch14-336) ...")
    p.add_argument(
        "--mm-projector", default=None, help="... and the stage-1 projector (mm_projector.bin or .safetensors)"
    )
    p.add_argument(
        "--data",
        required=True,
        help="LLaVA-format training data (JSON list or JSONL: image + conversations), or tasks:NAME[,NAME] for "
        "the training splits of lmms-eval tasks (their own prompts and targets)",
    )
    p.add_argument(
        "--include-path", default=None, help="lmms-eval --include_path for --data tasks:... (e.g. task_configs)"
    )
    p.add_argument("--data-split", default="train", help="which split of the tasks, for --data tasks:...")
    p.add_argument("--limit-per-task", type=int, default=None, help="documents per task, for --data tasks:...")
    p.add_argument("--image-folder", default="", help="root of the records' image paths")
    p.add_argument("--output-dir", required=True)
    p.add_argument(
        "--teacher",
        default="self",
        help="vision backbone directory (e.g. a saved facebook/dinov2-base), 'shapeworld-teacher' (shipped), "
        "'self' (the model's own vision tower; LLaVA-1.5 only) or 'none'",
    )
    p.add_argument(
        "--teacher-image-size",
        type=int,
        default=None,
        help="teacher input size (default: its preprocessor's crop size)",
    )
    p.add_argument(
        "--teacher-input",
        default="image",
        choices=["image", "pixels", "official"],
        help="what a backbone teacher sees: the original image re-processed with the LLM's field of view, "
        "the LLaVA pixels with the CLIP normalisation undone, or (official) the LLaVA pixels as they are "
        "into a DINOv2 whose position table is resampled to the LLM's grid",
    )
    p.add_argument(
        "--teacher-reinit",
        dest="teacher_reinit",
        action="store_true",
        default=False,
        help="re-draw the teacher's Linear layers N(0, 0.02), as the official load path does (preset official)",
    )
    p.add_argument("--no-teacher-reinit", dest="teacher_reinit", action="store_false")
    p.add_argument(
        "--layer",
        type=_layers,
        default=viral.DEFAULTS["layer"],
        help="aligned LLM layer(s), 1-based over hidden_states; several as 8,16 (L_VRA is their mean)",
    )
    p.add_argument(
        "--weight", type=float, default=viral.DEFAULTS["weight"], help="lambda of L_VRA (0: plain fine-tuning)"
    )
    p.add_argument(
        "--loss",
        default="direct",
        choices=list(viral.LOSSES),
        help="direct: -cos(P(h), y); similarity: MSE of the token-token cosine (Gram) matrices",
    )
    p.add_argument(
        "--no-projector",
        dest="use_projector",
        action="store_false",
        help="similarity loss on the hidden states themselves (the official use_projector=False)",
    )
    p.add_argument(
        "--multiple-projectors", action="store_true", help="one projector per target layer (default: one shared)"
    )
    p.add_argument(
        "--train-vra-projector",
        dest="train_vra_projector",
        action="store_true",
        default=True,
        help="train the VRA projector (default; preset official freezes it, as the official LoRA recipe does)",
    )
    p.add_argument("--freeze-vra-projector", dest="train_vra_projector", action="store_false")
    p.add_argument(
        "--projector-init",
        default="torch",
        choices=["torch", "official"],
        help="official: N(0, 0.02) weights, zero biases (transformers 4.37's Llama _init_weights)",
    )
    p.add_argument(
        "--proj-hidden", type=int, default=viral.DEFAULTS["proj_hidden"], help="hidden width of the VRA projector"
    )
    p.add_argument("--lora-r", type=int, default=128)
    p.add_argument("--lora-alpha", type=int, default=256)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument(
        "--no-train-mm-projector",
        dest="train_mm_projector",
        action="store_false",
        help="freeze the multimodal projector (trained fully by default, as in LLaVA's LoRA recipe)",
    )
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--proj-lr", type=float, default=None, help="learning rate of the VRA projector (default: --lr)")
    p.add_argument(
        "--mm-projector-lr",
        type=float,
        default=None,
        help="learning rate of the multimodal projector (default: --lr; official 2e-5)",
    )
    p.add_argument(
        "--schedule",
        default="ours",
        choices=["ours", "official"],
        help="official: transformers' cosine with ceil(ratio*steps) warm-up steps (the first step at lr 0)",
    )
    p.add_argument(
        "--effective-batch",
        type=int,
        default=None,
        help="samples per optimizer step; sets --grad-accum = this / (batch size x processes) (official 32)",
    )
    p.add_argument(
        "--pad-to-square", action="store_true", help="LLaVA-1.5's image_aspect_ratio=pad (the official data path)"
    )
    p.add_argument(
        "--conversation",
        choices=("processor", "v1"),
        default="processor",
        help="how records become ids and labels: 'processor' (the checkpoint's chat template, labels on the "
        "assistant turns) or 'v1' (LLaVA-1.5's official --version v1: conv_vicuna_v1, tokenizer_image_token, "
        "preprocess_v1's masking; LLaVA-1.5 only; --preset official sets it)",
    )
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--batch-size", type=int, default=4, help="per device")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16", "auto"],
        help="auto: bfloat16 where the device supports it (preset official), else float32",
    )
    p.add_argument(
        "--no-cache-teacher",
        dest="cache_teacher",
        action="store_false",
        help="recompute teacher features every step (cached per sample by default)",
    )
    p.add_argument(
        "--save-every", type=int, default=0, help="checkpoint every N optimizer steps (0: only the final output)"
    )
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        help="resume from the latest checkpoint in --output-dir, or from the given checkpoint directory",
    )
    p.add_argument("--limit", type=int, default=None, help="use only the first N records")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run)
    _defaults_only_when_absent(p)


def _defaults_only_when_absent(p) -> None:
    """TrainConfig fields get no argparse default (shown in the help instead), so that ``run`` sees only the
    flags given: the explicit layer of defaults < preset < explicit (methods/viral_train.py ``apply_preset``,
    through params.parse_params as every wrapper's model_args), so a flag equal to its default still wins."""
    from methods.viral_train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for action in p._actions:
        if (
            action.dest in fields
            and action.dest != "preset"
            and action.default is not argparse.SUPPRESS
            and not action.required
        ):
            if action.help and "%(default)" not in action.help and action.default is not None:
                action.help += f" (default: {action.default})"
            action.default = argparse.SUPPRESS


def _layers(text: str):
    layers = [int(x) for x in str(text).split(",") if x.strip()]
    return layers[0] if len(layers) == 1 else layers


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def run(args) -> int:
    from methods.viral_train import TrainConfig, train

    from ..base import resolve_pretrained
    from ..viral_teacher import resolve_teacher

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["explicit"] = tuple(values)
    if not values.get("pretrained") and not values.get("base_llm"):
        raise SystemExit(
            f"viral-train: pass --pretrained (a checkpoint of {FAMILY_NAMES}) or --base-llm/--vision-tower/--mm-projector"
        )
    values["pretrained"] = resolve_pretrained(values["pretrained"]) if values.get("pretrained") else ""
    if "teacher" in values:
        values["teacher"] = resolve_teacher(values["teacher"])
    records = None
    if args.data.startswith("tasks:"):
        from ..viral_data import task_records

        records = task_records(
            args.data[len("tasks:") :].split(","), args.include_path, args.data_split, args.limit_per_task
        )
        print(f"viral-train: {len(records)} training records from {args.data}")
    result = train(TrainConfig(**values), records)
    print(
        f"viral-train: done at step {result['step']}: lm_loss={result.get('lm_loss')} vra_loss={result.get('vra_loss')}; "
        f"adapter in {args.output_dir}/adapter"
    )
    return 0
