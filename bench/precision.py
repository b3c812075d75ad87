"""How often the official code's fp16 steps change the outcome against our fp32 (issue 27 item 3).

    python bench/precision.py --model tiny --n 50 --out results/precision
    python bench/precision.py --model shapeworld-llava --n 50 --out results/precision [--only pm,pai]

The official implementations run LLaVA-1.5 in fp16; every golden fixture ran them in fp32. This
script keeps the model in fp32 and does only the steps the official code does in fp16 in fp16 (the
same ``precision=official`` arithmetic the wrappers offer where it matters, or a simulation here for
the techniques that have no such option), and counts how often the outcome changes:

- ``pm``: ``llava_pm preset=official_pope`` with ``precision=fp32`` vs ``official`` (the per-layer maps
  rounded to fp16 and summed in numpy float16, attention_resampler.py:186-246): search passes,
  blocked sets, the 8-bit 24x24 map, the magnified image, the answer's greedy ids.
- ``pai_pope``, ``pai_chair``: ``llava_pai preset=official`` in fp32 vs with CFG.py on fp16 logits
  (``Pai(precision="official")``, methods-level only: no model_arg, it changed nothing measurable):
  greedy ids (any change, and the first step that changes).
- ``lochead``: the last prompt row's attention maps, ranked by HEAD (8ce33b0) and v2 (9ffe219) from
  fp32 maps and from the maps stored in fp16 with fp16 sums and entropies: HEAD's elbow head, the
  top-10 heads, v2's kept heads, v2's box.
- ``topk``: FastV's and vlm-interp's pruning selection (top-k of mean attention) from fp32 and from
  fp16 scores: how many selected tokens change.
- ``paint``: PAINT's local/summary/spatial token selection (CLS attention of the vision tower) summed
  in float32 vs fp16 (``selection_precision=float16``).

Models: ``tiny`` is the parity fixtures' random LLaVA-1.5-shaped model (32 x 32 heads, hidden 64) on
ShapeWorld images with random word ids as prompts; ``shapeworld-llava`` is the project's trained
checkpoint in LLaVA-1.5's geometry on the ShapeWorld POPE (pm, pai answers), CHAIR (pai captions)
and REC (lochead) test documents. Writes ``<out>/<model>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import types
import zlib
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmms_eval_plugins.testing import load_parity_script  # noqa: E402
from methods import hooks, pm, pm_view  # noqa: E402
from methods.pm_magnify import official_quantise  # noqa: E402
from methods.technique import Request  # noqa: E402

PROMPT = "USER: <image>\n{text} ASSISTANT:"


# ---------------------------------------------------------------------------------------
# Models and inputs
# ---------------------------------------------------------------------------------------


class Bench:
    """A model with a way to turn (image, text) into a Request and its generate inputs."""

    def __init__(self, name: str):
        self.name = name
        torch.set_num_threads(1)
        if name == "tiny":
            tiny = load_parity_script("tiny_llava15")
            from transformers import CLIPImageProcessor

            self.tiny = tiny
            self.model = tiny.build_hf_model()
            self.model.config._attn_implementation = "eager"
            size = tiny.VISION["image_size"]
            self.processor = types.SimpleNamespace(
                image_processor=CLIPImageProcessor(
                    size={"shortest_edge": size},
                    crop_size={"height": size, "width": size},
                    image_mean=tiny.CLIP_MEAN,
                    image_std=tiny.CLIP_STD,
                )
            )
            self.image_token_id = tiny.IMAGE_TOKEN_ID
        else:
            from transformers import AutoProcessor, LlavaForConditionalGeneration

            from lmms_eval_plugins.paths import checkpoint_dir

            path = checkpoint_dir(name)
            self.model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
            self.processor = AutoProcessor.from_pretrained(path)
            self.image_token_id = self.model.config.image_token_id
        hooks.install(self.model)
        self.n_layers = hooks.num_layers(self.model)

    def request(self, image, text: str, seed: int):
        """(Request, generate kwargs) for one image and question."""
        if self.name == "tiny":
            rng = np.random.default_rng(seed)
            before = rng.integers(2, 31000, 6).tolist()
            after = rng.integers(2, 31000, 8).tolist()
            ids = self.tiny.hf_ids(before, after)
            pv = self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
            config = None
        else:
            enc = self.processor(images=[image], text=PROMPT.format(text=text), return_tensors="pt")
            ids, pv, config = enc["input_ids"], enc["pixel_values"], self.model.config
        req = Request(
            input_ids=ids,
            image_token_id=self.image_token_id,
            prompt_len=ids.shape[1],
            images=[image],
            processor=self.processor,
            config=config,
        )
        return req, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pv}


def documents(kind: str, n: int) -> list[tuple]:
    """(image, text, key) of the first n ShapeWorld test documents of a task family."""
    from lmms_eval_plugins.shapeworld import data

    if kind == "pope":
        docs = data.pope_docs("adversarial", "test", n=2 * ((n + 1) // 2))[:n]
        return [(data.render_doc(d), d["question"], d["question_id"]) for d in docs]
    if kind == "chair":
        return [(data.render_doc(d), d["question"], d["question_id"]) for d in data.chair_docs("test", n=n)]
    if kind == "rec":
        return [(data.render_doc(d), data.rec_text(d["answer"]), d["question_id"]) for d in data.rec_docs("test", n=n)]
    raise ValueError(kind)


def new_ids(out, req) -> list[int]:
    seq = out.sequences if hasattr(out, "sequences") else out
    return seq[0, req.input_ids.shape[1] :].tolist()


def first_difference(a: list, b: list) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ---------------------------------------------------------------------------------------
# PM
# ---------------------------------------------------------------------------------------


def run_pm(bench: Bench, docs, new_tokens: int) -> dict:
    rows = []
    for image, text, key in docs:
        req, inputs = bench.request(image, text, seed=zlib.crc32(str(key).encode()))
        outs = {}
        for precision in ("fp32", "official"):
            t = pm.PerceptionMagnifier(
                bench.n_layers,
                pm_view.image_grid(bench.model),
                **{**pm.PRESETS["official_pope"], "precision": precision},
            )
            with torch.no_grad():
                out = t.generate(bench.model, req, **inputs, max_new_tokens=new_tokens, do_sample=False)
            mag = t.last_magnified
            outs[precision] = {
                "ids": new_ids(out, req),
                "passes": mag.search.iterations,
                "blocked": [b.copy() for b in mag.search.blocked],
                "map8": official_quantise(torch.from_numpy(np.asarray(mag.grid_map, dtype=np.float32))),
                "image": np.asarray(mag.image),
                "raw0": np.asarray(mag.search.raw[0], dtype=np.float64),
            }
        a, b = outs["fp32"], outs["official"]
        same_blocked = len(a["blocked"]) == len(b["blocked"]) and all(
            np.array_equal(x, y) for x, y in zip(a["blocked"], b["blocked"])
        )
        rows.append(
            {
                "key": str(key),
                "passes": [a["passes"], b["passes"]],
                "blocked_same": bool(same_blocked),
                "map8_cells_differ": int((a["map8"] != b["map8"]).sum()),
                "map8_max_diff": int(np.abs(a["map8"].astype(int) - b["map8"].astype(int)).max()),
                "image_pixels_differ": int((a["image"] != b["image"]).any(-1).sum()),
                "image_pixels": int(a["image"].shape[0] * a["image"].shape[1]),
                "first_map_rel_diff": float(np.abs(a["raw0"] - b["raw0"]).max() / max(a["raw0"].max(), 1e-30)),
                "ids_same": a["ids"] == b["ids"],
                "first_token_same": a["ids"][:1] == b["ids"][:1],
            }
        )
    n = len(rows)
    return {
        "n": n,
        "new_tokens": new_tokens,
        "passes_differ": sum(r["passes"][0] != r["passes"][1] for r in rows),
        "blocked_differ": sum(not r["blocked_same"] for r in rows),
        "map8_differ": sum(r["map8_cells_differ"] > 0 for r in rows),
        "map8_cells_differ_mean": float(np.mean([r["map8_cells_differ"] for r in rows])),
        "map8_cells_differ_max": max(r["map8_cells_differ"] for r in rows),
        "image_differ": sum(r["image_pixels_differ"] > 0 for r in rows),
        "image_pixels_differ_mean_frac": float(np.mean([r["image_pixels_differ"] / r["image_pixels"] for r in rows])),
        "first_token_differ": sum(not r["first_token_same"] for r in rows),
        "ids_differ": sum(not r["ids_same"] for r in rows),
        "mean_passes_fp32": float(np.mean([r["passes"][0] for r in rows])),
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------
# PAI
# ---------------------------------------------------------------------------------------


def run_guided(bench: Bench, docs, new_tokens: int, technique: str = "pai") -> dict:
    from lmms_eval_plugins.models.pai import OFFICIAL as PAI_OFFICIAL
    from methods.pai import Pai

    rows = []
    for image, text, key in docs:
        req, inputs = bench.request(image, text, seed=zlib.crc32(str(key).encode()))
        ids = {}
        for precision in ("fp32", "official"):
            t = Pai(bench.n_layers, **{**PAI_OFFICIAL, "precision": precision})
            with torch.no_grad():
                out = t.generate(bench.model, req, **inputs, max_new_tokens=new_tokens, do_sample=False)
            ids[precision] = new_ids(out, req)
        d = first_difference(ids["fp32"], ids["official"])
        rows.append({"key": str(key), "first_difference": d, "steps": len(ids["fp32"])})
    n = len(rows)
    steps_same = [r["first_difference"] if r["first_difference"] is not None else r["steps"] for r in rows]
    return {
        "n": n,
        "new_tokens": new_tokens,
        "ids_differ": sum(r["first_difference"] is not None for r in rows),
        "first_token_differ": sum(r["first_difference"] == 0 for r in rows),
        "steps_before_first_difference_mean": float(np.mean(steps_same)),
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------
# Localization heads
# ---------------------------------------------------------------------------------------


def run_lochead(bench: Bench, docs, top: int = 10) -> dict:
    from methods.lochead_maps import capture_image_maps, combine_head_maps, image_grid
    from methods.lochead_official import (
        _head_sums,
        official_box_grid,
        official_elbow_head_index,
        rank_heads_official,
        rank_heads_official_v2,
    )

    rows = []
    for image, text, key in docs:
        req, inputs = bench.request(image, text, seed=zlib.crc32(str(key).encode()))
        pos = hooks.image_positions(inputs["input_ids"], bench.image_token_id)
        grid = image_grid(bench.model, pos.numel())
        maps = capture_image_maps(bench.model, inputs, pos)  # (L, H, N) float32
        r = {"key": str(key)}
        for name, fp16 in (("fp32", False), ("fp16", True)):
            sums = _head_sums(maps, fp16)
            head = rank_heads_official(maps, grid, fp16)
            v2 = rank_heads_official_v2(maps, grid, fp16=fp16)
            v2_top = [(x["layer"], x["head"]) for x in v2][:5]
            src = maps.half().float() if fp16 else maps
            combined = combine_head_maps(torch.stack([src[l, h] for l, h in v2_top]).reshape(-1, *grid))
            r[name] = {
                "elbow": official_elbow_head_index(sums),
                "sum_ties": len(sums) - len(set(sums)),
                "head_top": [(x["layer"], x["head"]) for x in head if math.isfinite(x["spatial_entropy"])][:top],
                "head_candidates": sum(math.isfinite(x["spatial_entropy"]) for x in head),
                "v2_top": v2_top,
                "v2_kept": len(v2),
                "v2_box": list(official_box_grid(combined)),
            }
        a, b = r["fp32"], r["fp16"]
        r["elbow_same"] = a["elbow"] == b["elbow"]
        r["head_top_same"] = a["head_top"] == b["head_top"]
        r["head_top_overlap"] = len(set(a["head_top"]) & set(b["head_top"]))
        r["head_top1_same"] = a["head_top"][:1] == b["head_top"][:1]
        r["v2_top_same"] = a["v2_top"] == b["v2_top"]
        r["v2_box_same"] = a["v2_box"] == b["v2_box"]
        rows.append(r)
    return {
        "n": len(rows),
        "elbow_differ": sum(not r["elbow_same"] for r in rows),
        "fp16_sum_ties_mean": float(np.mean([r["fp16"]["sum_ties"] for r in rows])),
        "head_top10_differ": sum(not r["head_top_same"] for r in rows),
        "head_top10_overlap_mean": float(np.mean([r["head_top_overlap"] for r in rows])),
        "head_top1_differ": sum(not r["head_top1_same"] for r in rows),
        "v2_top5_differ": sum(not r["v2_top_same"] for r in rows),
        "v2_box_differ": sum(not r["v2_box_same"] for r in rows),
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------
# Top-k selections: FastV and vlm-interp's pruning (attn_over_gen)
# ---------------------------------------------------------------------------------------


def _half(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16)


def topk_change(s32: torch.Tensor, s16: torch.Tensor, k: int) -> dict:
    """How the top-k of fp16 scores relates to the top-k of the fp32 scores they came from.

    ``forced``: tokens the fp32 top-k keeps although fp16 ranks them strictly below the fp16 k-th value
    (so every tie-breaking of fp16 changes the set); ``ties``: fp16 scores equal to the k-th value
    (the set then depends on how the official top-k breaks ties); ``swapped``: tokens that differ from
    the fp32 set when fp16 ties go to the earlier token."""
    keep32 = set(s32.topk(k).indices.tolist())
    kth = torch.sort(s16.float(), descending=True).values[k - 1]
    above = set((s16.float() > kth).nonzero().flatten().tolist())
    tied = set((s16.float() == kth).nonzero().flatten().tolist())
    forced = len(keep32 - above - tied) + len(above - keep32)
    order = sorted(range(s16.numel()), key=lambda i: (-float(s16[i]), i))
    swapped = len(keep32 - set(order[:k]))
    return {"forced": forced, "ties": len(tied), "swapped": swapped}


def run_topk(bench: Bench, docs, describe_tokens: int, fastv_layer: int = 2) -> dict:
    from methods import reprompt_scoring as scoring
    from methods.lochead_maps import capture_image_maps

    fastv = {r: [] for r in (0.5, 0.25)}
    prune = {r: [] for r in (0.05, 0.25)}
    for image, text, key in docs:
        req, inputs = bench.request(image, text, seed=zlib.crc32(str(key).encode()))
        pos = hooks.image_positions(inputs["input_ids"], bench.image_token_id)
        n = pos.numel()
        maps = capture_image_maps(bench.model, inputs, pos, [fastv_layer - 1])[0]  # (heads, n) last prompt row
        s32 = maps.float().mean(0)
        s16 = _half(_half(maps).float().mean(0))  # fp16 probabilities, their head mean rounded to fp16
        for r in fastv:
            fastv[r].append(topk_change(s32, s16, int(n * r)))
        rows, _, _, _ = scoring.describe_pass(
            bench.model, inputs["input_ids"], inputs["pixel_values"], pos, describe_tokens
        )
        for r in prune:
            per_layer = []
            for layer in sorted(rows):
                x = rows[layer].float()  # (steps, heads, n)
                a32 = x.mean(0).mean(0)
                a16 = _half(_half(_half(x).float().mean(0)).float().mean(0))  # attention_store.py: fp16 means
                per_layer.append(topk_change(a32, a16, scoring.official_count(r, n)))
            prune[r].append(per_layer)

    def summary(items):
        return {
            "changed": sum(x["forced"] > 0 for x in items),
            "changed_tie_first": sum(x["swapped"] > 0 for x in items),
            "boundary_ties": sum(x["ties"] > 1 for x in items),
            "tokens_changed_mean": float(np.mean([x["forced"] for x in items])),
            "tokens_swapped_mean": float(np.mean([x["swapped"] for x in items])),
            "n": len(items),
        }

    return {
        "n": len(docs),
        "describe_tokens": describe_tokens,
        "fastv_layer": fastv_layer,
        "fastv": {str(r): summary(v) for r, v in fastv.items()},
        "prune_layers": {str(r): summary([x for doc in v for x in doc]) for r, v in prune.items()},
        "prune_samples_any_layer_changed": {
            str(r): sum(any(x["forced"] > 0 for x in doc) for doc in v) for r, v in prune.items()
        },
        "prune_samples_any_layer_swapped": {
            str(r): sum(any(x["swapped"] > 0 for x in doc) for doc in v) for r, v in prune.items()
        },
    }


# ---------------------------------------------------------------------------------------
# PAINT's token selection (the vision tower's CLS attention)
# ---------------------------------------------------------------------------------------


def run_paint(bench: Bench, docs) -> dict:
    from lmms_eval_plugins.models.paint import OFFICIAL as PAINT_OFFICIAL
    from methods.paint import Paint
    from methods.paint_selection import TokenSelector

    variants = {"official": PAINT_OFFICIAL, "paper_spatial": {**PAINT_OFFICIAL, "beta": 0.4, "spatial_ratio": 0.05}}
    out = {}
    for name, params in variants.items():
        t = Paint.for_model(bench.model, **params)
        rows = []
        for image, text, key in docs:
            req, inputs = bench.request(image, text, seed=zlib.crc32(str(key).encode()))
            sel = {}
            for dtype in (torch.float32, torch.float16):
                selector = TokenSelector(
                    *t.vision_layers, t.grid, params["top_ratio"], params["spatial_ratio"], params["spatial"], dtype
                )
                with torch.no_grad(), hooks.edited(bench.model, *selector.captures):
                    bench.model(**inputs, use_cache=False, logits_to_keep=1)
                sel[dtype] = selector.current()
            a, b = sel[torch.float32], sel[torch.float16]
            rows.append({k: int((getattr(a, k) != getattr(b, k)).sum()) for k in ("local", "summary", "spatial")})
        out[name] = {
            "n": len(rows),
            "changed": sum(any(r.values()) for r in rows),
            **{f"{k}_changed": sum(r[k] > 0 for r in rows) for k in ("local", "summary", "spatial")},
            **{
                f"{k}_tokens_changed_mean": float(np.mean([r[k] for r in rows]))
                for k in ("local", "summary", "spatial")
            },
        }
    return out


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------

RUNS = {
    "pm": ("pope", lambda b, d, a: run_pm(b, d, a.pm_tokens)),
    "pai_pope": ("pope", lambda b, d, a: run_guided(b, d, 1)),
    "pai_chair": ("chair", lambda b, d, a: run_guided(b, d, a.caption_tokens)),
    "lochead": ("rec", lambda b, d, a: run_lochead(b, d)),
    "topk": ("chair", lambda b, d, a: run_topk(b, d, a.describe_tokens)),
    "paint": ("chair", lambda b, d, a: run_paint(b, d)),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny | shapeworld-llava")
    ap.add_argument("--n", type=int, default=50, help="documents per measurement")
    ap.add_argument("--only", default="", help="comma-separated subset of " + ",".join(RUNS))
    ap.add_argument("--pm_tokens", type=int, default=1, help="PM's answer tokens (POPE: the first token)")
    ap.add_argument("--caption_tokens", type=int, default=32, help="PAI's caption length (greedy steps)")
    ap.add_argument("--describe_tokens", type=int, default=32, help="pruning's describe pass (official: 300)")
    ap.add_argument("--out", default="results/precision")
    args = ap.parse_args(argv)
    only = [s for s in args.only.split(",") if s] or list(RUNS)
    bench = Bench(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.model}.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    for name in only:
        kind, fn = RUNS[name]
        t0 = time.time()
        res = fn(bench, documents(kind, args.n), args)
        res["seconds"] = round(time.time() - t0, 1)
        res["command"] = f"python bench/precision.py --model {args.model} --n {args.n} --only {name}"
        report[name] = res
        path.write_text(json.dumps(report, indent=1, default=_jsonable))
        summary = {k: v for k, v in res.items() if k != "rows"}
        print(name, json.dumps(summary, default=_jsonable), flush=True)


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x) if math.isfinite(x) else str(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(type(x))


if __name__ == "__main__":
    main()
