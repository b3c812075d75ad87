"""llava_lochead's base-block and high-res-block boxes on a LLaVA-NeXT whose attention means something.

There is no trained LLaVA-NeXT ShapeWorld checkpoint, so this builds the cheapest honest one:
the trained LLaVA-1.5 ``shapeworld-tiny`` turned into a ``LlavaNextForConditionalGeneration``
with the *same* vision tower, projector and language-model weights, and only what NeXT adds:

- ``image_grid_pinpoints``: LLaVA-NeXT's own set scaled to the 64 px tower
  (1x2, 2x1, 2x2, 1x3, 3x1 tiles); a 336x336 ShapeWorld image picks 2x2, so the LM sees the
  8x8 base crop (what LLaVA-1.5 saw) then a 16x16 high-res grid of four 64 px tiles, each
  row followed by a newline token: 64 + 16 x 17 = 336 image tokens;
- ``image_newline``: LLaVA-1.5 has none. ``--newline mean`` (default): the mean projected image
  feature of the base crop over 256 training scenes; ShapeWorld images are mostly background, so
  a newline then looks like one more average (background) image token and adds no object
  evidence, and it stays inside the distribution of image embeddings the LM was trained on.
  ``zeros`` is the alternative (an embedding the LM never saw; its RMSNorm output is zero).

The processor is a ``LlavaNextProcessor`` with the checkpoint's tokenizer and chat template and a
``LlavaNextImageProcessor`` with the same resize/crop/normalisation; its token counts are checked
against methods/geometry.py for square and non-square images before anything runs.

``--finetune-steps N`` optionally continues training the converted model with the ShapeWorld
task mix (lmms_eval_plugins/shapeworld/train.py ``language_stages``, stage 3 only), on the NeXT
forward (base + tiles + newlines); 0 (default) leaves it un-fine-tuned.

Then, through the real lmms-eval CLI (one torch thread): a sanity metric of the converted model
with plain ``llava_hf`` (POPE adversarial), ``llava_lochead`` with ``block=base`` and
``block=highres`` (heads=self, heads=all, and the shipped shapeworld-tiny heads, which index the
same LM), and the LLaVA-1.5 original for reference; then per sample the agreement of the two
blocks' boxes: mean IoU between them and the fraction whose centres fall inside the same object,
each with its chance level (boxes paired with the next item's), and how much of the maps' variance
is carried by rows (``map_structure``). Writes runs.json and table.md under --out.

    python bench/lochead_next_blocks.py --out results/lochead_next/nofit
    python bench/lochead_next_blocks.py --out results/lochead_next/fit150 --finetune-steps 150
    python bench/lochead_next_blocks.py --out DIR --no-convert --only none   # recompute the tables only
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmms_eval_plugins.paths import CHECKPOINTS, tasks_dir  # noqa: E402
from lmms_eval_plugins.shapeworld.metrics import box_iou  # noqa: E402
from lmms_eval_plugins.testing import read_samples, run_lmms_eval, tiny_pinpoints  # noqa: E402

HEADS_FILE = REPO / "lmms_eval_plugins" / "heads" / "shapeworld-tiny.json"
REC = "shapeworld_rec"
SANITY = "shapeworld_pope_adversarial"
CHECK_SIZES = ((336, 336), (336, 200), (200, 336), (500, 160), (96, 300))


# ---------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------


def next_config(src_config, pinpoints):
    """LLaVA-1.5's config as a LlavaNextConfig: the same towers and projector, plus the pinpoints."""
    from transformers import LlavaNextConfig

    return LlavaNextConfig(
        vision_config=src_config.vision_config.to_dict(),
        text_config=src_config.text_config.to_dict(),
        image_token_index=src_config.image_token_id,
        projector_hidden_act=src_config.projector_hidden_act,
        vision_feature_select_strategy=src_config.vision_feature_select_strategy,
        vision_feature_layer=src_config.vision_feature_layer,
        multimodal_projector_bias=src_config.multimodal_projector_bias,
        tie_word_embeddings=src_config.tie_word_embeddings,
        image_grid_pinpoints=pinpoints,
        pad_token_id=src_config.pad_token_id,
    )


