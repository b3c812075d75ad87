"""Train the ShapeWorld tiny LLaVA from scratch on CPU.

    python -m lmms_eval_plugins.shapeworld.train --out DIR --seed 0

Staged recipe (a from-scratch LLaVA otherwise ignores the image for a long time):
1. vision pretraining: the CLIP tower learns a dense per-patch label (colour x shape, or
   background) through a linear head on the feature layer LLaVA reads (hidden_states[-2]);
2. alignment: captions only, whole model, the dense loss kept as an auxiliary term;
3. instruction mix: captions, yes/no questions, counts, relations and referring-expression
   boxes, in exactly the answer formats the lmms-eval tasks parse, dense loss still on.
The yes/no accuracy from the logits is printed against the majority rate while training.
At the end the checkpoint is saved, reloaded through from_pretrained, and scored on the
task test splits with the tasks' metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import data
from .model import GEOMETRIES, Geometry, build_model, geometry_dict
from .scoring import score_checkpoint
from .stages import (
    N_CLASSES,
    encode_batch,
    language_stages,
    object_class,
    patch_labels,
    patch_objects,
    save_checkpoint,
    vision_stage,
)
from .scenes import (
    TEST_WORLD,
    TRAIN_WORLD,
    derive_seed,
    sample_scene,
)


class ScenePool:
    """Pre-rendered training scenes: pixel values (through the real processor) and labels."""

    def __init__(self, n: int, family: str, world, processor, grid: int, log=print):
        t0 = time.time()
        self.scenes, pixels, labels = [], [], []
        chunk = []
        for i in range(n):
            scene = sample_scene(derive_seed(family, i), world)
            img, lab = scene.render(with_labels=True)
            self.scenes.append(scene)
            labels.append(patch_labels(scene, lab, grid))
            chunk.append(img)
            if len(chunk) == 256 or i == n - 1:
                pixels.append(processor.image_processor(images=chunk, return_tensors="pt")["pixel_values"])
                chunk = []
        self.pixels = torch.cat(pixels)
        self.labels = torch.from_numpy(np.stack(labels))
        log(f"pool {family}: {n} scenes rendered in {time.time() - t0:.0f}s")


def vision_features(model, pixel_values):
    """LLaVA's image features (hidden_states[-2] without CLS), before the projector."""
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def lm_logits(model, feats, input_ids, attention_mask, image_embeds=None):
    """The same computation as LlavaForConditionalGeneration.forward, reusing `feats`."""
    if image_embeds is None:
        image_embeds = model.model.multi_modal_projector(feats)
    embeds = model.model.get_input_embeddings()(input_ids)
    is_image = (input_ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(is_image, image_embeds.reshape(-1, embeds.shape[-1]).to(embeds.dtype))
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
    return model.lm_head(hidden)


class YesNoProbe:
    """Held-out yes/no questions (test-world scenes, half of the negatives adversarial):
    accuracy of argmax(yes, no) at the answer position, against the majority rate."""

    def __init__(self, processor, n_image_tokens: int, n: int = 192):
        rng = random.Random(derive_seed("probe"))
        self.examples, self.kinds, imgs = [], [], []
        for i in range(n // 2):
            scene = sample_scene(derive_seed("probe", i), TEST_WORLD)
            neg_rule = "adversarial" if i % 2 else "random"
            yes_shape = rng.choice(scene.shapes_present())
            no_shape = data.pope_negative(scene, neg_rule, rng)
            img = scene.render()
            for shape, ans in ((yes_shape, "yes"), (no_shape, "no")):
                self.examples.append((data.pope_text(shape), ans))
                self.kinds.append(neg_rule if ans == "no" else "yes")
                imgs.append(img)
        self.pixels = processor.image_processor(images=imgs, return_tensors="pt")["pixel_values"]
        self.tok = processor.tokenizer
        self.n_image_tokens = n_image_tokens
        self.yes, self.no = self.tok.convert_tokens_to_ids("yes"), self.tok.convert_tokens_to_ids("no")

    @torch.no_grad()
    def __call__(self, model, grid: int | None = None) -> dict:
        """At the processor's input size, or at ``grid`` x ``grid`` patches (the pixels resized, CLIP's
        position table interpolated): the llava-1.5 recipe trains mostly at half its final grid."""
        pixels, n_img = self.pixels, self.n_image_tokens
        if grid is not None and grid * grid != n_img:
            size = grid * model.config.vision_config.patch_size
            pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
            n_img = grid * grid
        ids, mask, _ = encode_batch(self.tok, [(p, "") for p, _ in self.examples], n_img)
        answer_pos = mask.sum(1) - 2  # last prompt token (before the eos encode_batch appended)
        model.eval()
        logits = torch.cat(
            [
                lm_logits(model, vision_features_at(model, pixels[s : s + 64]), ids[s : s + 64], mask[s : s + 64])[
                    torch.arange(min(64, len(ids) - s)), answer_pos[s : s + 64]
                ]
                for s in range(0, len(ids), 64)
            ]
        )
        model.train()
        last = logits
        says_yes = (last[:, self.yes] > last[:, self.no]).tolist()
        truth = [a == "yes" for _, a in self.examples]
        acc = sum(p == t for p, t in zip(says_yes, truth)) / len(truth)
        adv = [p for p, k in zip(says_yes, self.kinds) if k == "adversarial"]
        rnd = [p for p, k in zip(says_yes, self.kinds) if k == "random"]
        yes = [p for p, k in zip(says_yes, self.kinds) if k == "yes"]
        return {
            "yesno_acc": acc,
            "majority": max(sum(truth), len(truth) - sum(truth)) / len(truth),
            "false_yes_adv": sum(adv) / max(1, len(adv)),
            "false_yes_rand": sum(rnd) / max(1, len(rnd)),
            "true_yes": sum(yes) / max(1, len(yes)),
        }


def train(
    out: Path,
    seed: int = 0,
    pool_size: int = 6000,
    vision_steps: int = 300,
    align_steps: int = 200,
    mix_steps: int = 4000,
    batch: int = 16,
    log=print,
):
    random.seed(seed)
    np.random.seed(seed)
    geometry = Geometry()
    model, processor = build_model(seed=seed, geometry=geometry)
    tok = processor.tokenizer
    n_img = geometry.image_tokens
    log(f"geometry {geometry_dict(geometry)}; parameters {sum(p.numel() for p in model.parameters())}")
    torch.manual_seed(seed)
    aux_head = torch.nn.Linear(geometry.vision_hidden, N_CLASSES)
    pool = ScenePool(pool_size, "fit", TRAIN_WORLD, processor, geometry.grid, log=log)
    probe = YesNoProbe(processor, n_img)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.time()

    # ---- stage 1: dense labels on the vision tower
    vparams = list(model.model.vision_tower.parameters()) + list(aux_head.parameters())
    vision_stage(
        lambda idx: vision_features(model, pool.pixels[idx]),
        vparams,
        aux_head,
        pool,
        gen,
        vision_steps,
        64,
        100,
        log,
        t0,
    )

    # ---- stages 2 and 3: language model on top, dense loss as auxiliary
    def forward(idx, examples):
        ids, mask, labels = encode_batch(tok, examples, n_img)
        feats = vision_features(model, pool.pixels[idx])
        image_embeds = model.model.multi_modal_projector(feats)
        return lm_logits(model, feats, ids, mask, image_embeds), labels, feats, image_embeds

    language_stages(model, aux_head, forward, pool, gen, rng, tok, probe, align_steps, mix_steps, batch, 200, log, t0)

    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, processor, out)
    log(f"training done in {time.time() - t0:.0f}s; saved to {out}")
    return model, processor


# --------------------------------------------------------------------------- llava-1.5 geometry
# shapeworld-llava (issue 24): LLaVA-1.5's 336 px / 14 px / 24x24 geometry, made affordable on two
# cores by progressive resolution: the vision stage and most language steps see the scenes at half
# size (168 px, a 12x12 grid, CLIP position embeddings interpolated from the 24x24 table, which
# thereby gets trained), the last ``fine_steps`` at the full 336 px.
MIX_LLAVA15 = {"caption": 0.15, "pope": 0.25, "count": 0.15, "spatial": 0.2, "rec": 0.25}
FINE_STEP_COST = 4.0  # measured ratio of a 24x24 to a 12x12 step is about 3.5-4 (issue 24's table); for the ETA


class ProgressivePool:
    """Training scenes at the full input size (fp16 pixel values from the real processor), with
    per-grid patch classes and box targets; ``grid`` selects the resolution training uses now
    (smaller grids are bicubic, antialiased downsamples of the normalised pixels: resizing is
    linear, so it commutes with the processor's per-channel normalisation)."""

    def __init__(self, n: int, family: str, world, processor, geometry: Geometry, grids, log=print):
        t0 = time.time()
        self.patch = geometry.patch_size
        self.scenes, pixels = [], []
        objects = {g: [] for g in grids}
        boxes, chunk = [], []
        for i in range(n):
            scene = sample_scene(derive_seed(family, i), world)
            img, lab = scene.render(with_labels=True)
            self.scenes.append(scene)
            for g in grids:
                objects[g].append(patch_objects(scene, lab, g))
            boxes.append(
                np.array([[0.0] * 4] + [scene.normalised_box(k) for k in range(len(scene.objects))], dtype=np.float32)
            )
            chunk.append(img)
            if len(chunk) == 256 or i == n - 1:
                pixels.append(
                    processor.image_processor(images=chunk, return_tensors="pt")["pixel_values"].to(torch.float16)
                )
                chunk = []
        self._pixels = torch.cat(pixels)
        self._objects = {g: torch.from_numpy(np.stack(v)) for g, v in objects.items()}
        classes = [torch.tensor([0] + [object_class(o) for o in sc.objects]) for sc in self.scenes]
        self._labels = {g: torch.stack([c[o] for c, o in zip(classes, v)]) for g, v in self._objects.items()}
        self._boxes = boxes
        self.grid = max(grids)
        log(
            f"pool {family}: {n} scenes at {self._pixels.shape[-1]} px, grids {sorted(grids)}, rendered in {time.time() - t0:.0f}s"
        )

    @property
    def labels(self) -> torch.Tensor:
        return self._labels[self.grid]

    def pixels(self, idx) -> torch.Tensor:
        px = self._pixels[idx].float()
        size = self.grid * self.patch
        if px.shape[-1] != size:
            px = F.interpolate(px, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        return px

    def box_targets(self, idx):
        """(batch, grid*grid, 4) box of each patch's object in 0..1 and the object-patch mask."""
        objs = self._objects[self.grid][idx]
        boxes = torch.stack([torch.from_numpy(self._boxes[i])[o] for i, o in zip(idx.tolist(), objs)])
        return boxes, objs > 0


def vision_features_at(model, pixel_values):
    """``vision_features`` at any input size (CLIP's position table interpolated off its own size)."""
    size = model.config.vision_config.image_size
    out = model.model.vision_tower(
        pixel_values, output_hidden_states=True, interpolate_pos_encoding=pixel_values.shape[-1] != size
    )
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def _save_state(path: Path, model, heads: dict, opt, step: int, gen, rng) -> None:
    """Everything a resumed run needs, written atomically; loaded with weights_only=True."""
    state = {
        "step": step,
        "model": model.state_dict(),
        "heads": {k: h.state_dict() for k, h in heads.items()},
        "opt": None if opt is None else opt.state_dict(),
        "gen": gen.get_state(),
        "rng": rng.getstate(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_state(path: Path) -> dict:
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise SystemExit(f"--resume: {path} is not a readable training state ({e}); delete it to start over") from e
    state["rng"] = (state["rng"][0], tuple(state["rng"][1]), state["rng"][2])
    return state


def _architecture(config: dict) -> dict:
    """A config without what saving adds (dtype, name, architectures): what must match to load weights."""
    return {
        k: _architecture(v) if isinstance(v, dict) else v
        for k, v in config.items()
        if k not in ("dtype", "_name_or_path", "architectures")
    }


def train_llava15(
    out: Path,
    seed: int = 0,
    geometry: Geometry = GEOMETRIES["llava-1.5"],
    pool_size: int = 6000,
    vision_steps: int = 300,
    align_steps: int = 300,
    mix_steps: int = 2250,
    fine_steps: int = 250,
    batch: int = 16,
    coarse_grid: int | None = None,
    probe_size: int = 192,
    save_every: int = 250,
    resume: bool = False,
    stop_after: int | None = None,
    init_from: Path | None = None,
    peak_lr: float = 1e-3,
    probe_every: int = 500,
    log=print,
):
    """Train shapeworld-llava; returns (model, processor), or None when ``stop_after`` ended it early.
    ``init_from``: start from a saved checkpoint's weights (a further run with its own schedule)."""
    random.seed(seed)
    np.random.seed(seed)
    model, processor = build_model(seed=seed, geometry=geometry)
    if init_from is not None:
        from transformers import LlavaForConditionalGeneration

        source = LlavaForConditionalGeneration.from_pretrained(init_from, dtype=torch.float32)
        if _architecture(source.config.to_dict()) != _architecture(model.config.to_dict()):
            raise SystemExit(
                f"--init-from {init_from}: its config differs from this geometry's ({geometry_dict(geometry)})"
            )
        model.load_state_dict(source.state_dict())
        log(f"weights from {init_from}")
    tok = processor.tokenizer
    full = geometry.grid
    coarse = coarse_grid or max(1, full // 2)
    log(
        f"geometry {geometry_dict(geometry)}; grids {coarse} -> {full} (last {fine_steps} steps); parameters {sum(p.numel() for p in model.parameters())}"
    )
    torch.manual_seed(seed)
    aux_head = torch.nn.Linear(geometry.vision_hidden, N_CLASSES)
    box_head = torch.nn.Linear(geometry.vision_hidden, 4)
    heads = {"aux": aux_head, "box": box_head}
    pool = ProgressivePool(pool_size, "fit", TRAIN_WORLD, processor, geometry, {coarse, full}, log=log)
    yes_no = YesNoProbe(processor, geometry.image_tokens, n=probe_size)

    def probe(model):
        """At the full grid (what the checkpoint is scored at) and at the coarse one (what most steps train at)."""
        at_coarse = yes_no(model, grid=coarse)
        return yes_no(model) | {f"yesno_acc_{coarse}x{coarse}": at_coarse["yesno_acc"]}

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "training_state.pt"
    state = _load_state(state_path) if resume and state_path.is_file() else None
    if resume and state is None:
        log(f"--resume: no {state_path}; starting from scratch")
    model.train()
    t0 = time.time()

    def box_loss(idx, feats):
        """Each object patch's features predict its object's box: the position the LM must read out for REC."""
        boxes, mask = pool.box_targets(idx)
        pred = torch.sigmoid(box_head(feats))
        return 5.0 * F.l1_loss(pred[mask], boxes[mask]) if mask.any() else pred.sum() * 0.0

    def save(step, opt):
        _save_state(state_path, model, heads, opt, step, gen, rng)
        log(f"  state saved at step {step} ({state_path.name})")

    if state is None:
        pool.grid = coarse
        vparams = (
            list(model.model.vision_tower.parameters()) + list(aux_head.parameters()) + list(box_head.parameters())
        )
        vision_stage(
            lambda idx: vision_features_at(model, pool.pixels(idx)),
            vparams,
            aux_head,
            pool,
            gen,
            vision_steps,
            64,
            100,
            log,
            t0,
            extra_loss=box_loss,
        )
        save(0, None)
        start, opt_state = 0, None
    else:
        model.load_state_dict(state["model"])
        for k, h in heads.items():
            h.load_state_dict(state["heads"][k])
        gen.set_state(state["gen"])
        rng.setstate(state["rng"])
        start, opt_state = state["step"], state["opt"]
        log(f"resumed at language step {start}")

    total = align_steps + mix_steps
    switch = total - fine_steps

    def on_step(step):
        pool.grid = full if step >= switch else coarse

    def forward(idx, examples):
        ids, mask, labels = encode_batch(tok, examples, pool.grid * pool.grid)
        feats = vision_features_at(model, pool.pixels(idx))
        image_embeds = model.model.multi_modal_projector(feats)
        return lm_logits(model, feats, ids, mask, image_embeds), labels, feats, image_embeds

    finished = language_stages(
        model,
        aux_head,
        forward,
        pool,
        gen,
        rng,
        tok,
        probe,
        align_steps,
        mix_steps,
        batch,
        min(200, max(1, total // 5)),
        log,
        t0,
        mix=MIX_LLAVA15,
        extra_aux=box_loss,
        extra_params=box_head.parameters(),
        on_step=on_step,
        step_cost=lambda s: FINE_STEP_COST if s >= switch else 1.0,
        start_step=start,
        opt_state=opt_state,
        save_every=save_every,
        save_state=save,
        stop_after=stop_after,
        peak_lr=peak_lr,
        probe_every=probe_every,
    )
    if not finished:
        return None
    model.eval()
    save_checkpoint(model, processor, out)
    state_path.unlink(missing_ok=True)
    log(f"training done in {time.time() - t0:.0f}s; saved to {out}")
    return model, processor


def parse_geometry(arch: str, overrides: str | None) -> Geometry:
    """The arch's geometry with ``key=value,...`` overrides (a small configuration for tests)."""
    geometry = GEOMETRIES[arch]
    if not overrides:
        return geometry
    fields = geometry_dict(geometry)
    changes = {}
    for item in overrides.split(","):
        key, _, value = item.partition("=")
        if key not in Geometry.__dataclass_fields__ or not value.isdigit():
            raise SystemExit(
                f"--geometry: {item!r} is not KEY=INT with KEY one of {', '.join(Geometry.__dataclass_fields__)} (now {fields})"
            )
        changes[key] = int(value)
    import dataclasses

    return dataclasses.replace(geometry, **changes)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--arch",
        default="llava",
        choices=["llava", "llava-1.5", "qwen2_5_vl"],
        help="llava: shapeworld-tiny (64 px, 8x8); llava-1.5: shapeworld-llava (336 px, 24x24, 8 LM layers, "
        "progressive resolution, resumable); qwen2_5_vl: shapeworld-tiny-qwen (train_qwen.py)",
    )
    ap.add_argument("--pool-size", type=int, default=6000)
    ap.add_argument("--vision-steps", type=int, default=300)
    ap.add_argument("--align-steps", type=int, default=None, help="default 200 (llava), 300 (llava-1.5)")
    ap.add_argument("--mix-steps", type=int, default=None, help="default 4000 (llava), 2250 (llava-1.5)")
    ap.add_argument(
        "--fine-steps",
        type=int,
        default=250,
        help="llava-1.5: the last steps at the full grid (the rest at half the grid)",
    )
    ap.add_argument(
        "--geometry",
        default=None,
        help="llava-1.5: KEY=INT,... overrides of the geometry (e.g. a small test configuration)",
    )
    ap.add_argument(
        "--probe-size", type=int, default=192, help="llava-1.5: held-out yes/no questions (test world), at both grids"
    )
    ap.add_argument("--probe-every", type=int, default=500, help="llava-1.5: language steps between probes")
    ap.add_argument("--save-every", type=int, default=250, help="llava-1.5: steps between saved training states")
    ap.add_argument("--resume", action="store_true", help="llava-1.5: continue from --out/training_state.pt")
    ap.add_argument(
        "--stop-after", type=int, default=None, help="llava-1.5: save the state and stop after this language step"
    )
    ap.add_argument("--lr", type=float, default=1e-3, help="llava-1.5: peak learning rate of the language stages")
    ap.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="llava-1.5: start from this checkpoint's weights (a further run with its own schedule)",
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster when the 2 cores are shared)")
    ap.add_argument(
        "--eval-limit",
        type=int,
        default=None,
        help="docs per task for the final scores (default: full test splits; 0: no scores)",
    )
    ap.add_argument("--score-only", action="store_true", help="only score an existing checkpoint at --out")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.arch == "qwen2_5_vl":
        from . import train_qwen

        return train_qwen.main(argv)

    def log(msg):
        print(msg, flush=True)

    torch.set_num_threads(args.threads)
    if not args.score_only:
        if args.arch == "llava-1.5":
            done = train_llava15(
                args.out,
                args.seed,
                parse_geometry(args.arch, args.geometry),
                args.pool_size,
                args.vision_steps,
                args.align_steps if args.align_steps is not None else 300,
                args.mix_steps if args.mix_steps is not None else 2250,
                args.fine_steps,
                args.batch,
                probe_size=args.probe_size,
                save_every=args.save_every,
                resume=args.resume,
                stop_after=args.stop_after,
                init_from=args.init_from,
                peak_lr=args.lr,
                probe_every=args.probe_every,
                log=log,
            )
            if done is None:
                return
        else:
            train(
                args.out,
                args.seed,
                args.pool_size,
                args.vision_steps,
                args.align_steps if args.align_steps is not None else 200,
                args.mix_steps if args.mix_steps is not None else 4000,
                args.batch,
                log=log,
            )
    if args.eval_limit == 0:
        return
    scores = score_checkpoint(args.out, args.eval_limit, log=log)
    (args.out / "train_scores.json").write_text(json.dumps(scores, indent=1))


if __name__ == "__main__":
    main()
