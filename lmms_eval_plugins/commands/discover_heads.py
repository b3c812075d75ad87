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
            "selection frequency. Example: lmms-plugins discover-heads --pretrained shapeworld-tiny --task shapeworld_rec"
        ),
    )
    p.add_argument("--pretrained", required=True, help="checkpoint (hub id, local directory, or shapeworld-tiny)")
    p.add_argument("--task", required=True, help="lmms-eval task with images and referring prompts (e.g. shapeworld_rec)")
    p.add_argument("--split", default=None, help="split to search (default: the task's training split)")
    p.add_argument("--n", type=int, default=1000, help="samples per repeat (the paper's 1000)")
    p.add_argument("--repeats", type=int, default=5, help="independent seeded draws of n samples, frequencies over all (the paper's 5)")
    p.add_argument("--selection", default="ours", choices=("ours", "official", "official_v2"), help="per-sample head selection (docs/lochead.md)")
    p.add_argument("--prompt", default="task", choices=("task", "official"), help="the task's prompt, or the official referseg prompt")
    p.add_argument("--checkpoint-every", type=int, default=50, help="save partial counts every this many samples (a rerun resumes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-sample", type=int, default=10, help="lowest-entropy heads kept per sample")
    p.add_argument("--connectivity", type=int, default=8, choices=(4, 8))
    p.add_argument("--include-path", action="append", default=[], help="extra lmms-eval task directory (repeatable)")
    p.add_argument("--output", default=None, help="also write the heads file here")
    p.add_argument("--save-visuals", default=None, help="directory for PNGs: S_img curves with the knee, selected heads' maps")
    p.add_argument("--max-visuals", type=int, default=8)
    p.add_argument("--top", type=int, default=20, help="rows of the printed table")
    p.add_argument("--no-cache", action="store_true", help="recompute even if a cached result exists")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.set_defaults(func=run)


def run(args) -> int:
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from methods import hooks, lochead

    from ..base import check_interleaved_llava, resolve_pretrained
    from ..heads import DiscoveryError, discover_for_task

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.n < 1 or args.repeats < 1 or args.per_sample < 1:
        print("error: --n, --repeats and --per-sample must be >= 1")
        return 2
    pretrained = resolve_pretrained(args.pretrained)
    config = check_interleaved_llava(pretrained)
    if config.model_type != "llava":
        print(f"error: heads discovery runs on LLaVA-1.5-style checkpoints (model_type 'llava'); {pretrained} is "
              f"{config.model_type!r}. For LLaVA-NeXT/OneVision use llava_lochead with heads=self (or all).")
        return 2
    model = LlavaForConditionalGeneration.from_pretrained(pretrained, dtype=getattr(torch, args.dtype), device_map=args.device).eval()
    hooks.install(model)
    processor = AutoProcessor.from_pretrained(pretrained)
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
        )
    except (DiscoveryError, lochead.HeadsFileError) as e:
        print(f"error: {e}")
        return 2
    print(("cached result: " if result is None else "heads file: ") + str(path))
    if args.output:
        print(f"written to {args.output}")
    print(f"{doc.get('n_samples', '?')} samples of {doc.get('task', args.task)}/{doc.get('split', args.split)}; {doc['model_id']}")
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