def next_processor(src_processor, pinpoints):
    """A LlavaNextProcessor with the source's tokenizer, chat template and image normalisation."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    ip = src_processor.image_processor
    image_processor = LlavaNextImageProcessor(
        size=dict(ip.size),
        crop_size=dict(ip.crop_size),
        do_center_crop=ip.do_center_crop,
        resample=ip.resample,
        image_mean=list(ip.image_mean),
        image_std=list(ip.image_std),
        image_grid_pinpoints=pinpoints,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=src_processor.tokenizer,
        patch_size=src_processor.patch_size,
        vision_feature_select_strategy=src_processor.vision_feature_select_strategy,
        num_additional_image_tokens=src_processor.num_additional_image_tokens,
        image_token=src_processor.image_token,
        chat_template=src_processor.chat_template,
    )


@torch.no_grad()
def mean_image_embedding(model, processor, n: int = 256) -> torch.Tensor:
    """Mean projected image token of LLaVA-1.5 over ``n`` training-world scenes (the base crop's features)."""
    from lmms_eval_plugins.shapeworld.scenes import (
        TRAIN_WORLD,
        derive_seed,
        sample_scene,
    )
    from lmms_eval_plugins.shapeworld.train import vision_features

    images = [sample_scene(derive_seed("newline", i), TRAIN_WORLD).render() for i in range(n)]
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    return model.model.multi_modal_projector(vision_features(model, pixels)).mean((0, 1))


def convert(src, out, newline: str = "mean", pinpoints=None, newline_scenes: int = 256) -> Path:
    """Write the LLaVA-NeXT version of the LLaVA-1.5 checkpoint ``src`` to ``out``; returns ``out``."""
    from transformers import (
        AutoProcessor,
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
    )

    src_model = LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    src_processor = AutoProcessor.from_pretrained(src)
    side = src_model.config.vision_config.image_size
    pinpoints = pinpoints or tiny_pinpoints(side)
    model = LlavaNextForConditionalGeneration(next_config(src_model.config, pinpoints)).eval()
    missing, unexpected = model.load_state_dict(src_model.state_dict(), strict=False)
    if unexpected or set(missing) - {"model.image_newline", "lm_head.weight"}:
        raise RuntimeError(f"weights do not carry over: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    with torch.no_grad():
        if newline == "mean":
            model.model.image_newline.copy_(mean_image_embedding(src_model, src_processor, newline_scenes))
        elif newline == "zeros":
            model.model.image_newline.zero_()
        else:
            raise ValueError(f"newline must be mean or zeros, not {newline!r}")
    for name, p in src_model.state_dict().items():  # the same weights, bit for bit
        if not torch.equal(model.state_dict()[name], p):
            raise RuntimeError(f"{name} differs after conversion")
    model.generation_config = src_model.generation_config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    next_processor(src_processor, pinpoints).save_pretrained(out)
    (out / "conversion.json").write_text(
        json.dumps(
            {
                "source": str(src),
                "newline": newline,
                "newline_scenes": newline_scenes,
                "pinpoints": pinpoints,
                "finetune_steps": 0,
            },
            indent=1,
        )
    )
    return out


def check_geometry(path, sizes=CHECK_SIZES) -> dict:
    """The processor's image-token count for each image size, checked against methods/geometry.py."""
    from PIL import Image
    from transformers import AutoConfig, AutoProcessor

    from methods.families import image_geometry

    config, processor = AutoConfig.from_pretrained(path), AutoProcessor.from_pretrained(path)
    counts = {}
    for w, h in sizes:
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "is there a circle ?"}]}],
            add_generation_prompt=True,
        )
        inputs = processor(images=Image.new("RGB", (w, h), (200, 200, 200)), text=prompt, return_tensors="pt")
        geo = image_geometry(config, processor, (w, h), inputs["input_ids"])  # raises GeometryError on a mismatch
        n = int((inputs["input_ids"] == config.image_token_id).sum())
        counts[f"{w}x{h}"] = {
            "tokens": n,
            **{b.name: f"{b.rows}x{b.cols}" for b in geo.blocks},
            "newlines": int(geo.newlines.numel()),
        }
    return counts


