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
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import data, metrics
from .model import GEOMETRIES, Geometry, build_model, geometry_dict
from .scenes import (
    COLOUR_NAMES,
    SHAPES,
    TEST_WORLD,
    TRAIN_WORLD,
    caption,
    derive_seed,
    sample_scene,
    unique_expressions,
)

N_CLASSES = 1 + len(COLOUR_NAMES) * len(SHAPES)
KINDS = ("caption", "pope", "count", "spatial", "rec")
MIX = {"caption": 0.2, "pope": 0.35, "count": 0.15, "spatial": 0.15, "rec": 0.15}


def object_class(obj) -> int:
    return 1 + COLOUR_NAMES.index(obj.colour) * len(SHAPES) + SHAPES.index(obj.shape)


def patch_objects(scene, label_img, grid: int) -> np.ndarray:
    """Per-patch object (index + 1, 0 = background): the object covering >= 15% of the patch
    (most pixels wins), and always the object whose centre lies in the patch, so small objects
    get a patch."""
    lab = np.asarray(label_img)
    cell = lab.shape[0] // grid
    cells = (
        lab[: cell * grid, : cell * grid]
        .reshape(grid, cell, grid, cell)
        .transpose(0, 2, 1, 3)
        .reshape(grid * grid, cell * cell)
    )
    out = np.zeros(grid * grid, dtype=np.int64)
    best = np.zeros(grid * grid)
    for k in range(len(scene.objects)):
        cover = (cells == k + 1).mean(axis=1)
        take = (cover >= 0.15) & (cover > best)
        out[take] = k + 1
        best[take] = cover[take]
    for k, obj in enumerate(scene.objects):
        cx, cy = obj.centre
        out[min(int(cy) // cell, grid - 1) * grid + min(int(cx) // cell, grid - 1)] = k + 1
    return out


def patch_labels(scene, label_img, grid: int) -> np.ndarray:
    """Per-patch class (colour x shape of the patch's object, 0 = background)."""
    classes = np.array([0] + [object_class(o) for o in scene.objects], dtype=np.int64)
    return classes[patch_objects(scene, label_img, grid)]


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


def training_example(kind: str, scene, rng: random.Random):
    """(prompt text, answer text) in the tasks' prompt and answer formats."""
    present = scene.shapes_present()
    absent = [s for s in SHAPES if s not in present]
    if kind == "caption":
        return data.CHAIR_PROMPT, caption(scene)
    if kind == "pope":
        if rng.random() < 0.5:
            return data.pope_text(rng.choice(present)), "yes"
        return data.pope_text(rng.choice(absent)), "no"
    if kind == "count":
        shape = rng.choice(present) if rng.random() < 0.85 else rng.choice(absent)
        return data.count_text(shape), str(scene.count(shape))
    if kind == "spatial":
        ex = data.spatial_example(scene, rng)
        if ex is not None:
            return data.spatial_text(ex[0]), ex[1]
        return training_example("pope", scene, rng)
    if kind == "rec":
        candidates = [k for k in range(len(scene.objects)) if unique_expressions(scene, k)]
        if candidates:
            k = rng.choice(candidates)
            return data.rec_text(rng.choice(unique_expressions(scene, k))), data.format_box(scene.normalised_box(k))
        return training_example("caption", scene, rng)
    raise ValueError(kind)


def prompt_string(text: str, n_image_tokens: int) -> str:
    """What the chat template plus the processor's <image> expansion produce."""
    return "USER: " + "<image>" * n_image_tokens + "\n" + text + " ASSISTANT:"


def encode_batch(tokenizer, examples, n_image_tokens: int):
    """Right-padded input ids, attention mask, labels (-100 outside the answer + </s>)."""
    prompts = tokenizer([prompt_string(p, n_image_tokens) for p, _ in examples])["input_ids"]
    answers = tokenizer([a for _, a in examples], add_special_tokens=False)["input_ids"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    seqs = [p + a + [eos] for p, a in zip(prompts, answers)]
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    labels = torch.full((len(seqs), length), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for b, (p, s) in enumerate(zip(prompts, seqs)):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
        labels[b, len(p) : len(s)] = torch.tensor(s[len(p) :])
    return ids, mask, labels


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


def class_word_targets(tokenizer):
    """For each dense class, the token ids of its shape and colour words (-100: background)."""
    shape = torch.full((N_CLASSES,), -100, dtype=torch.long)
    colour = torch.full((N_CLASSES,), -100, dtype=torch.long)
    for c, cname in enumerate(COLOUR_NAMES):
        for k, sname in enumerate(SHAPES):
            cls = 1 + c * len(SHAPES) + k
            shape[cls] = tokenizer.convert_tokens_to_ids(sname)
            colour[cls] = tokenizer.convert_tokens_to_ids(cname)
    return shape, colour


def word_alignment_loss(model, image_embeds, labels, shape_ids, colour_ids):
    """Pull each object patch's projected embedding towards the input embeddings of its
    shape and colour words (cosine logits over the vocabulary, temperature 0.1).  Without
    it the LM spends thousands of steps at chance before it binds "circle" in a question
    to circle patches in the image; with it the binding is a near-identity match."""
    emb = F.normalize(model.model.get_input_embeddings().weight, dim=-1)
    logits = F.normalize(image_embeds, dim=-1) @ emb.T / 0.1
    flat = logits.reshape(-1, logits.shape[-1])
    return 0.5 * (
        F.cross_entropy(flat, shape_ids[labels].reshape(-1), ignore_index=-100)
        + F.cross_entropy(flat, colour_ids[labels].reshape(-1), ignore_index=-100)
    )


def lm_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


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


def vision_stage(
    features, vparams, aux_head, pool, gen, steps: int, batch: int, log_every: int, log, t0: float, extra_loss=None
) -> None:
    """Stage 1: the vision side learns each patch's colour x shape class (dense labels), so the
    language stages start from features that see the objects. ``features(idx)`` -> (batch, tokens, d);
    ``extra_loss(idx, feats)``, when given, is added (the llava-1.5 recipe's box targets)."""
    opt = torch.optim.AdamW(vparams, lr=2e-3, weight_decay=0.01)
    run = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, 2e-3, 50)
        idx = torch.randint(len(pool.scenes), (batch,), generator=gen)
        feats = features(idx)
        logits = aux_head(feats)
        loss = F.cross_entropy(logits.reshape(-1, N_CLASSES), pool.labels[idx].reshape(-1))
        if extra_loss is not None:
            loss = loss + extra_loss(idx, feats)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vparams, 1.0)
        opt.step()
        obj = pool.labels[idx] > 0
        run.append((loss.item(), (logits.argmax(-1)[obj] == pool.labels[idx][obj]).float().mean().item()))
        if (step + 1) % log_every == 0:
            l, a = np.mean(run, axis=0)
            log(f"[vision {step + 1}/{steps}] dense loss {l:.3f} object-patch acc {a:.3f} ({time.time() - t0:.0f}s)")
            run = []


def language_stages(
    model,
    aux_head,
    forward,
    pool,
    gen,
    rng,
    tok,
    probe,
    align_steps: int,
    mix_steps: int,
    batch: int,
    warmup: int,
    log,
    t0: float,
    after_probe=None,
    *,
    mix=MIX,
    extra_aux=None,
    extra_params=(),
    on_step=None,
    step_cost=None,
    start_step: int = 0,
    opt_state=None,
    save_every: int = 0,
    save_state=None,
    stop_after: int | None = None,
    peak_lr: float = 1e-3,
    probe_every: int = 500,
) -> bool:
    """Stages 2 (captions) and 3 (the task mix): the whole model on the language loss, with the
    dense and word-alignment losses as auxiliaries. ``forward(idx, examples)`` -> (logits, labels,
    features for the dense head, image embeddings in the LM's space): the only architecture-specific part.

    Resumable: ``start_step`` and ``opt_state`` continue a run that ``save_state(step, opt)`` saved
    every ``save_every`` steps (the caller restores ``gen`` and ``rng``); ``stop_after`` ends early
    after saving (returns False).  ``on_step(step)`` runs before each step (progressive resolution),
    ``step_cost(step)`` weighs steps for the ETA."""
    params = list(model.parameters()) + list(aux_head.parameters()) + list(extra_params)
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.01, betas=(0.9, 0.98))
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    total = align_steps + mix_steps
    step_cost = step_cost or (lambda s: 1.0)
    shape_ids, colour_ids = class_word_targets(tok)
    kinds, weights = zip(*mix.items())
    run, t_run = [], time.time()
    for step in range(start_step, total):
        if on_step is not None:
            on_step(step)
        stage = "align" if step < align_steps else "mix"
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, peak_lr, warmup)
        kind = "caption" if stage == "align" else rng.choices(kinds, weights=weights)[0]
        idx = torch.randint(len(pool.scenes), (batch,), generator=gen)
        examples = [training_example(kind, pool.scenes[i], rng) for i in idx.tolist()]
        logits, labels, feats, image_embeds = forward(idx, examples)
        loss_lm = lm_loss(logits, labels)
        loss_aux = F.cross_entropy(aux_head(feats).reshape(-1, N_CLASSES), pool.labels[idx].reshape(-1))
        loss_aux = loss_aux + word_alignment_loss(model, image_embeds, pool.labels[idx], shape_ids, colour_ids)
        if extra_aux is not None:
            loss_aux = loss_aux + extra_aux(idx, feats)
        loss = loss_lm + 0.5 * loss_aux
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run.append((kind, loss_lm.item(), loss_aux.item()))
        if (step + 1) % 100 == 0:
            per_kind = {
                k: np.mean([l for kk, l, _ in run if kk == k]) for k in KINDS if any(kk == k for kk, _, _ in run)
            }
            txt = " ".join(f"{k} {v:.3f}" for k, v in per_kind.items())
            done = sum(step_cost(s) for s in range(step + 1 - len(run), step + 1))
            eta = (time.time() - t_run) / done * sum(step_cost(s) for s in range(step + 1, total))
            log(
                f"[{stage} {step + 1}/{total}] lm {np.mean([l for _, l, _ in run]):.3f} aux {np.mean([a for _, _, a in run]):.3f} | {txt} ({time.time() - t0:.0f}s, eta {eta / 60:.0f} min)"
            )
            run, t_run = [], time.time()
        if (step + 1) % probe_every == 0 or step + 1 == total:
            log(f"  probe {step + 1}: " + " ".join(f"{k} {v:.3f}" for k, v in probe(model).items()))
            if after_probe is not None and step + 1 < total:
                after_probe(step + 1)
        if (
            save_state is not None
            and step + 1 < total
            and ((save_every and (step + 1) % save_every == 0) or step + 1 == stop_after)
        ):
            save_state(step + 1, opt)
        if stop_after is not None and step + 1 >= stop_after and step + 1 < total:
            log(f"stopped after step {step + 1} (--stop-after); continue with --resume")
            return False
    return True


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


