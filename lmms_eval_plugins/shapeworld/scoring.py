"""Score a ShapeWorld checkpoint on the task test splits in process (greedy answers through the
real processor and chat template, the tasks' own metrics): the end of a training run."""

from __future__ import annotations

import time

import numpy as np
import torch

from . import data, metrics

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
