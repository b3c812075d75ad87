"""Golden pruning fixtures for OmriKaduri/vlm-interp @ 8f38051 (oracle, as vlminterp_knockout.py).

    python bench/parity/vlminterp_prune.py --model BUILD_DIR --out tests/fixtures/official/reprompt

The official pipeline (mllm/llava/run_on_coco.py, ``-k`` given):
1. a describe pass: ``predict_for_token("<image>\\n describe the image", max_layer_for_i2t_attn=32)``,
   i.e. plain greedy generation (no layer is > 32) with ``output_attentions=True``; the
   TokenAttentionStore keeps, per forward call, the last query row of every layer
   (attention_store.py ``__call__``: ``layer[:, :, -1, :]``) and the prefill's hidden states
   (``set_hidden_states``, first call only);
2. ``store.get_top_k_indices(k, k_selection_method)`` (attention_store.py), written out here:
   ``attn_over_gen``: mean over steps, then over heads -> (layers, image tokens), per layer
   ``argsort(descending=True)[:int(k)]``; ``attn_over_gen_percentage``: ``[:int(k * n_image)]``;
   ``attn_over_query``: the first call's row only (the last prompt row), mean over heads, ``[:k]``;
   ``norm``: L2 norm of the prefill's hidden states ``hidden_states[layer]`` (33 entries: embeddings
   first), ``[:k]``. Each returns ``image_token_indices[top]`` (absolute positions, ranked order);
3. the question, generated with ``topk_indices`` (LlamaModel puts ``topk_indices[layer_idx]`` into
   ``leave_k_highest_indices``) for ``max_layer_for_i2t_attn`` in [32, -1]: with the default
   ``min_token_for_i2t_attn_masking=1`` only decode steps (q_len == 1) lose the unkept image keys,
   in layers > max_layer; with 0 also the prefill (every row).
``int(k)`` on a float k: run_on_coco.py passes ``float(args.k)``, so ``attn_over_query`` and ``norm``
(which slice with ``[:k]``) raise TypeError in the official runner; here they get an int k.
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
import vlminterp_knockout as ko  # noqa: E402  (installs cpu_shim; the oracle attention)

DESCRIBE = "describe the image"  # run_on_coco.py describe_prompt_text = "<image>\n describe the image"
DESCRIBE_TOKENS = 8  # official 300 (llava_wrapper.py max_new_tokens); 8 keep the fixture small
K_FRACTION = 0.05  # attn_over_gen_percentage: int(0.05 * 576) = 28 tokens
K_COUNT = 28


def topk_attn_over_gen(rows, img, count):
    """rows: per step a list over layers of (H, seq) last rows -> per layer the top ``count`` image positions."""
    all_attns = torch.stack([torch.stack([layer[:, img] for layer in step]) for step in rows])  # (T, L, H, n)
    mean = all_attns.mean(dim=0).mean(dim=1)  # (L, n)
    return [img[mean[l].argsort(descending=True)[:count]] for l in range(mean.shape[0])], mean


def topk_attn_over_query(rows, img, count):
    first = torch.stack([layer[:, img] for layer in rows[0]]).mean(dim=1)  # (L, n)
    return [img[first[l].argsort(descending=True)[:count]] for l in range(first.shape[0])]


def topk_norm(hidden, img, count):
    norms = torch.stack([h[0] for h in hidden])[:, img].norm(dim=-1)  # (L+1, n)
    return [img[norms[l].argsort(descending=True)[:count]] for l in range(norms.shape[0])]


def generate(model, ids, pixels, steps, **kw):
    with torch.inference_mode():
        return model.generate(ids, images=pixels, do_sample=False, num_beams=1, max_new_tokens=steps, use_cache=True,
                              output_scores=True, return_dict_in_generate=True, **kw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--scratch")
    args = ap.parse_args()
    model = ko.load_official(args.model)
    pixels = tiny.fixed_pixels(1)
    d_before, d_after = ko.prompt_ids(DESCRIBE)
    q_before, q_after = ko.prompt_ids(ko.QUESTION)
    d_ids = torch.tensor([[1, *d_before, tiny.IMAGE_TOKEN_INDEX, *d_after]])
    q_ids = torch.tensor([[1, *q_before, tiny.IMAGE_TOKEN_INDEX, *q_after]])
    img_start = 1 + len(d_before)
    img = torch.arange(img_start, img_start + tiny.N_IMAGE_TOKENS)
    ko.STATE.update(image=img, flags=dict(max_layer=32, min_token=1), topk=None)  # max_layer_for_i2t_attn=32
    gen = generate(model, d_ids, pixels, DESCRIBE_TOKENS, output_attentions=True, output_hidden_states=True)
    rows = [[layer[0, :, -1, :].float() for layer in step] for step in gen.attentions]
    hidden = gen.hidden_states[0]
    sel_gen, mean = topk_attn_over_gen(rows, img, int(K_FRACTION * len(img)))
    selections = {
        "attn_over_gen_percentage": sel_gen,
        "attn_over_gen": topk_attn_over_gen(rows, img, int(K_COUNT))[0],
        "attn_over_query": topk_attn_over_query(rows, img, K_COUNT),
        "norm": topk_norm(hidden, img, K_COUNT),
    }
    out = {"commit": ko.COMMIT, "describe": {"ids_before_image": d_before, "ids_after_image": d_after,
                                              "new_ids": gen.sequences[0, -DESCRIBE_TOKENS:].tolist()},
           "question": {"ids_before_image": q_before, "ids_after_image": q_after},
           "img_start": img_start, "k_fraction": K_FRACTION, "k_count": K_COUNT,
           "mean_attention_top8": [m.topk(8).values.tolist() for m in mean],
           "selections": {k: [t.tolist() for t in v] for k, v in selections.items()}, "runs": []}
    full = {}
    for sel in ("attn_over_gen_percentage", "attn_over_query", "norm"):
        for name, flags in (("decode_only", dict(max_layer=-1, min_token=1)), ("no_encoding", dict(max_layer=-1, min_token=0))):
            ko.STATE.update(flags=flags, topk=selections[sel])
            g = generate(model, q_ids, pixels, ko.MAX_NEW_TOKENS)
            ko.STATE.update(flags=None, topk=None)
            scores = torch.stack([s[0].float() for s in g.scores])
            full[f"{sel}/{name}"] = scores
            out["runs"].append({"selection": sel, "name": name, "flags": flags,
                                "new_ids": g.sequences[0, -len(g.scores):].tolist(),
                                "steps": [ko.step_record(s[None]) for s in scores]})
            print(sel, name, out["runs"][-1]["new_ids"], flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "prune_official.json").write_text(json.dumps(out, separators=(",", ":")))
    if args.scratch:
        Path(args.scratch).mkdir(parents=True, exist_ok=True)
        torch.save(full, Path(args.scratch) / "prune_official_full.pt")


if __name__ == "__main__":
    main()