def save_checkpoint(model, processor, out: Path) -> None:
    """fp16 weights (half the size), fp32 compute: config.dtype stays float32, so
    from_pretrained(dtype="auto") upcasts on load."""
    model.config.dtype = torch.float32
    model.save_pretrained(out, state_dict={k: v.detach().to(torch.float16) for k, v in model.state_dict().items()})
    processor.tokenizer.padding_side = "left"
    processor.save_pretrained(out)


# --------------------------------------------------------------------------- scoring
TASK_DOCS = {
    "shapeworld_pope_random": lambda: data.pope_docs("random"),
    "shapeworld_pope_popular": lambda: data.pope_docs("popular"),
    "shapeworld_pope_adversarial": lambda: data.pope_docs("adversarial"),
    "shapeworld_chair": data.chair_docs,
    "shapeworld_rec": data.rec_docs,
    "shapeworld_count": data.count_docs,
    "shapeworld_spatial": data.spatial_docs,
}


def doc_text(task: str, doc) -> str:
    if task.startswith("shapeworld_pope"):
        return doc["question"] + data.POPE_POST_PROMPT
    if task == "shapeworld_chair":
        return data.CHAIR_PROMPT
    if task == "shapeworld_rec":
        return data.rec_text(doc["answer"])
    if task == "shapeworld_count":
        return data.COUNT_PRE_PROMPT + doc["question"]
    if task == "shapeworld_spatial":
        return data.spatial_text(doc["prompt"], len(doc["choices"]))
    raise ValueError(task)


