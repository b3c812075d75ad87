"""Golden re-prompting fixtures for OmriKaduri/vlm-interp @ 8f38051 (oracle, as vlminterp_knockout.py).

    python bench/parity/vlminterp_cache.py --model BUILD_DIR --out tests/fixtures/official/reprompt

run_on_coco.py (``-k``) writes, from the describe pass, ``kv_cache.h5`` (``TokenAttentionStore.set_kv``:
the cache after the last forward call, RoPE applied) and the per-layer top-k; run_on_coco_from_cache.py
then answers each question through ``LlavaWrapper.chat_step_by_step_from_cache`` (llava_wrapper.py),
written out here:
- per layer, from ``query_tokens_mask`` (the non-image prompt positions; the mask itself is made by the
  patched generation utils, not available here: assumed to be every prompt position outside the image),
  ``system`` = query positions before the first gap, ``user`` = after it; the image entries are that
  layer's top-k, sorted ascending; strategy ``qs`` = cat[system, image, user], ``q`` = query only,
  ``s`` = image only (no BOS, no system prompt);
- the new prompt ``f"{question} ASSISTANT:"`` through ``tokenizer_image_token`` (so it starts with BOS),
  no image, positions ``arange(len) + position_id_offset`` with the offset ``max(query positions) + 1``
  (q, qs) or ``max(top-k over layers) + 1`` (s); each decode step continues the positions
  (the patched ``prepare_inputs_for_generation``); greedy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import tiny_llava15 as tiny  # noqa: E402
import vlminterp_knockout as ko  # noqa: E402
import vlminterp_prune as vp  # noqa: E402

FOLLOWUP = "Is there a blue square in the image?"  # a later question on the same image
STRATEGIES = ("qs", "q", "s")


def context(cache, query, topk, strategy):
    """Per layer (keys, values) of the compressed cache (chat_step_by_step_from_cache)."""
    gaps = ((query[:-1] - query[1:]) != -1).nonzero()[0][0]
    system, user = query[: gaps + 1], query[gaps + 1 :]
    layers = []
    for l, (k, v) in enumerate(cache):
        image = torch.tensor(sorted(topk[l]))
        idx = {"qs": torch.cat([system, image, user]), "q": query, "s": image}[strategy]
        layers.append((k[..., idx, :], v[..., idx, :]))
    offset = int(query.max()) + 1 if strategy != "s" else max(max(t) for t in topk) + 1
    return layers, offset


def answer(model, layers, offset, new_ids, steps):
    """Greedy generation from the compressed cache with explicit positions."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    for l, (k, v) in enumerate(layers):
        cache.update(k.clone(), v.clone(), l)
    n_cache = layers[0][0].shape[-2]
    ids, scores = new_ids, []
    pos = torch.arange(new_ids.shape[1])[None] + offset
    with torch.inference_mode():
        for _ in range(steps):
            mask = torch.ones(1, n_cache + pos[0, -1].item() - offset + 1, dtype=torch.long)
            out = model(input_ids=ids, past_key_values=cache, position_ids=pos, attention_mask=mask, use_cache=True)
            s = out.logits[0, -1].float()
            scores.append(s)
            nxt = s.argmax()
            cache, ids, pos = out.past_key_values, nxt.view(1, 1), pos[:, -1:] + 1
    return torch.stack(scores)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--scratch")
    args = ap.parse_args()
    model = ko.load_official(args.model)
    pixels = tiny.fixed_pixels(1)
    d_before, d_after = ko.prompt_ids(vp.DESCRIBE)
    d_ids = torch.tensor([[1, *d_before, tiny.IMAGE_TOKEN_INDEX, *d_after]])
    img_start = 1 + len(d_before)
    img = torch.arange(img_start, img_start + tiny.N_IMAGE_TOKENS)
    prompt_len = d_ids.shape[1] - 1 + tiny.N_IMAGE_TOKENS
    ko.STATE.update(image=img, flags=dict(max_layer=32, min_token=1), topk=None)
    gen = vp.generate(model, d_ids, pixels, vp.DESCRIBE_TOKENS, output_attentions=True)
    rows = [[layer[0, :, -1, :].float() for layer in step] for step in gen.attentions]
    topk, _ = vp.topk_attn_over_gen(rows, img, int(vp.K_FRACTION * len(img)))
    topk = [t.tolist() for t in topk]
    cache = [(k, v) for k, v in gen.past_key_values]
    query = torch.tensor([p for p in range(prompt_len) if not img_start <= p < img_start + len(img)])
    new_ids = torch.tensor([[1, *[ko.word_id(w) for w in f"{FOLLOWUP} ASSISTANT:".split()]]])
    out = {"commit": ko.COMMIT, "followup_ids": new_ids[0].tolist(), "cache_entries_full": cache[0][0].shape[-2],
           "query_positions": query.tolist(), "topk": topk, "runs": []}
    full = {}
    for strategy in STRATEGIES:
        layers, offset = context(cache, query, topk, strategy)
        scores = answer(model, layers, offset, new_ids, ko.MAX_NEW_TOKENS)
        full[strategy] = scores
        out["runs"].append({"strategy": strategy, "position_offset": offset, "entries": layers[0][0].shape[-2],
                            "new_ids": scores.argmax(-1).tolist(), "steps": [ko.step_record(s[None]) for s in scores]})
        print(strategy, offset, layers[0][0].shape[-2], out["runs"][-1]["new_ids"], flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cache_official.json").write_text(json.dumps(out, separators=(",", ":")))
    if args.scratch:
        Path(args.scratch).mkdir(parents=True, exist_ok=True)
        torch.save(full, Path(args.scratch) / "cache_official_full.pt")


if __name__ == "__main__":
    main()
