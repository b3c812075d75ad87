"""PM's forward passes per sample on the trained ShapeWorld checkpoints, and how often refine=fast agrees.

    python bench/pm_passes.py --pretrained shapeworld-llava --tasks random,adversarial --limit 50 \
        --configs default,official_pope --fast [--json out.json]

For the first ``limit`` test questions of each POPE split: the refinement passes of PM's search
(``refresh=once``; the language-model passes of the map are 1 + that) with each configuration
(``default``: our defaults, the paper's POPE alpha/kernel/beta; ``official_pope``: the reference's
arithmetic), as mean / min / max and a histogram, and the CPU time per sample. With ``--fast`` each
sample is also run with ``refine=fast`` on the same configuration, and the script counts how often
the fast variant gives the exact variant's search (the same number of passes, the same final blocked
set, H* within 1e-6), the same magnified image (8-bit pixels equal; and the mean absolute difference
of the two images, next to that of the exact image and the unmagnified view) and the same answer
(the same generated ids, greedy, up to ``--new_tokens``). The prompt is the task's (question + post-prompt in the
checkpoint's chat template); the images are the tasks' 336 px scenes.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmms_eval_plugins.base import resolve_pretrained  # noqa: E402
from lmms_eval_plugins.shapeworld import data  # noqa: E402
from methods import hooks, pm, pm_view  # noqa: E402
from methods.technique import Request  # noqa: E402

CONFIGS = {"default": {}, **{name: dict(values) for name, values in pm.PRESETS.items()}}


def samples(processor, model, task: str, limit: int):
    for doc in data.pope_docs(task, "test")[:limit]:
        image = data.render_doc(doc).convert("RGB")
        msgs = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": data.pope_text(doc["object"])}]}
        ]
        prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=[image], text=prompt, return_tensors="pt")
        ids = inputs["input_ids"]
        req = Request(ids, model.config.image_token_id, ids.shape[1], [image], prompt, processor, config=model.config)
        yield doc, dict(inputs), req


def run_one(model, technique, inputs, req, new_tokens: int):
    start = time.process_time()
    ids = technique.generate(model, req, **inputs, max_new_tokens=new_tokens, do_sample=False)
    cpu = time.process_time() - start
    mag = technique.last_magnified
    return {
        "passes": mag.search.iterations,
        "blocked": mag.search.blocked[-1] if mag.search.blocked else np.zeros_like(mag.search.h_star, dtype=bool),
        "h_star": mag.search.h_star,
        "image": np.asarray(mag.image),
        "view": np.asarray(mag.view),
        "ids": ids[0, req.input_ids.shape[1] :].tolist(),
        "cpu": cpu,
    }


def agreement(exact: dict, fast: dict) -> dict:
    same_search = (
        exact["passes"] == fast["passes"]
        and np.array_equal(exact["blocked"], fast["blocked"])
        and exact["h_star"].shape == fast["h_star"].shape
        and float(np.max(np.abs(exact["h_star"] - fast["h_star"]))) <= 1e-6
    )
    return {
        "same_passes": exact["passes"] == fast["passes"],
        "same_final_blocked": bool(np.array_equal(exact["blocked"], fast["blocked"])),
        "same_search": bool(same_search),
        "same_image": bool(np.array_equal(exact["image"], fast["image"])),
        "same_answer": exact["ids"] == fast["ids"],
        # mean absolute 8-bit difference: fast vs exact magnified image, and exact's against its unmagnified view
        "image_diff": float(np.abs(exact["image"].astype(float) - fast["image"]).mean()),
        "magnification": float(np.abs(exact["image"].astype(float) - exact["view"]).mean()),
    }


def summary(passes: list[int]) -> str:
    hist = collections.Counter(passes)
    return (
        f"mean {np.mean(passes):.2f}, min {min(passes)}, max {max(passes)} "
        f"(histogram {', '.join(f'{k}:{hist[k]}' for k in sorted(hist))})"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pretrained", default="shapeworld-llava")
    ap.add_argument("--tasks", default="random,adversarial", help="POPE splits, comma-separated")
    ap.add_argument("--limit", type=int, default=50, help="first N test questions of each split")
    ap.add_argument("--configs", default="default,official_pope", help=f"of {', '.join(CONFIGS)}")
    ap.add_argument("--fast", action="store_true", help="also run refine=fast and count the agreement")
    ap.add_argument("--new_tokens", type=int, default=4, help="greedy answer tokens compared")
    ap.add_argument("--json", default=None, help="write the per-sample records here")
    a = ap.parse_args()
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.set_num_threads(1)
    ckpt = resolve_pretrained(a.pretrained)
    model = AutoModelForImageTextToText.from_pretrained(ckpt, attn_implementation="sdpa").eval()
    processor = AutoProcessor.from_pretrained(ckpt)
    hooks.install(model)
    n_layers, grid = hooks.num_layers(model), pm_view.image_grid(model)
    configs = [c for c in a.configs.split(",") if c]
    records = []
    for name in configs:
        variants = {"exact": pm.PerceptionMagnifier(n_layers, grid, **CONFIGS[name])}
        if a.fast:
            variants["fast"] = pm.PerceptionMagnifier(n_layers, grid, **{**CONFIGS[name], "refine": "fast"})
        for task in a.tasks.split(","):
            for doc, inputs, req in samples(processor, model, task, a.limit):
                out = {v: run_one(model, t, inputs, req, a.new_tokens) for v, t in variants.items()}
                rec = {"config": name, "task": task, "doc": doc["question"], "answer": doc["answer"]}
                rec.update({f"{v}_passes": o["passes"] for v, o in out.items()})
                rec.update({f"{v}_cpu_s": round(o["cpu"], 4) for v, o in out.items()})
                rec.update({f"{v}_ids": o["ids"] for v, o in out.items()})
                if a.fast:
                    rec.update(agreement(out["exact"], out["fast"]))
                records.append(rec)
    print(f"{a.pretrained}: {n_layers} LM layers, {grid}x{grid} image tokens, deep layers from the PM default scaling")
    for name in configs:
        for task in a.tasks.split(",") + ["all"]:
            sel = [r for r in records if r["config"] == name and (task == "all" or r["task"] == task)]
            line = (
                f"{name:>14} {task:>12} n={len(sel):3d}: refinement passes {summary([r['exact_passes'] for r in sel])}"
            )
            line += f"; CPU {np.mean([r['exact_cpu_s'] for r in sel]):.3f} s/sample"
            print(line)
            if a.fast:
                agree = {
                    k: sum(r[k] for r in sel)
                    for k in ("same_search", "same_final_blocked", "same_image", "same_answer")
                }
                print(
                    f"{'':>14} {'':>12}   refine=fast: passes {summary([r['fast_passes'] for r in sel])}; "
                    f"CPU {np.mean([r['fast_cpu_s'] for r in sel]):.3f} s/sample; agrees with exact: "
                    + ", ".join(f"{k} {v}/{len(sel)}" for k, v in agree.items())
                    + f"; image difference fast vs exact {np.mean([r['image_diff'] for r in sel]):.2f} (8-bit levels, "
                    f"mean abs), exact vs unmagnified {np.mean([r['magnification'] for r in sel]):.2f}"
                )
    if a.json:
        Path(a.json).write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    with torch.no_grad():
        raise SystemExit(main())