@torch.no_grad()
def generate_answers(model, processor, images, texts, max_new_tokens: int, batch: int = 16) -> list:
    """Greedy answers through the real processor and chat template.  Prompts are batched
    only with prompts of the same length, so no padding changes the computation."""
    tok = processor.tokenizer
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for t in texts
    ]
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    answers = [None] * len(prompts)
    by_len = {}
    for i, n in enumerate(lengths):
        by_len.setdefault(n, []).append(i)
    for group in by_len.values():
        for s in range(0, len(group), batch):
            ids = group[s : s + batch]
            inputs = processor(images=[images[i] for i in ids], text=[prompts[i] for i in ids], return_tensors="pt")
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.eos_token_id,
                eos_token_id=tok.eos_token_id,
            )
            for i, row in zip(ids, out[:, inputs["input_ids"].shape[1] :]):
                answers[i] = tok.decode(row, skip_special_tokens=True)
    return answers


def score_task(model, processor, task: str, limit: int | None = None) -> dict:
    docs = TASK_DOCS[task]()[:limit]
    images = [data.render_doc(d) for d in docs]
    texts = [doc_text(task, d) for d in docs]
    max_new = {"shapeworld_chair": 48, "shapeworld_rec": 12}.get(task, 4)
    answers = generate_answers(model, processor, images, texts, max_new)
    return score_answers(task, docs, answers)


def score_answers(task: str, docs, answers) -> dict:
    """The task's metrics over greedy answers (the tasks' own parsers, in metrics.py)."""
    if task.startswith("shapeworld_pope"):
        return metrics.pope_scores([(a, d["answer"]) for a, d in zip(answers, docs)])
    if task == "shapeworld_chair":
        return metrics.chair_scores([(a, d["gt_object"]) for a, d in zip(answers, docs)])
    if task == "shapeworld_rec":
        return metrics.rec_scores([(a, d["bbox"]) for a, d in zip(answers, docs)])
    if task == "shapeworld_count":
        return {"acc": float(np.mean([metrics.count_score(a, d["number"]) for a, d in zip(answers, docs)]))}
    return {"cv_bench_acc": float(np.mean([metrics.spatial_correct(a, d["answer"]) for a, d in zip(answers, docs)]))}


def score_checkpoint(path, limit: int | None = None, log=print) -> dict:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path, dtype="auto").eval()
    processor = AutoProcessor.from_pretrained(path)
    scores = {}
    for task in TASK_DOCS:
        t0 = time.time()
        scores[task] = score_task(model, processor, task, limit)
        log(f"{task}: " + " ".join(f"{k} {v:.3f}" for k, v in scores[task].items()) + f" ({time.time() - t0:.0f}s)")
    return scores


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
