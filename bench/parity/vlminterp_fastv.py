"""Golden FastV fixtures for OmriKaduri/vlm-interp @ 8f38051 (oracle, as vlminterp_knockout.py).

    python bench/parity/vlminterp_fastv.py --model BUILD_DIR --out tests/fixtures/official/reprompt

run_on_coco.py ``-fastv_layer K -fastv_ratio R`` (no knockout: ``max_layers_for_i2t_attn = [32]``).
The official pruning sits in the patched ``LlamaModel.forward`` (modeling_llama.py, the
``fastv_ratio``/``fastv_layer`` block of the layer loop), written out here as a wrapper around
transformers 4.37's ``LlamaDecoderLayer.forward``:
- layer K-1 keeps its attention weights (``self.last_attention = layer_outputs[1]``);
- at layer K in the prefill (``seq_len > 1``): scores = ``last_attention.mean(dim=1)[0][-1]`` over
  the image positions; keep ``topk(int(n_image * R))`` image tokens plus ``arange(img_min)`` and
  ``arange(img_max, seq_len)`` (so the LAST image token is always kept, and appears twice when it
  is also in the top-k), sorted; hidden states, the causal mask (``[:, :, :n, :n]``) and
  ``position_ids = keep_indexs`` are cut for layer K and every later layer;
- decode steps are not pruned (``seq_len == 1``); layers >= K hold the reduced cache, and the
  patched attention slices the mask to its key length (``attention_mask[:,:,:,:kv_seq_len]``).
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

RUNS = [(2, 0.5), (16, 0.05)]  # (fastv_layer, fastv_ratio): FastV's own K=2, R=50%, and a deep, small keep
FASTV = {}


def fastv_keep(last_attention, img, seq_len, ratio):
    """The official keep_indexs (see the module docstring)."""
    score = last_attention.mean(dim=1)[0][-1][img]
    top = score.topk(int(img.numel() * ratio)).indices + img.min().item()
    keep = torch.cat((torch.arange(img.min().item()), top, torch.arange(img.max().item(), seq_len)))
    return keep.sort().values, top


def install():
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    orig = LlamaDecoderLayer.forward

    def layer_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                      output_attentions=False, use_cache=False, **kw):
        f, i = FASTV, self.self_attn.layer_idx
        if f and i == f["layer"] and hidden_states.shape[1] > 1:
            keep, top = fastv_keep(f["last"], f["img"], hidden_states.shape[1], f["ratio"])
            f["keep"], f["top"] = keep, top
            hidden_states = hidden_states[:, keep, :]
            f["mask"] = attention_mask[:, :, : hidden_states.shape[1], : hidden_states.shape[1]]
            f["pos"] = keep.unsqueeze(0)
        if f and i >= f["layer"] and hidden_states.shape[1] > 1 and "pos" in f:
            attention_mask, position_ids = f["mask"], f["pos"]
        force = bool(f) and i == f["layer"] - 1 and hidden_states.shape[1] > 1 and not output_attentions
        out = orig(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                   past_key_value=past_key_value, output_attentions=output_attentions or force, use_cache=use_cache, **kw)
        if f and i == f["layer"] - 1 and hidden_states.shape[1] > 1:
            f["last"] = out[1]
        return (out[0], *out[2:]) if force else out

    LlamaDecoderLayer.forward = layer_forward


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--scratch")
    args = ap.parse_args()
    model = ko.load_official(args.model)
    install()
    pixels = tiny.fixed_pixels(1)
    before, after = ko.prompt_ids(ko.QUESTION)
    ids = torch.tensor([[1, *before, tiny.IMAGE_TOKEN_INDEX, *after]])
    img_start = 1 + len(before)
    img = torch.arange(img_start, img_start + tiny.N_IMAGE_TOKENS)
    out = {"commit": ko.COMMIT, "ids_before_image": before, "ids_after_image": after, "img_start": img_start, "runs": []}
    full = {}
    for layer, ratio in RUNS:
        FASTV.clear()
        FASTV.update(layer=layer, ratio=ratio, img=img)
        with torch.inference_mode():
            g = model.generate(ids, images=pixels, do_sample=False, num_beams=1, max_new_tokens=ko.MAX_NEW_TOKENS,
                               use_cache=True, output_scores=True, return_dict_in_generate=True)
        top = FASTV["top"]
        FASTV.clear()
        scores = torch.stack([s[0].float() for s in g.scores])
        name = f"fastv_{layer}_{ratio}"
        full[name] = scores
        out["runs"].append({"name": name, "fastv_layer": layer, "fastv_ratio": ratio, "kept_image_positions": sorted(top.tolist()),
                            "last_image_token_in_topk": int(img[-1]) in top.tolist(),
                            "new_ids": g.sequences[0, -len(g.scores):].tolist(),
                            "steps": [ko.step_record(s[None]) for s in scores]})
        print(name, out["runs"][-1]["new_ids"], "last in topk:", out["runs"][-1]["last_image_token_in_topk"], flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fastv_official.json").write_text(json.dumps(out, separators=(",", ":")))
    if args.scratch:
        Path(args.scratch).mkdir(parents=True, exist_ok=True)
        torch.save(full, Path(args.scratch) / "fastv_official_full.pt")


if __name__ == "__main__":
    main()