# ---------------------------------------------------------------------------------------
# Optional fine-tuning on the NeXT forward (stage 3 of shapeworld/train.py)
# ---------------------------------------------------------------------------------------


def finetune(path, steps: int, pool_size: int = 1000, batch: int = 16, seed: int = 0, log=print) -> None:
    """Continue training the converted checkpoint at ``path`` on the ShapeWorld task mix, in place."""
    import numpy as np
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from lmms_eval_plugins.shapeworld import train
    from lmms_eval_plugins.shapeworld.scenes import TRAIN_WORLD

    random.seed(seed)
    np.random.seed(seed)
    model = LlavaNextForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(path)
    tok = processor.tokenizer
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    side = TRAIN_WORLD.canvas
    n_img = check_geometry(path, [(side, side)])[f"{side}x{side}"]["tokens"]
    pool = train.ScenePool(pool_size, "fit", TRAIN_WORLD, processor, grid, log=log)
    sizes = torch.tensor([[TRAIN_WORLD.canvas, TRAIN_WORLD.canvas]])  # (H, W) of every ShapeWorld image
    probe_data = train.YesNoProbe(processor, n_img)

    def logits_of(ids, mask, pixels):
        return model(
            input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes.expand(len(ids), 2)
        ).logits

    @torch.no_grad()
    def probe(m):  # train.YesNoProbe's yes/no accuracy, on the NeXT forward
        m.eval()
        p = probe_data
        last = logits_of(p.ids, p.mask, p.pixels)[torch.arange(len(p.examples)), p.answer_pos]
        m.train()
        says_yes = (last[:, p.yes] > last[:, p.no]).tolist()
        truth = [a == "yes" for _, a in p.examples]
        adv = [y for y, k in zip(says_yes, p.kinds) if k == "adversarial"]
        return {
            "yesno_acc": sum(y == t for y, t in zip(says_yes, truth)) / len(truth),
            "false_yes_adv": sum(adv) / max(1, len(adv)),
        }

    def forward(idx, examples):
        ids, mask, labels = train.encode_batch(tok, examples, n_img)
        pixels = pool.pixels[idx]
        feats = train.vision_features(model, pixels[:, 0])  # the base crop: the dense labels' 8x8 grid
        image_embeds = model.model.multi_modal_projector(feats)
        return logits_of(ids, mask, pixels), labels, feats, image_embeds

    log(f"probe before: {probe(model)}")
    torch.manual_seed(seed)
    aux_head = torch.nn.Linear(model.config.vision_config.hidden_size, train.N_CLASSES)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    # the dense head is new: fit it on the frozen tower first, so its first gradients do not scramble the tower
    train.vision_stage(
        lambda idx: train.vision_features(model, pool.pixels[idx][:, 0]).detach(),
        list(aux_head.parameters()),
        aux_head,
        pool,
        gen,
        100,
        64,
        100,
        log,
        t0,
    )
    model.train()
    train.language_stages(
        model,
        aux_head,
        forward,
        pool,
        gen,
        random.Random(seed),
        tok,
        probe,
        0,
        steps,
        batch,
        min(200, steps // 5),
        log,
        t0,
    )
    model.eval()
    train.save_checkpoint(model, processor, Path(path))
    meta = json.loads((Path(path) / "conversion.json").read_text())
    (Path(path) / "conversion.json").write_text(
        json.dumps({**meta, "finetune_steps": steps, "finetune_seconds": round(time.time() - t0)}, indent=1)
    )
    log(f"fine-tuned {steps} steps in {time.time() - t0:.0f}s")


# ---------------------------------------------------------------------------------------
# Runs through the lmms-eval CLI and the block agreement
# ---------------------------------------------------------------------------------------


def runs(next_ckpt, llava15) -> list[tuple[str, str, str, str]]:
    """(label, model, model_args, task) of every row."""
    cpu = "device=cpu,device_map=cpu"
    nxt = f"pretrained={next_ckpt},{cpu}"
    rows = [
        ("sanity NeXT llava_hf", "llava_hf", nxt, SANITY),
        ("sanity LLaVA-1.5 llava_hf", "llava_hf", f"pretrained={llava15},{cpu}", SANITY),
    ]
    for heads, margs in (
        ("self", "heads=self"),
        ("all", "heads=all"),
        ("shipped", f"heads={HEADS_FILE},check_model_id=false"),
    ):
        for block in ("base", "highres"):
            rows.append((f"NeXT {block} heads={heads}", "llava_lochead", f"{nxt},{margs},block={block}", REC))
        rows.append((f"LLaVA-1.5 heads={heads}", "llava_lochead", f"pretrained={llava15},{cpu},{margs}", REC))
    rows.append(("NeXT llava_hf (generated box)", "llava_hf", nxt, REC))
    return rows


def object_at(scene: dict, x: float, y: float):
    """Index of the object whose box contains the point (x, y in 0..1 of the image), or None."""
    c = scene.get("canvas", 336)
    for i, o in enumerate(scene["objects"]):
        x0, y0, x1, y1 = o["box"]
        if x0 <= x * c <= x1 and y0 <= y * c <= y1:
            return i
    return None


def block_agreement(first_samples, second_samples, names=("base", "highres")) -> dict:
    """Per sample, two runs' boxes against each other: their IoU and whether both centres lie in the same
    object; the IoU over mismatched pairs (each box against the next sample's other box: chance level);
    per run the mean box area, the share of full-width boxes and of box centres on any object."""
    from lmms_eval_plugins.shapeworld.data import rec_docs

    docs = {d["question_id"]: d for d in rec_docs("test")}
    other = {s["doc_id"]: s for s in second_samples}
    pairs = []
    for s in first_samples:
        if s["doc_id"] in other:
            a, b = (r["refcoco_IoU"]["pred"] for r in (s, other[s["doc_id"]]))  # the task's own parse of the answer
            if a and b:
                pairs.append((s["doc_id"], a, b))
    n = max(1, len(pairs))
    hits = [[], []]  # the object under each box's centre (None: background)
    for doc_id, a, b in pairs:
        scene = json.loads(docs[doc_id]["scene"])
        for k, box in enumerate((a, b)):
            hits[k].append(object_at(scene, (box[0] + box[2]) / 2, (box[1] + box[3]) / 2))
    out = {
        "n": len(pairs),
        "mean_iou": sum(box_iou(a, b) for _, a, b in pairs) / n,
        "mean_iou_shifted_pairs": sum(box_iou(pairs[i][1], pairs[(i + 1) % n][2]) for i in range(len(pairs))) / n,
        "same_object": sum(x is not None and x == y for x, y in zip(*hits)) / n,
    }
    for k, name in enumerate(names, start=1):
        out[f"mean_area_{name}"] = sum((p[k][2] - p[k][0]) * (p[k][3] - p[k][1]) for p in pairs) / n
        out[f"full_width_{name}"] = sum(p[k][2] - p[k][0] >= 0.99 for p in pairs) / n
        out[f"centre_on_object_{name}"] = sum(h is not None for h in hits[k - 1]) / n
    return out


def shifted_centre_acc(samples) -> float:
    """Center_ACC's chance level for a run's boxes: each box scored against the next sample's target."""
    preds, gts = [r["refcoco_IoU"]["pred"] for r in samples], [r["refcoco_IoU"]["bbox"] for r in samples]
    n = len(samples)
    inside = lambda g, p: bool(p) and g[0] <= (p[0] + p[2]) / 2 <= g[2] and g[1] <= (p[1] + p[3]) / 2 <= g[3]
    return sum(inside(gts[(i + 1) % n], preds[i]) for i in range(n)) / max(1, n)


def run_dir(root: Path, label: str) -> Path:
    return root / label.replace(" ", "_").replace("=", "-").replace("(", "").replace(")", "")


def metric(results: dict, task: str, name: str):
    return results["results"].get(task, {}).get(f"{name},none")


@torch.no_grad()
def map_structure(path, n: int = 40) -> dict:
    """Why the boxes are wide: per block, the share of the all-heads map's variance carried by its row
    means and by its column means (mean over ``n`` shapeworld_rec test prompts), and the block's share
    of the last prompt token's attention. A map made of row bands thresholded at its mean is a full-width box."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from lmms_eval_plugins.shapeworld import data
    from methods.families import image_geometry
    from methods.lochead_maps import capture_image_maps

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    rows = {}
    for doc in data.rec_docs("test")[:n]:
        image = data.render_doc(doc)
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": data.rec_text(doc["answer"])}]}],
            add_generation_prompt=True,
        )
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        geo = image_geometry(model.config, processor, image.size, inputs["input_ids"])
        pos = geo.positions()
        mean_map = capture_image_maps(model, dict(inputs), pos).mean((0, 1))
        for block in geo.blocks:
            grid = block.grid(mean_map[torch.searchsorted(pos, block.positions)])
            centred = grid - grid.mean()
            total = (centred**2).mean()
            by_row = (centred.mean(1, keepdim=True).expand_as(centred) ** 2).mean() / total
            by_col = (centred.mean(0, keepdim=True).expand_as(centred) ** 2).mean() / total
            rows.setdefault(block.name, []).append([float(by_row), float(by_col), float(grid.sum())])
    return {
        name: dict(zip(("row_share", "column_share", "attention_mass"), torch.tensor(v).mean(0).tolist()))
        for name, v in rows.items()
    }


def tables(summary: dict) -> str:
    """The markdown tables of docs/lochead.md from runs.json."""
    f = lambda v: "-" if v is None else f"{v:.3f}"
    lines = ["| run | task | ACC@0.5 | IoU | Center_ACC (chance) | POPE acc / F1 |", "|---|---|---|---|---|---|"]
    for label, r in summary.items():
        if isinstance(r, dict) and "task" in r:
            rec = (
                (
                    f(r.get("refcoco_ACC@0.5")),
                    f(r.get("refcoco_IoU")),
                    f"{f(r.get('refcoco_Center_ACC'))} ({f(r.get('center_acc_shifted_pairs'))})",
                )
                if r["task"] == REC
                else ("-",) * 3
            )
            pope = f"{f(r.get('pope_accuracy'))} / {f(r.get('pope_f1_score'))}" if r["task"] == SANITY else "-"
            lines.append(f"| {label} | {r['task'].removeprefix('shapeworld_')} | " + " | ".join(rec) + f" | {pope} |")
    lines += [
        "",
        "| heads | pair | box IoU (chance) | centres in the same object | centre on any object | mean box area | full-width boxes |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, a in summary.items():
        if key.startswith("agreement"):
            names = [k.removeprefix("mean_area_") for k in a if k.startswith("mean_area_")]
            two = {
                what: " / ".join(f(a[f"{what}_{n}"]) for n in names)
                for what in ("centre_on_object", "mean_area", "full_width")
            }
            heads = key.split()[1].removeprefix("heads=")
            lines.append(
                f"| {heads} | {' vs '.join(names)} | {f(a['mean_iou'])} ({f(a['mean_iou_shifted_pairs'])}) | {f(a['same_object'])} | "
                f"{two['centre_on_object']} | {two['mean_area']} | {two['full_width']} |"
            )
    lines += [
        "",
        "| model | block | variance of the all-heads map carried by rows / columns | block's share of the last token's attention |",
        "|---|---|---|---|",
    ]
    for key, blocks in summary.items():
        if key.startswith("map structure"):
            for block, v in blocks.items():
                lines.append(
                    f"| {key.removeprefix('map structure ')} | {block} | {f(v['row_share'])} / {f(v['column_share'])} | {f(v['attention_mass'])} |"
                )
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--source", default=str(CHECKPOINTS["shapeworld-tiny"]), help="the trained LLaVA-1.5 checkpoint")
    ap.add_argument("--newline", default="mean", choices=("mean", "zeros"))
    ap.add_argument("--finetune-steps", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--only", default="", help="semicolon-separated run labels (default: all)")
    ap.add_argument("--no-convert", action="store_true", help="reuse --out/checkpoint")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    ckpt = args.out / "checkpoint"
    if not args.no_convert:
        convert(args.source, ckpt, args.newline)
        if args.finetune_steps:
            finetune(ckpt, args.finetune_steps, log=lambda m: print(m, flush=True))
    counts = check_geometry(ckpt)
    print("geometry (processor tokens = methods/geometry.py):", json.dumps(counts), flush=True)
    extra = ("--limit", str(args.limit)) if args.limit else ()
    done = {}
    summary = json.loads((args.out / "runs.json").read_text()) if (args.out / "runs.json").is_file() else {}
    for label, model, margs, task in runs(ckpt, args.source):
        if args.only and label not in args.only.split(";"):
            continue
        out = run_dir(args.out, label)
        res, log = run_lmms_eval(model, margs, task, out, include_path=tasks_dir(), extra=extra, cwd=REPO, timeout=7200)
        if res is None:
            print(f"{label}: FAILED\n{log[-2000:]}", flush=True)
            continue
        done[label] = out
        names = (
            ["pope_accuracy", "pope_yes_ratio", "pope_f1_score"]
            if task == SANITY
            else ["refcoco_ACC@0.5", "refcoco_IoU", "refcoco_Center_ACC"]
        )
        summary[label] = {"model": model, "model_args": margs, "task": task, **{n: metric(res, task, n) for n in names}}
        print(f"{label}: " + " ".join(f"{n} {summary[label][n]:.3f}" for n in names), flush=True)
    for label, _, _, task in runs(ckpt, args.source):  # Center_ACC's chance level, per REC run
        if task == REC and label in summary and run_dir(args.out, label).is_dir():
            summary[label]["center_acc_shifted_pairs"] = shifted_centre_acc(read_samples(run_dir(args.out, label), REC))
    for heads in ("self", "all", "shipped"):
        base, highres, llava15 = (
            args.out / f"{name}_heads-{heads}" for name in ("NeXT_base", "NeXT_highres", "LLaVA-1.5")
        )
        # the two blocks against each other; and the base block against LLaVA-1.5 (same 8x8 input, same weights, tiles added after it)
        for key, a, b, names in (
            (f"agreement heads={heads}", base, highres, ("base", "highres")),
            (f"agreement heads={heads} NeXT base vs LLaVA-1.5", base, llava15, ("base", "llava15")),
        ):
            if a.is_dir() and b.is_dir():
                summary[key] = block_agreement(read_samples(a, REC), read_samples(b, REC), names)
                print(f"{key}: " + json.dumps({k: round(v, 3) for k, v in summary[key].items()}), flush=True)
    for name, path in (("NeXT", ckpt), ("LLaVA-1.5", args.source)):
        summary[f"map structure {name}"] = map_structure(path)
        print(f"map structure {name}: " + json.dumps(summary[f"map structure {name}"]), flush=True)
    summary["geometry"] = counts
    summary["conversion"] = json.loads((ckpt / "conversion.json").read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runs.json").write_text(json.dumps(summary, indent=1))
    (args.out / "table.md").write_text(tables(summary))
    print(tables(summary), flush=True)


if __name__ == "__main__":
    main()
