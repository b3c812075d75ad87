"""Train `shapeworld-tiny-qwen`: the ShapeWorld recipe of train.py in the Qwen2.5-VL architecture.

    python -m lmms_eval_plugins.shapeworld.train --arch qwen2_5_vl --out DIR --seed 0

Same scenes, tasks, answer formats, stages and auxiliary losses as `shapeworld-tiny`
(train.py): a vision stage with the dense per-token colour x shape loss, a caption-only
alignment stage, then the instruction mix, with the dense and word-alignment losses kept on.
Qwen-specific: the dense labels sit on the 4 x 4 merged tokens (what the LM reads), the
image goes through exactly what lmms-eval's `qwen2_5_vl` does to it (JPEG data URL, then
`qwen_vl_utils.fetch_image` at min = max pixels, then the processor), prompts are the
processor's chat template with lmms-eval's default system prompt, and positions are
Qwen's own M-RoPE (the model computes them from `image_grid_thw` and `mm_token_type_ids`).
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

from . import data
from .qwen_model import SYSTEM_PROMPT, QwenGeometry, build_model, geometry_dict
from .scenes import TEST_WORLD, TRAIN_WORLD, derive_seed, sample_scene
from .scoring import TASK_DOCS, doc_text, score_answers
from .stages import N_CLASSES, language_stages, patch_labels, save_checkpoint, vision_stage


def lmms_eval_image(image, pixels: int):
    """What lmms-eval's simple `qwen2_5_vl` hands the processor for a PIL image: a JPEG
    (quality 85) data URL, decoded and resized by qwen_vl_utils at min = max = `pixels`."""
    from lmms_eval.models.model_utils.media_encoder import encode_image_to_data_url
    from qwen_vl_utils import fetch_image

    url = encode_image_to_data_url(image, image_format="JPEG", mime_type="image/jpeg", convert_rgb=True, quality=85)
    return fetch_image({"image": url, "min_pixels": pixels, "max_pixels": pixels})


def chat_prompt(processor, text: str) -> str:
    """lmms-eval's message layout: system prompt, then the image before the text."""
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "image", "image": "x"}, {"type": "text", "text": text}]},
    ]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class QwenScenePool:
    """Pre-rendered training scenes as lmms-eval would feed them (uint8, 112 px) and the
    dense labels of the merged grid; pixel values are made per batch by the real processor."""

    def __init__(self, n: int, family: str, world, geometry: QwenGeometry, processor, log=print):
        t0 = time.time()
        self.scenes, images, labels = [], [], []
        for i in range(n):
            scene = sample_scene(derive_seed(family, i), world)
            img, lab = scene.render(with_labels=True)
            self.scenes.append(scene)
            labels.append(patch_labels(scene, lab, geometry.grid))
            images.append(np.asarray(lmms_eval_image(img, geometry.pixels)))
        self.images = np.stack(images)
        self.labels = torch.from_numpy(np.stack(labels))
        ours, theirs = image_inputs(processor, self.images[:4]), processor_inputs(processor, self.images[:4])
        assert torch.equal(ours[1], theirs[1]) and (ours[0] - theirs[0]).abs().max() < 1e-5, (
            "image_inputs differs from the processor"
        )
        log(f"pool {family}: {n} scenes rendered in {time.time() - t0:.0f}s")


