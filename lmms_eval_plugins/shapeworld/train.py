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
from .model import Geometry, build_model, geometry_dict
from .scenes import COLOUR_NAMES, SHAPES, TEST_WORLD, TRAIN_WORLD, caption, derive_seed, sample_scene, unique_expressions

N_CLASSES = 1 + len(COLOUR_NAMES) * len(SHAPES)
KINDS = ("caption", "pope", "count", "spatial", "rec")
MIX = {"caption": 0.2, "pope": 0.35, "count": 0.15, "spatial": 0.15, "rec": 0.15}


def object_class(obj) -> int:
    return 1 + COLOUR_NAMES.index(obj.colour) * len(SHAPES) + SHAPES.index(obj.shape)


def patch_labels(scene, label_img, grid: int) -> np.ndarray:
    """Per-patch class: the object covering >= 15% of the patch (most pixels wins), and
    always the object whose centre lies in the patch, so small objects get a label."""
    lab = np.asarray(label_img)
    cell = lab.shape[0] // grid
    cells = lab[: cell * grid, : cell * grid].reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3).reshape(grid * grid, cell * cell)
    out = np.zeros(grid * grid, dtype=np.int64)
    best = np.zeros(grid * grid)
    for k, obj in enumerate(scene.objects):
        cover = (cells == k + 1).mean(axis=1)
        take = (cover >= 0.15) & (cover > best)
        out[take] = object_class(obj)
        best[take] = cover[take]
    for obj in scene.objects:
        cx, cy = obj.centre
        out[min(int(cy) // cell, grid - 1) * grid + min(int(cx) // cell, grid - 1)] = object_class(obj)
    return out


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
    return 0.5 * (F.cross_entropy(flat, shape_ids[labels].reshape(-1), ignore_index=-100) + F.cross_entropy(flat, colour_ids[labels].reshape(-1), ignore_index=-100))


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
        tok = processor.tokenizer
        self.ids, self.mask, _ = encode_batch(tok, [(p, "") for p, _ in self.examples], n_image_tokens)
        self.yes, self.no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
        self.answer_pos = self.mask.sum(1) - 2  # last prompt token (before the eos we appended)

    @torch.no_grad()
    def __call__(self, model) -> dict:
        model.eval()
        logits = lm_logits(model, vision_features(model, self.pixels), self.ids, self.mask)
        model.train()
        last = logits[torch.arange(len(self.examples)), self.answer_pos]
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


def vision_stage(features, vparams, aux_head, pool, gen, steps: int, batch: int, log_every: int, log, t0: float) -> None:
    """Stage 1: the vision side learns each patch's colour x shape class (dense labels), so the
    language stages start from features that see the objects. ``features(idx)`` -> (batch, tokens, d)."""
    opt = torch.optim.AdamW(vparams, lr=2e-3, weight_decay=0.01)
    run = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, 2e-3, 50)
        idx = torch.randint(len(pool.scenes), (batch,), generator=gen)
        logits = aux_head(features(idx))
        loss = F.cross_entropy(logits.reshape(-1, N_CLASSES), pool.labels[idx].reshape(-1))
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


def language_stages(model, aux_head, forward, pool, gen, rng, tok, probe, align_steps: int, mix_steps: int, batch: int,
                    warmup: int, log, t0: float, after_probe=None) -> None:
    """Stages 2 (captions) and 3 (the task mix): the whole model on the language loss, with the
    dense and word-alignment losses as auxiliaries. ``forward(idx, examples)`` -> (logits, labels,
    features for the dense head, image embeddings in the LM's space): the only architecture-specific part."""
    params = list(model.parameters()) + list(aux_head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.98))
    total = align_steps + mix_steps
    shape_ids, colour_ids = class_word_targets(tok)
    kinds, weights = zip(*MIX.items())
    run = []
    for step in range(total):
        stage = "align" if step < align_steps else "mix"
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, 1e-3, warmup)
        kind = "caption" if stage == "align" else rng.choices(kinds, weights=weights)[0]
        idx = torch.randint(len(pool.scenes), (batch,), generator=gen)
        examples = [training_example(kind, pool.scenes[i], rng) for i in idx.tolist()]
        logits, labels, feats, image_embeds = forward(idx, examples)
        loss_lm = lm_loss(logits, labels)
        loss_aux = F.cross_entropy(aux_head(feats).reshape(-1, N_CLASSES), pool.labels[idx].reshape(-1))
        loss_aux = loss_aux + word_alignment_loss(model, image_embeds, pool.labels[idx], shape_ids, colour_ids)
        loss = loss_lm + 0.5 * loss_aux
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run.append((kind, loss_lm.item(), loss_aux.item()))
        if (step + 1) % 100 == 0:
            per_kind = {k: np.mean([l for kk, l, _ in run if kk == k]) for k in KINDS if any(kk == k for kk, _, _ in run)}
            txt = " ".join(f"{k} {v:.3f}" for k, v in per_kind.items())
            log(f"[{stage} {step + 1}/{total}] lm {np.mean([l for _, l, _ in run]):.3f} aux {np.mean([a for _, _, a in run]):.3f} | {txt} ({time.time() - t0:.0f}s)")
            run = []
        if (step + 1) % 500 == 0 or step + 1 == total:
            log(f"  probe {step + 1}: " + " ".join(f"{k} {v:.3f}" for k, v in probe(model).items()))
            if after_probe is not None and step + 1 < total:
                after_probe(step + 1)


def train(out: Path, seed: int = 0, pool_size: int = 6000, vision_steps: int = 300, align_steps: int = 200, mix_steps: int = 4000, batch: int = 16, log=print):
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
    vision_stage(lambda idx: vision_features(model, pool.pixels[idx]), vparams, aux_head, pool, gen, vision_steps, 64, 100, log, t0)

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
    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}], tokenize=False, add_generation_prompt=True) for t in texts]
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    answers = [None] * len(prompts)
    by_len = {}
    for i, n in enumerate(lengths):
        by_len.setdefault(n, []).append(i)
    for group in by_len.values():
        for s in range(0, len(group), batch):
            ids = group[s : s + batch]
            inputs = processor(images=[images[i] for i in ids], text=[prompts[i] for i in ids], return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool-size", type=int, default=6000)
    ap.add_argument("--vision-steps", type=int, default=300)
    ap.add_argument("--align-steps", type=int, default=200)
    ap.add_argument("--mix-steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster when the 2 cores are shared)")
    ap.add_argument("--eval-limit", type=int, default=None, help="docs per task for the final scores (default: full test splits)")
    ap.add_argument("--score-only", action="store_true", help="only score an existing checkpoint at --out")
    ap.add_argument("--arch", default="llava", choices=["llava", "qwen2_5_vl"], help="qwen2_5_vl: train shapeworld-tiny-qwen (train_qwen.py)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.arch == "qwen2_5_vl":
        from . import train_qwen

        return train_qwen.main(argv)

    def log(msg):
        print(msg, flush=True)

    torch.set_num_threads(args.threads)
    if not args.score_only:
        train(args.out, args.seed, args.pool_size, args.vision_steps, args.align_steps, args.mix_steps, args.batch, log=log)
    scores = score_checkpoint(args.out, args.eval_limit, log=log)
    (args.out / "train_scores.json").write_text(json.dumps(scores, indent=1))


if __name__ == "__main__":
    main()
