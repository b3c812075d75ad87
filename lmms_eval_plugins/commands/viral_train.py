"""`lmms-plugins viral-train`: fine-tune a LLaVA checkpoint with VIRAL (LoRA + accelerate).

    lmms-plugins viral-train --pretrained llava-hf/llava-1.5-7b-hf --data llava_665k.json \\
        --image-folder data/ --teacher /models/dinov2-base --output-dir runs/viral
    accelerate launch --num_processes 8 -m lmms_eval_plugins.cli viral-train ...   # several GPUs

then evaluate: lmms-eval --model llava_viral --model_args pretrained=BASE,adapter=runs/viral ...
"""

from __future__ import annotations

import dataclasses

from methods import viral


def register(sub) -> None:
    p = sub.add_parser("viral-train", help="fine-tune with VIRAL's visual representation alignment (peft LoRA + accelerate)",
                       description=__doc__, formatter_class=_Formatter)
    p.add_argument("--pretrained", required=True, help="base LLaVA checkpoint (directory, hub id, or shapeworld-tiny)")
    p.add_argument("--data", required=True,
                   help="LLaVA-format training data (JSON list or JSONL: image + conversations), or tasks:NAME[,NAME] for "
                   "the training splits of lmms-eval tasks (their own prompts and targets)")
    p.add_argument("--include-path", default=None, help="lmms-eval --include_path for --data tasks:... (e.g. task_configs)")
    p.add_argument("--data-split", default="train", help="which split of the tasks, for --data tasks:...")
    p.add_argument("--limit-per-task", type=int, default=None, help="documents per task, for --data tasks:...")
    p.add_argument("--image-folder", default="", help="root of the records' image paths")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--teacher", default="self",
                   help="vision backbone directory (e.g. a saved facebook/dinov2-base), 'shapeworld-teacher' (shipped), "
                   "'self' (the model's own vision tower) or 'none'")
    p.add_argument("--teacher-image-size", type=int, default=None, help="teacher input size (default: its preprocessor's crop size)")
    p.add_argument("--teacher-input", default="image", choices=["image", "pixels"],
                   help="what a backbone teacher sees: the original image re-processed with the LLM's field of view, "
                   "or the LLaVA pixels with the CLIP normalisation undone")
    p.add_argument("--layer", type=int, default=viral.DEFAULTS["layer"], help="aligned LLM layer, 1-based over hidden_states")
    p.add_argument("--weight", type=float, default=viral.DEFAULTS["weight"], help="lambda of L_VRA (0: plain fine-tuning)")
    p.add_argument("--proj-hidden", type=int, default=viral.DEFAULTS["proj_hidden"], help="hidden width of the VRA projector")
    p.add_argument("--lora-r", type=int, default=128)
    p.add_argument("--lora-alpha", type=int, default=256)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--no-train-mm-projector", dest="train_mm_projector", action="store_false",
                   help="freeze the multimodal projector (trained fully by default, as in LLaVA's LoRA recipe)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--proj-lr", type=float, default=None, help="learning rate of the VRA projector (default: --lr)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--batch-size", type=int, default=4, help="per device")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-cache-teacher", dest="cache_teacher", action="store_false",
                   help="recompute teacher features every step (cached per sample by default)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N optimizer steps (0: only the final output)")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="resume from the latest checkpoint in --output-dir, or from the given checkpoint directory")
    p.add_argument("--limit", type=int, default=None, help="use only the first N records")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run)


class _Formatter(__import__("argparse").RawDescriptionHelpFormatter, __import__("argparse").ArgumentDefaultsHelpFormatter):
    pass


def run(args) -> int:
    from methods.viral_train import TrainConfig, train

    from ..base import resolve_pretrained
    from ..viral_teacher import resolve_teacher

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["pretrained"] = resolve_pretrained(values["pretrained"])
    values["teacher"] = resolve_teacher(values["teacher"])
    records = None
    if args.data.startswith("tasks:"):
        from ..viral_data import task_records

        records = task_records(args.data[len("tasks:"):].split(","), args.include_path, args.data_split, args.limit_per_task)
        print(f"viral-train: {len(records)} training records from {args.data}")
    result = train(TrainConfig(**values), records)
    print(f"viral-train: done at step {result['step']}: lm_loss={result.get('lm_loss')} vra_loss={result.get('vra_loss')}; "
          f"adapter in {args.output_dir}/adapter")
    return 0