def image_inputs(processor, images):
    """The processor's (pixel_values, image_grid_thw) for same-size uint8 images already at
    the processor's size (no resize): rescale, normalise, duplicate the frame over the
    temporal patch, patchify in merge-unit order.  10x faster than the processor; checked
    against it in QwenScenePool."""
    ip = processor.image_processor
    x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(ip.image_mean).view(1, 3, 1, 1)) / torch.tensor(ip.image_std).view(1, 3, 1, 1)
    b, c, h, w = x.shape
    ps, ms, tp = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    gh, gw = h // ps, w // ps
    x = x.unsqueeze(1).expand(b, tp, c, h, w).reshape(b, tp, c, gh // ms, ms, ps, gw // ms, ms, ps)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(b * gh * gw, c * tp * ps * ps)
    return x, torch.tensor([[1, gh, gw]] * b)


def processor_inputs(processor, images):
    out = processor.image_processor(images=list(images), return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def merged_tokens(model, pixel_values, grid_thw):
    """(B, tokens, text_hidden): the vision tower's merged output, raster order per image."""
    out = model.model.get_image_features(pixel_values, grid_thw, return_dict=True)
    return out, torch.stack(list(out.pooler_output))


def encode_batch(processor, examples, n_image_tokens: int):
    """Right-padded ids, mask, mm_token_type_ids, labels (-100 outside answer + <|im_end|>)."""
    tok = processor.tokenizer
    image_pad = processor.image_token
    prompts = [chat_prompt(processor, p).replace(image_pad, image_pad * n_image_tokens) for p, _ in examples]
    prompts = tok(prompts, add_special_tokens=False)["input_ids"]
    answers = tok([a for _, a in examples], add_special_tokens=False)["input_ids"]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    seqs = [p + a + [eos] for p, a in zip(prompts, answers)]
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    labels = torch.full((len(seqs), length), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for b, (p, s) in enumerate(zip(prompts, seqs)):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
        labels[b, len(p) : len(s)] = torch.tensor(s[len(p) :])
    mm_types = (ids == processor.image_token_id).long()
    return ids, mask, mm_types, labels


def lm_logits(model, vision_out, ids, mask, mm_types, grid_thw):
    """The model's own forward (M-RoPE positions from the grid), reusing the vision output."""
    return model(
        input_ids=ids,
        attention_mask=mask,
        mm_token_type_ids=mm_types,
        image_grid_thw=grid_thw,
        mm_encoder_outputs={"image": vision_out},
    ).logits


class QwenYesNoProbe:
    """train.YesNoProbe's held-out questions, through the Qwen pipeline."""

    def __init__(self, processor, geometry: QwenGeometry, n: int = 192):
        rng = random.Random(derive_seed("probe"))
        self.examples, self.kinds, imgs = [], [], []
        for i in range(n // 2):
            scene = sample_scene(derive_seed("probe", i), TEST_WORLD)
            neg_rule = "adversarial" if i % 2 else "random"
            yes_shape = rng.choice(scene.shapes_present())
            no_shape = data.pope_negative(scene, neg_rule, rng)
            img = lmms_eval_image(scene.render(), geometry.pixels)
            for shape, ans in ((yes_shape, "yes"), (no_shape, "no")):
                self.examples.append((data.pope_text(shape), ans))
                self.kinds.append(neg_rule if ans == "no" else "yes")
                imgs.append(img)
        self.pixels, self.grid_thw = image_inputs(processor, [np.asarray(i) for i in imgs])
        tok = processor.tokenizer
        self.ids, self.mask, self.mm_types, _ = encode_batch(
            processor, [(p, "") for p, _ in self.examples], geometry.image_tokens
        )
        self.yes, self.no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
        self.answer_pos = self.mask.sum(1) - 2

    @torch.no_grad()
    def __call__(self, model) -> dict:
        model.eval()
        vision_out, _ = merged_tokens(model, self.pixels, self.grid_thw)
        logits = lm_logits(model, vision_out, self.ids, self.mask, self.mm_types, self.grid_thw)
        model.train()
        last = logits[torch.arange(len(self.examples)), self.answer_pos]
        says_yes = (last[:, self.yes] > last[:, self.no]).tolist()
        truth = [a == "yes" for _, a in self.examples]
        rate = lambda kind: sum(p for p, k in zip(says_yes, self.kinds) if k == kind) / max(1, self.kinds.count(kind))  # noqa: E731
        return {
            "yesno_acc": sum(p == t for p, t in zip(says_yes, truth)) / len(truth),
            "majority": max(sum(truth), len(truth) - sum(truth)) / len(truth),
            "false_yes_adv": rate("adversarial"),
            "false_yes_rand": rate("random"),
            "true_yes": rate("yes"),
        }


def train(
    out: Path,
    seed: int = 0,
    pool_size: int = 3000,
    vision_steps: int = 300,
    align_steps: int = 200,
    mix_steps: int = 2800,
    batch: int = 16,
    log=print,
):
    random.seed(seed)
    np.random.seed(seed)
    geometry = QwenGeometry()
    model, processor = build_model(seed=seed, geometry=geometry)
    tok = processor.tokenizer
    n_img = geometry.image_tokens
    log(f"geometry {geometry_dict(geometry)}; parameters {sum(p.numel() for p in model.parameters())}")
    torch.manual_seed(seed)
    aux_head = torch.nn.Linear(geometry.text_hidden, N_CLASSES)
    pool = QwenScenePool(pool_size, "fit", TRAIN_WORLD, geometry, processor, log=log)
    probe = QwenYesNoProbe(processor, geometry)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.time()

    # ---- stage 1: dense labels on the merged vision tokens (tower + merger)
    vparams = list(model.model.visual.parameters()) + list(aux_head.parameters())
    vision_stage(
        lambda idx: merged_tokens(model, *image_inputs(processor, pool.images[idx.numpy()]))[1],
        vparams,
        aux_head,
        pool,
        gen,
        vision_steps,
        32,
        50,
        log,
        t0,
    )

    # ---- stages 2 and 3: language model on top, dense + word-alignment losses as auxiliary
    def forward(idx, examples):
        ids, mask, mm_types, labels = encode_batch(processor, examples, n_img)
        pixel_values, grid_thw = image_inputs(processor, pool.images[idx.numpy()])
        vision_out, image_embeds = merged_tokens(model, pixel_values, grid_thw)
        return lm_logits(model, vision_out, ids, mask, mm_types, grid_thw), labels, image_embeds, image_embeds

    def save_partial(step):  # a usable checkpoint if the run has to be cut short
        save_checkpoint(model, processor, out / f"partial-{step}")
        model.train()

    language_stages(
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
        min(200, align_steps),
        log,
        t0,
        after_probe=save_partial,
    )

    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, processor, out)
    log(f"training done in {time.time() - t0:.0f}s; saved to {out}")
    return model, processor


# --------------------------------------------------------------------------- scoring
@torch.no_grad()
def generate_answers(model, processor, images, texts, max_new_tokens: int, batch: int = 16) -> list:
    """Greedy answers through lmms-eval's message layout; every prompt of a batch has the
    same length (same image size, grouped by text length), so no padding is involved."""
    tok = processor.tokenizer
    prompts = [chat_prompt(processor, t) for t in texts]
    by_len = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(tok(p)["input_ids"]), []).append(i)
    answers = [None] * len(prompts)
    for group in by_len.values():
        for s in range(0, len(group), batch):
            ids = group[s : s + batch]
            inputs = processor(images=[images[i] for i in ids], text=[prompts[i] for i in ids], return_tensors="pt")
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            for i, row in zip(ids, out[:, inputs["input_ids"].shape[1] :]):
                answers[i] = tok.decode(row, skip_special_tokens=True)
    return answers


def score_checkpoint(path, limit: int | None = None, log=print) -> dict:
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype="auto").eval()
    processor = AutoProcessor.from_pretrained(path)
    pixels = processor.image_processor.size["longest_edge"]
    scores = {}
    for task in TASK_DOCS:
        t0 = time.time()
        docs = TASK_DOCS[task]()[:limit]
        images = [lmms_eval_image(data.render_doc(d), pixels) for d in docs]
        max_new = {"shapeworld_chair": 48, "shapeworld_rec": 12}.get(task, 4)
        answers = generate_answers(model, processor, images, [doc_text(task, d) for d in docs], max_new)
        scores[task] = score_answers(task, docs, answers)
        log(f"{task}: " + " ".join(f"{k} {v:.3f}" for k, v in scores[task].items()) + f" ({time.time() - t0:.0f}s)")
    return scores


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="qwen2_5_vl", choices=["qwen2_5_vl"])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool-size", type=int, default=3000)
    ap.add_argument("--vision-steps", type=int, default=300)
    ap.add_argument("--align-steps", type=int, default=200)
    ap.add_argument("--mix-steps", type=int, default=2800)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 was ~2x faster than 2 on the shared 2-core machine)"
    )
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--score-only", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def log(msg):
        print(msg, flush=True)

    torch.set_num_threads(args.threads)
    if not args.score_only:
        train(
            args.out,
            args.seed,
            args.pool_size,
            args.vision_steps,
            args.align_steps,
            args.mix_steps,
            args.batch,
            log=log,
        )
    scores = score_checkpoint(args.out, args.eval_limit, log=log)
    (args.out / "train_scores.json").write_text(json.dumps(scores, indent=1))


if __name__ == "__main__":
    main()
