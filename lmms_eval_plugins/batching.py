"""``--batch_size N`` for the llava_* and internvl_hf_* names: lmms-eval 0.7.3's ``llava_hf`` generates one request
at a time (its ``generate_until`` asserts ``batch_size_per_gpu == 1``), and so does its ``internvl_hf`` (its
constructor asserts ``batch_size == 1``), so our wrappers batch for them.

Each request's prompt is built as the class builds it alone (``lm.batch_prompt``; llava_hf simple: ``<image>``
prepended when the context has none, one user turn through the tokenizer's chat template, Vicuna's when it has
none; chat: the document's messages through the processor's chat template; internvl_hf's simple twin: the chat
turn it becomes), then up to N requests with the same generation arguments go through the processor together,
left-padded (the side ``llava_hf`` sets), and through one ``generate`` call, where the technique places each
request's edits in its own batch row (``methods.technique.Batch``). The answers are decoded per row as
``llava_hf`` decodes its one row. Requests this cannot batch exactly go through the class's own path one at a
time, unchanged: sampling (a batch draws its random numbers in another order),
beam search, and requests without exactly one image.
"""

from __future__ import annotations

import json
from typing import Callable

from PIL import Image
from tqdm import tqdm

# llava_hf's defaults for a request's generation arguments (models/simple/llava_hf.py generate_until)
DEFAULT_GEN = {"max_new_tokens": 1024, "temperature": 0, "top_p": None, "num_beams": 1}


def prompt_simple(lm, args) -> tuple[str, list]:
    """(prompt text, visuals) of one simple-class request, as llava_hf's simple generate_until builds them."""
    from lmms_eval.models.simple.llava_hf import DEFAULT_IMAGE_TOKEN, VICUNA_CHAT_TEMPLATE

    context, _, doc_to_visual, doc_id, task, split = args
    visuals = lm.flatten([doc_to_visual(lm.task_dict[task][split][doc_id])])
    if DEFAULT_IMAGE_TOKEN not in context and visuals:
        context = f"{' '.join([DEFAULT_IMAGE_TOKEN] * len(visuals))}\n{context}"
    if lm.chat_template is not None:
        lm.tokenizer.chat_template = lm.chat_template
    elif lm.tokenizer.chat_template is None:
        lm.tokenizer.chat_template = VICUNA_CHAT_TEMPLATE
    messages = [{"role": "user", "content": context}]
    return lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), visuals


def prompt_chat(lm, args) -> tuple[str, list]:
    """(prompt text, visuals) of one chat-class request, as llava_hf's (and internvl_hf's) chat generate_until
    builds them."""
    from lmms_eval.protocol import ChatMessages

    _, doc_to_messages, _, doc_id, task, split = args
    messages = ChatMessages(messages=doc_to_messages(lm.task_dict[task][split][doc_id]))
    visuals, videos, _ = messages.extract_media()
    if videos:
        return "", []  # not an image request: llava_hf's own path
    text = getattr(lm, lm.processor_attr).apply_chat_template(
        messages.model_dump()["messages"], tokenize=False, add_generation_prompt=True
    )
    return text, list(visuals)


def _gen_kwargs(lm, args) -> dict:
    return dict(args[1] if lm.is_simple else args[2])


def _batchable(gen: dict) -> bool:
    """Greedy, one beam: what a batch answers exactly as batch size 1 does."""
    gen = {**DEFAULT_GEN, **gen}
    return gen["temperature"] == 0 and int(gen["num_beams"]) == 1


def generate_batched(lm, requests, one_at_a_time: Callable) -> list[str]:
    """Answers to ``requests`` (in their order), up to ``lm.batch_size`` per generate call; ``one_at_a_time``
    is llava_hf's own generate_until, for the requests a batch cannot serve exactly."""
    answers: list = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        gen = _gen_kwargs(lm, r.args)
        gen.pop("until", None)  # llava_hf drops it without using it
        groups.setdefault(json.dumps(gen, sort_keys=True, default=str), []).append(i)
    plan = []  # (request indices, prompts) per batch; a batch of one index goes through llava_hf itself
    for key, idx in groups.items():
        if not _batchable(json.loads(key)):
            plan += [([i], None) for i in idx]
            continue
        prompts = {i: lm.batch_prompt(requests[i].args) for i in idx}
        single = [i for i in idx if not _one_image(prompts[i][1])]
        plan += [([i], None) for i in single]
        rest = sorted((i for i in idx if i not in single), key=lambda i: -len(prompts[i][0]))  # similar lengths
        for k in range(0, len(rest), lm.batch_size):
            chunk = rest[k : k + lm.batch_size]
            plan.append((chunk, [prompts[i] for i in chunk]))
    pbar = tqdm(total=len(requests), disable=(lm.rank != 0), desc="Model Responding (batched)")
    for idx, prompts in plan:
        if prompts is None or len(idx) == 1:
            answers[idx[0]] = _alone(lm, requests[idx[0]], one_at_a_time)
        else:
            gen = {**DEFAULT_GEN, **_gen_kwargs(lm, requests[idx[0]].args)}
            for i, text in zip(idx, _generate(lm, prompts, gen)):
                answers[i] = text
        pbar.update(len(idx))
    pbar.close()
    return answers


def _one_image(visuals) -> bool:
    return len(visuals) == 1 and isinstance(visuals[0], Image.Image)


def _alone(lm, request, one_at_a_time):
    """One request through llava_hf's own generate_until (it asserts batch size 1)."""
    saved = lm.batch_size_per_gpu
    lm.batch_size_per_gpu = 1
    try:
        return one_at_a_time([request])[0]
    finally:
        lm.batch_size_per_gpu = saved


def _generate(lm, prompts: list[tuple[str, list]], gen: dict) -> list:
    """One left-padded generate call over several (prompt, [image]) pairs; each row decoded as llava_hf decodes
    (the chat class: a GenerationResult counting the row's tokens up to its end of sequence, as at batch size 1)."""
    inputs = getattr(lm, lm.processor_attr)(
        images=[visuals[0] for _, visuals in prompts],
        text=[text for text, _ in prompts],
        padding=True,
        padding_side="left",
        return_tensors="pt",
    ).to(lm._device, lm.model.dtype)
    cont = lm.model.generate(
        **inputs,
        do_sample=False,
        temperature=None,
        top_p=gen["top_p"],
        num_beams=1,
        max_new_tokens=gen["max_new_tokens"],
        use_cache=lm.use_cache,
        pad_token_id=lm.eot_token_id,
        eos_token_id=lm.eot_token_id,
    )
    rows = cont[:, inputs["input_ids"].shape[-1] :]
    texts = lm.tokenizer.batch_decode(rows, skip_special_tokens=True)
    if lm.is_simple:
        return texts
    from lmms_eval.api.instance import GenerationResult, TokenCounts

    out = []
    for row, text in zip(rows.tolist(), texts):
        n = row.index(lm.eot_token_id) + 1 if lm.eot_token_id in row else len(row)
        out.append(GenerationResult(text=text, token_counts=TokenCounts(output_tokens=n)))
    return out
