"""`lmms-plugins alignment`: layer-wise CKNNA / CKA of the LLM's image tokens vs reference features.

    lmms-plugins alignment --model baseline=shapeworld-tiny \\
        --model viral=shapeworld-tiny,adapter=runs/viral --reference TEACHER_DIR|self \\
        --shapeworld 64 --output-dir results/alignment

For every entry l of ``hidden_states`` (0 = the projected image features entering the LLM,
l = after decoder layer l), the image-token states of N images are compared with the
reference features on the same grid (a teacher backbone's, resampled; or ``self``, the
first model's own vision tower at its feature layer: LLaVA-1.5 only). The image tokens are
the ones ``viral-train`` aligns on the checkpoint's family (its adapter's ``aligned_block``):
LLaVA-1.5 every image token, LLaVA-NeXT/OneVision the base block, Qwen2.5-VL / Qwen3-VL the
merged grid, Gemma 3 the pooled grid, InternVL the thumbnail. The metrics are the Platonic reference's
(methods/alignment.py); CKNNA's estimator is --estimator (default: the reference's unbiased one)
and is named in every output. Writes alignment.json, alignment.md
(one table: layer x model x {CKNNA, CKA}) and alignment.png (the CKNNA curves, one per model,
and the CKA curves).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def register(sub) -> None:
    p = sub.add_parser(
        "alignment",
        help="layer-wise CKNNA/CKA of image-token hidden states vs a teacher (VIRAL analysis)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        help="NAME=CHECKPOINT[,adapter=DIR] (repeatable; the first is the baseline of the plot)",
    )
    p.add_argument(
        "--reference", default="self", help="teacher backbone directory, or 'self' (the first model's vision tower)"
    )
    p.add_argument("--teacher-image-size", type=int, default=None)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="a directory of images (png/jpg), the first --num are used")
    src.add_argument("--shapeworld", type=int, metavar="N", help="N ShapeWorld test scenes")
    p.add_argument("--num", type=int, default=64, help="images taken from --images")
    p.add_argument("--prompt", default="describe this image .", help="the user text after the image")
    p.add_argument("--topk", type=int, default=10, help="CKNNA's k")
    p.add_argument(
        "--estimator",
        choices=("unbiased", "biased"),
        default="unbiased",
        help="CKNNA's HSIC estimator (the Platonic reference's default: unbiased)",
    )
    p.add_argument("--max-rows", type=int, default=2048, help="image tokens (rows) subsampled for the kernels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", required=True)
    p.set_defaults(func=run)


def parse_model(spec: str) -> tuple[str, str, str | None]:
    if "=" not in spec.split(",")[0]:
        raise SystemExit(f"--model {spec!r}: use NAME=CHECKPOINT[,adapter=DIR]")
    name, rest = spec.split("=", 1)
    parts = rest.split(",")
    adapter = None
    for extra in parts[1:]:
        key, _, value = extra.partition("=")
        if key != "adapter":
            raise SystemExit(f"--model {spec!r}: unknown option {key!r} (only adapter=DIR)")
        adapter = value
    return name, parts[0], adapter


def load_images(args) -> list:
    from PIL import Image

    if args.shapeworld:
        from ..shapeworld.scenes import derive_seed, scene_from_seed

        return [scene_from_seed(derive_seed("viral-alignment", i), "test").render() for i in range(args.shapeworld)]
    files = sorted(f for f in Path(args.images).iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))[: args.num]
    if not files:
        raise SystemExit(f"--images {args.images}: no png/jpg files")
    return [Image.open(f).convert("RGB") for f in files]


def run(args) -> int:
    from transformers import AutoProcessor

    from methods import alignment, viral, viral_teachers

    from ..base import resolve_pretrained
    from ..viral_teacher import resolve_teacher

    torch.manual_seed(args.seed)
    images = load_images(args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    reference, states, first_grids = None, {}, None
    for spec in args.model:
        name, ckpt, adapter = parse_model(spec)
        ckpt = resolve_pretrained(ckpt)
        model = load_model(ckpt, args.reference if reference is None else None)
        processor = AutoProcessor.from_pretrained(ckpt)
        if adapter:
            viral.merge_adapter(model, adapter)
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
        prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        per_image, aligned_of, pixels = [], [], []
        for i, im in enumerate(images):
            inputs = processor(images=[im], text=prompt, return_tensors="pt")
            aligned = viral.aligned_tokens(model.config, inputs)[0]  # the tokens VIRAL aligns (the family's block)
            if aligned is None:
                raise SystemExit(f"alignment: image {i} of {ckpt}: no aligned image tokens in its prompt")
            per_image.append(alignment.image_token_states(model, inputs, positions=aligned.positions))
            aligned_of.append(aligned)
            pixels.append(inputs["pixel_values"])
        states[name] = per_image
        if first_grids is None:
            first_grids = [a.grid for a in aligned_of]
        elif [a.grid for a in aligned_of] != first_grids:  # compared row for row with the first model's reference
            raise SystemExit(
                f"alignment: {name}'s aligned grids {[a.grid for a in aligned_of][:3]}... differ from the first model's "
                f"{first_grids[:3]}...; compare checkpoints of one geometry (a base model and its fine-tunes)"
            )
        if reference is None:  # reference features on the first model's aligned grid of each image
            teacher = viral_teachers.load_teacher(resolve_teacher(args.reference), model, args.teacher_image_size)
            ip = processor.image_processor
            if isinstance(teacher, viral_teachers.BackboneTeacher):
                reference = [
                    viral_teachers.teacher_targets_from_images(
                        teacher, [im], a.grid, None if a.whole_image else viral_teachers.crop_fraction(ip)
                    )[0]
                    for im, a in zip(images, aligned_of)
                ]
            else:
                reference = [
                    viral_teachers.teacher_targets(teacher, px, ip.image_mean, ip.image_std, a.grid)[0]
                    for px, a in zip(pixels, aligned_of)
                ]
        print(
            f"alignment: {name}: {len(images)} images, {len(per_image[0])} hidden_states entries, "
            f"{aligned_of[0].grid[0]}x{aligned_of[0].grid[1]} aligned image tokens ({viral.family(model.config).display_name})"
        )
    unbiased = args.estimator == "unbiased"
    tables = {
        name: alignment.layerwise_alignment(
            s, reference, topk=args.topk, max_rows=args.max_rows, seed=args.seed, unbiased=unbiased
        )
        for name, s in states.items()
    }
    metric = f"CKNNA ({args.estimator} HSIC, k={args.topk}, platonic-rep metrics.py) and CKA (biased HSIC), rows L2-normalised"
    result = {
        "reference": args.reference,
        "models": args.model,
        "images": len(images),
        "topk": args.topk,
        "estimator": args.estimator,
        "metric": metric,
        "tables": tables,
    }
    (out / "alignment.json").write_text(json.dumps(result, indent=2))
    (out / "alignment.md").write_text(f"{metric}\n\n" + markdown_table(tables))
    print(f"alignment: {metric}")
    plot_curves(tables, out / "alignment.png", title=f"image tokens vs {Path(args.reference).name}")
    print(markdown_table(tables))
    print(f"alignment: wrote {out / 'alignment.md'}, {out / 'alignment.png'}")
    return 0


def load_model(ckpt: str, reference: str | None):
    """The checkpoint with its family's class (any family with an adapter, methods/families/); refused with what is
    supported for other model types, and for ``--reference self`` where the tower's own patches are not the LM's
    image tokens one for one (merged or tiled: every family but LLaVA-1.5)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from methods import viral

    try:
        fam = viral.family(AutoConfig.from_pretrained(ckpt))
    except ValueError as e:
        raise SystemExit(f"alignment: {e}") from e
    if reference == "self" and not fam.square_grid:
        raise SystemExit(
            f"alignment: --reference self is LLaVA-1.5's (its tower's patch features at vision_feature_layer, one per "
            f"image token); {ckpt} is {fam.display_name}, whose image tokens are not the tower's patches one for one: "
            "pass a teacher backbone directory (--reference DIR, e.g. shapeworld-teacher)"
        )
    return AutoModelForImageTextToText.from_pretrained(ckpt).eval()


