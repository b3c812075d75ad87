"""`lmms-plugins discover-heads`: find a model's localization heads on an lmms-eval task's split."""

from __future__ import annotations

import os


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "discover-heads",
        help="find a model's localization heads on an lmms-eval grounding task (writes a heads JSON)",
        description=(
            "One prefill per sample: the last prompt token's attention over the image grid for every (layer, head); "
            "heads above the knee of the sorted S_img curve; the lowest-spatial-entropy ones per sample; ranked by "
            "selection frequency. LLaVA-1.5 (square grid), LLaVA-NeXT/OneVision and InternVL (HF) (--block base|highres), "
            "Qwen2.5-VL and Qwen3-VL (rows x cols merged grid, --min-pixels/--max-pixels), Gemma 3 (pooled grid). Example: lmms-plugins discover-heads --pretrained shapeworld-tiny --task shapeworld_rec"
        ),
    )
    p.add_argument("--pretrained", required=True, help="checkpoint (hub id, local directory, or shapeworld-tiny)")
    p.add_argument(
        "--task", required=True, help="lmms-eval task with images and referring prompts (e.g. shapeworld_rec)"
    )
    p.add_argument("--split", default=None, help="split to search (default: the task's training split)")
    p.add_argument("--n", type=int, default=1000, help="samples per repeat (the paper's 1000)")
    p.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="independent seeded draws of n samples, frequencies over all (the paper's 5)",
    )
    p.add_argument(
        "--selection",
        default="ours",
        choices=("ours", "official", "official_v2"),
        help="per-sample head selection (docs/lochead.md)",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "official"),
        help="official: the official selections in fp16, as the official runs (docs/lochead.md 'Precision')",
    )
    p.add_argument(
        "--prompt",
        default="task",
        choices=("task", "official"),
        help="the task's prompt, or the official referseg prompt",
    )
    p.add_argument(
        "--checkpoint-every", type=int, default=50, help="save partial counts every this many samples (a rerun resumes)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-sample", type=int, default=10, help="lowest-entropy heads kept per sample")
    p.add_argument("--connectivity", type=int, default=8, choices=(4, 8))
    p.add_argument("--include-path", action="append", default=[], help="extra lmms-eval task directory (repeatable)")
    p.add_argument("--output", default=None, help="also write the heads file here")
    p.add_argument(
        "--save-visuals", default=None, help="directory for PNGs: S_img curves with the knee, selected heads' maps"
    )
    p.add_argument("--max-visuals", type=int, default=8)
    p.add_argument("--top", type=int, default=20, help="rows of the printed table")
    p.add_argument("--no-cache", action="store_true", help="recompute even if a cached result exists")
    p.add_argument(
        "--block",
        default="base",
        choices=("base", "highres"),
        help="LLaVA-NeXT/OneVision, InternVL (HF): the block whose grid is searched (use the same block= as the "
        "<family>_lochead name); base only elsewhere",
    )
    p.add_argument(
        "--min-pixels",
        type=int,
        default=None,
        help="Qwen2.5-VL, Qwen3-VL: the processor's min_pixels (default: the checkpoint's saved processor). Pass the "
        "min_pixels of your evaluation's --model_args: lmms-eval's qwen2_5_vl defaults to 200704, not the saved value",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="Qwen2.5-VL, Qwen3-VL: the processor's max_pixels (as --min-pixels; lmms-eval's default 1605632)",
    )
    p.add_argument(
        "--max-patches",
        type=int,
        default=None,
        help="InternVL (HF): the image processor's max_patches, which sets the tiling and so the highres grid "
        "(default: the checkpoint's saved value). Pass your evaluation's: lmms-eval's internvl_hf uses 12",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.set_defaults(func=run)


def load(pretrained: str, args):
    """(model, processor) of a checkpoint of a family with an adapter (methods/families/), loaded with its
    family's class; the Qwen2.5-VL or Qwen3-VL processor at --min-pixels/--max-pixels (default: its saved ones).
    ValueError: refused."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    from transformers import LlavaForConditionalGeneration as Llava

    from methods import families

    from ..base import check_interleaved_llava

    model_type = getattr(AutoConfig.from_pretrained(pretrained), "model_type", None)
    if model_type not in families.ADAPTERS:
        names = ", ".join(dict.fromkeys(f.display_name for _, f in sorted(families.ADAPTERS.items())))
        raise ValueError(
            f"heads discovery runs on {names} checkpoints "
            f"(model_type {', '.join(families.supported())}); {pretrained} is {model_type!r}"
        )
    family = families.adapter(model_type)
    if family.lmms_eval_model == "llava_hf":
        check_interleaved_llava(pretrained)
    resizes = "image_grid_thw" in family.request_inputs  # Qwen's processors: min/max pixels set the grid
    if (args.min_pixels or args.max_pixels) and not resizes:
        raise ValueError(f"--min-pixels/--max-pixels are Qwen2.5-VL's and Qwen3-VL's; {pretrained} is {model_type!r}")
    if args.block != "base" and not family.highres_block:
        tiled = ", ".join(
            dict.fromkeys(f.display_name for _, f in sorted(families.ADAPTERS.items()) if f.highres_block)
        )
        raise ValueError(
            f"--block {args.block}: a {family.display_name} image has one grid; --block highres is for {tiled}"
        )
    pixels = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v}
    processor = AutoProcessor.from_pretrained(pretrained, **pixels)
    image_processor = getattr(processor, "image_processor", processor)
    tiles = family.highres_block and hasattr(image_processor, "max_patches")  # InternVL: max_patches sets the tiling
    if args.max_patches is not None and not tiles:
        raise ValueError(f"--max-patches is InternVL's (its tiling); {pretrained} is {model_type!r}")
    if args.max_patches is not None:
        image_processor.max_patches = args.max_patches
    if tiles:
        print(
            f"{family.display_name} images tiled with min_patches={image_processor.min_patches}, "
            f"max_patches={image_processor.max_patches} ({'given' if args.max_patches else 'saved with the checkpoint'}); "
            "evaluate with the same --model_args max_patches (lmms-eval's internvl_hf default: 12)"
        )
    cls = Llava if model_type == "llava" else AutoModelForImageTextToText
    model = cls.from_pretrained(pretrained, dtype=getattr(torch, args.dtype), device_map=args.device).eval()
    if resizes:
        size = processor.image_processor.size
        print(
            f"{family.display_name} images at min_pixels={size['shortest_edge']}, max_pixels={size['longest_edge']} "
            f"({'given' if pixels else 'saved with the checkpoint'}); evaluate with the same --model_args min_pixels/max_pixels"
        )
    return model, processor


def run(args) -> int:
    from methods import families, hooks, lochead_heads
    from methods.technique import RequestError

    from ..base import resolve_pretrained
    from ..heads import DiscoveryError, discover_for_task
    from methods.params import ModelArgsError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.n < 1 or args.repeats < 1 or args.per_sample < 1:
        print("error: --n, --repeats and --per-sample must be >= 1")
        return 2
    pretrained = resolve_pretrained(args.pretrained)
    try:
        model, processor = load(pretrained, args)
    except (ValueError, ModelArgsError) as e:
        print(f"error: {e}")
        return 2
    if args.prompt != "task" and not families.adapter(model.config).square_grid:
        print(
            f"error: --prompt {args.prompt} is LLaVA-1.5 only (the official prompt and its square grid); "
            f"use --prompt task on {model.config.model_type}"
        )
        return 2
    hooks.install(model)
    try:
        path, doc, result = discover_for_task(
            model,
            processor,
            args.task,
            split=args.split,
            n=args.n,
            seed=args.seed,
            repeats=args.repeats,
            selection=args.selection,
            prompt=args.prompt,
            checkpoint_every=max(1, args.checkpoint_every),
            include_path=args.include_path,
            per_sample=args.per_sample,
            connectivity=args.connectivity,
            use_cache=not args.no_cache,
            output=args.output,
            save_visuals=args.save_visuals,
            max_visuals=args.max_visuals,
            model_name=args.pretrained,  # "shapeworld-tiny", not the directory it resolves to
            block=args.block,
            precision=args.precision,
        )
    except (DiscoveryError, lochead_heads.HeadsFileError, RequestError) as e:
        print(f"error: {e}")
        return 2
    print(("cached result: " if result is None else "heads file: ") + str(path))
    if args.output:
        print(f"written to {args.output}")
    print(
        f"{doc.get('n_samples', '?')} samples of {doc.get('task', args.task)}/{doc.get('split', args.split)}; {doc['model_id']}"
    )
    print(_table(doc["heads"], args.top))
    return 0


def _table(heads, top: int) -> str:
    rows = ["rank  layer  head  frequency  mean_entropy  mean_S_img"]
    for i, h in enumerate(heads[:top], 1):
        rows.append(
            f"{i:>4}  {h['layer']:>5}  {h['head']:>4}  {h.get('frequency', float('nan')):>9.3f}  "
            f"{h.get('mean_entropy') if h.get('mean_entropy') is not None else float('inf'):>12.3f}  {h.get('mean_s_img', float('nan')):>10.3f}"
        )
    return "\n".join(rows)
