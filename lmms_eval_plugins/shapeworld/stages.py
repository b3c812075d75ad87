"""The ShapeWorld training stages every recipe shares (train.py's LLaVAs, train_qwen.py's Qwen):
dense patch labels, training examples in the tasks' answer formats, the losses, the learning-rate
schedule, the vision stage and the language stages, and saving a checkpoint."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import data
from .scenes import COLOUR_NAMES, SHAPES, caption, unique_expressions

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


def save_checkpoint(model, processor, out: Path) -> None:
    """fp16 weights (half the size), fp32 compute: config.dtype stays float32, so
    from_pretrained(dtype="auto") upcasts on load."""
    model.config.dtype = torch.float32
    model.save_pretrained(out, state_dict={k: v.detach().to(torch.float16) for k, v in model.state_dict().items()})
    processor.tokenizer.padding_side = "left"
    processor.save_pretrained(out)