def markdown_table(tables: dict) -> str:
    names = list(tables)
    head = "| layer | " + " | ".join(f"{n} CKNNA | {n} CKA" for n in names) + " |"
    sep = "|---|" + "---|---|" * len(names)
    rows = []
    for i, row in enumerate(next(iter(tables.values()))):
        cells = [f"{tables[n][i]['cknna']:.3f} | {tables[n][i]['cka']:.3f}" for n in names]
        rows.append(f"| {row['layer']} | " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *rows]) + "\n"


COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def plot_curves(tables: dict, path, title: str = "") -> None:
    """Two panels (CKNNA, CKA) of one line per model over layers, drawn with Pillow."""
    from PIL import Image, ImageDraw

    W, H, pad = 900, 380, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((pad, 8), title, fill="black")
    panel_w = (W - 3 * pad) // 2
    for p, metric in enumerate(("cknna", "cka")):
        x0, y0, x1, y1 = pad + p * (panel_w + pad), 40, pad + p * (panel_w + pad) + panel_w, H - 60
        values = [r[metric] for t in tables.values() for r in t]
        lo, hi = min(0.0, min(values)), max(values + [1e-6])
        hi = hi + 0.05 * (hi - lo)
        n = len(next(iter(tables.values())))
        d.rectangle([x0, y0, x1, y1], outline="black")
        d.text((x0, y1 + 22), f"{metric.upper()} vs LLM layer (hidden_states index)", fill="black")
        for frac in (0.0, 0.5, 1.0):
            yy = y1 - frac * (y1 - y0)
            d.text((x0 - 40, yy - 6), f"{lo + frac * (hi - lo):.2f}", fill="black")
        for layer in range(n):
            xx = x0 + (layer / max(1, n - 1)) * (x1 - x0)
            d.text((xx - 3, y1 + 4), str(layer), fill="black")

        def to_xy(layer, v, x0=x0, y0=y0, x1=x1, y1=y1, n=n, lo=lo, hi=hi):  # this panel's frame, bound now
            return (x0 + (layer / max(1, n - 1)) * (x1 - x0), y1 - (v - lo) / (hi - lo) * (y1 - y0))

        for k, (name, table) in enumerate(tables.items()):
            col = COLOURS[k % len(COLOURS)]
            pts = [to_xy(r["layer"], r[metric]) for r in table]
            d.line(pts, fill=col, width=2)
            for x, y in pts:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
            d.text((x1 - 110, y1 - 16 - 14 * k), name, fill=col)  # legend, bottom right
    img.save(path)
