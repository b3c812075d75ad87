"""Golden knockout fixtures for OmriKaduri/vlm-interp @ 8f38051 (an oracle of its masking rules).

Runs in the official stack's venv (transformers 4.37.2 + llava-torch 1.2.2.post1, CPU, fp32, eager):

    python bench/parity/vlminterp_knockout.py --model BUILD_DIR --out tests/fixtures/official/knockout

Why an oracle and not the files themselves: vlm-interp has no git snapshot here; its patched
``modified_llava_files/modeling_llama.py`` (78k chars) is readable, but it only works together with
its patched ``modified_llava_files/utils.py`` (transformers' generation utils, 252k chars, which
threads ``max_layer_for_i2t_attn``/``image_tokens_mask``/... from ``generate`` into every layer),
and neither could be saved from the look-up tool. So this script keeps everything else official
(llava-torch's ``LlavaLlamaForCausalLM``, ``conv_templates['llava_v1']``, transformers 4.37's eager
LLaMA and ``generate``) and replaces only ``LlamaAttention.forward`` with 4.37's eager forward
plus the masking rules of ``modeling_llama.py`` ``LlamaAttention.forward`` (the block after
``attn_weights = torch.matmul(...)``), written out here from that text:

- a layer is edited when ``layer_idx > max_layer_for_i2t_attn``;
  the 4..20 variants when ``layer_idx<4 or layer_idx>20``;
- a forward is the prefill when ``q_len != 1``, a decode step when ``q_len == 1``;
- ``block_query``: prefill only, every non-image index <-> every image index, both ways;
- ``block_query_unidirection``: prefill only, non-image rows -> image keys;
- ``block_vis_to_all_from_layer``: prefill non-image rows -> image keys, decode: image keys;
- ``block_vis_to_{gen,query,all}_not_between_layers_4_to_20``: decode / prefill / both;
- otherwise (the final ``else``; with ``leave_k_highest_indices`` the kept keys' scores are restored,
  used by vlminterp_prune.py): every row -> image keys, in every
  forward when ``min_token_for_i2t_attn_masking == 0``, in decode steps only when it is 1
  (run_on_coco.py argparse default 1).
The -inf edits come before the causal mask is added (``attn_weights + attention_mask``), as there.
Line numbers are not cited: the file was read through the look-up tool, not checked out.

Tokenizer: Vicuna's is not available offline; whitespace words are hashed to ids (as
pai_official.py does). Ids are recorded in the fixture, so CI needs no tokenizer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cpu_shim  # noqa: E402

cpu_shim.install()

import torch  # noqa: E402
from torch import nn  # noqa: E402

import tiny_llava15 as tiny  # noqa: E402

COMMIT = "8f380519c09587d15fba86c5bb3ebb6c2e0592ef"
QUESTION = "Is there a red circle in the image?"
MAX_NEW_TOKENS = 6
TOPK = 16
# (name, flags): flags as run_on_coco.py passes them to llava.predict_for_token
RUNS = [
    ("baseline", dict(max_layer=32, min_token=1)),  # run_on_coco.py: max_layers_for_i2t_attn = [32, -1]
    ("generated_all_layers", dict(max_layer=-1, min_token=1)),  # the run_on_coco.py default run
    ("generated_from_16", dict(max_layer=15, min_token=1)),
    ("no_encoding_all_layers", dict(max_layer=-1, min_token=0)),  # -min_token_for_i2t_attn_masking 0
    ("no_encoding_from_16", dict(max_layer=15, min_token=0)),
    ("block_query_all_layers", dict(max_layer=-1, min_token=0, block_query=True)),
    ("block_query_from_16", dict(max_layer=15, min_token=0, block_query=True)),
    ("block_query_unidirection_from_16", dict(max_layer=15, min_token=0, block_query_unidirection=True)),
    ("block_vis_to_all_from_16", dict(max_layer=15, min_token=0, block_vis_to_all_from_layer=True)),
    ("gen_not_4_to_20", dict(max_layer=32, min_token=1, block_vis_to_gen_not_between_layers_4_to_20=True)),
    ("query_not_4_to_20", dict(max_layer=32, min_token=0, block_vis_to_query_not_between_layers_4_to_20=True)),
    ("all_not_4_to_20", dict(max_layer=32, min_token=0, block_vis_to_all_not_between_layers_4_to_20=True)),
]

STATE = {"flags": None, "image": None, "topk": None}  # the active run's flags, image positions, kept tokens


def word_id(word: str) -> int:
    return 3 + int(hashlib.sha256(word.encode()).hexdigest(), 16) % 31990


def official_mask(scores: torch.Tensor, layer_idx: int, q_len: int) -> torch.Tensor:
    """modeling_llama.py LlamaAttention.forward masking (see the module docstring), on (B, H, q, k) scores."""
    f, img = STATE["flags"], STATE["image"]
    if f is None:
        return scores
    k_len = scores.shape[-1]
    nonimg = torch.tensor(sorted(set(range(k_len)) - set(img.tolist())))  # block_query_indices: every non-image index
    prefill, after = q_len != 1, layer_idx > f["max_layer"]
    outside_4_20 = layer_idx < 4 or layer_idx > 20
    inf = float("-inf")
    if f.get("block_query"):
        if prefill and after:
            scores[..., nonimg[:, None], img[None, :]] = inf
            scores[..., img[:, None], nonimg[None, :]] = inf
    elif f.get("block_query_unidirection"):
        if prefill and after:
            scores[..., nonimg[:, None], img[None, :]] = inf
    elif f.get("block_vis_to_all_from_layer"):
        if after:
            if prefill:
                scores[..., nonimg[:, None], img[None, :]] = inf
            else:
                scores[..., img] = inf
    elif f.get("block_vis_to_gen_not_between_layers_4_to_20"):
        if outside_4_20 and not prefill:
            scores[..., img] = inf
    elif f.get("block_vis_to_query_not_between_layers_4_to_20"):
        if outside_4_20 and prefill:
            scores[..., nonimg[:, None], img[None, :]] = inf
    elif f.get("block_vis_to_all_not_between_layers_4_to_20"):
        if outside_4_20:
            if prefill:
                scores[..., nonimg[:, None], img[None, :]] = inf
            else:
                scores[..., img] = inf
    else:
        perform = True if f["min_token"] == 0 else q_len == 1
        if perform and after:
            keep = STATE.get("topk")  # leave_k_highest_indices: LlamaModel passes topk_indices[layer_idx]
            kept = scores[..., keep[layer_idx]].clone() if keep is not None else None
            scores[..., img] = inf
            if keep is not None:  # the gather / scatter of the kept scores
                scores[..., keep[layer_idx]] = kept
    return scores


def eager_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                  output_attentions=False, use_cache=False, **kwargs):
    """transformers 4.37.2 LlamaAttention.forward (eager, pretraining_tp=1) with official_mask inserted, RoPE
    at explicit positions and the mask cut to the key length, as the patched file does."""
    from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

    bsz, q_len, _ = hidden_states.size()
    q = self.q_proj(hidden_states).view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
    k = self.k_proj(hidden_states).view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
    v = self.v_proj(hidden_states).view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
    kv_seq_len = k.shape[-2]
    if past_key_value is not None:
        kv_seq_len += past_key_value.get_usable_length(kv_seq_len, self.layer_idx)
    # the patched file's forward_from_position: cos/sin looked up at position_ids (FastV's kept positions
    # exceed the cut sequence's length), then applied without a second lookup
    rope = self.rotary_emb
    if int(position_ids.max()) + 1 > rope.max_seq_len_cached:
        rope._set_cos_sin_cache(seq_len=int(position_ids.max()) + 1, device=v.device, dtype=v.dtype)
    cos, sin = rope.cos_cached[position_ids].to(v.dtype), rope.sin_cached[position_ids].to(v.dtype)
    q, k = (q * cos[:, None] + rotate_half(q) * sin[:, None]), (k * cos[:, None] + rotate_half(k) * sin[:, None])
    if past_key_value is not None:
        k, v = past_key_value.update(k, v, self.layer_idx, {"sin": sin, "cos": cos})
    k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)
    w = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)
    w = official_mask(w, self.layer_idx, q_len)
    if attention_mask is not None:
        w = w + attention_mask[:, :, :, :kv_seq_len]  # the official slice (FastV layers hold fewer keys)
    w = nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(w, v).transpose(1, 2).contiguous().reshape(bsz, q_len, self.hidden_size)
    return self.o_proj(out), (w if output_attentions else None), past_key_value


def step_record(scores: torch.Tensor) -> dict:
    s = scores.float()
    vals, idx = s.topk(TOPK, dim=-1)
    return {"topk_values": vals.tolist(), "topk_indices": idx.tolist(), "sum": s.sum(-1).tolist()}


def prompt_ids(question: str = QUESTION):
    """conv_templates['llava_v1'] prompt (llava_wrapper.py chat_step_by_step), words hashed around <image>."""
    from llava.conversation import conv_templates

    conv = conv_templates["llava_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    before, after = conv.get_prompt().split("<image>")
    return [word_id(w) for w in before.split()], [word_id(w) for w in after.split()]


def load_official(model_dir):
    """llava-torch's LlavaLlamaForCausalLM (original layout), fp32, eager, with the oracle attention."""
    from llava.model import LlavaLlamaForCausalLM
    from transformers.models.llama import modeling_llama

    modeling_llama.LlamaAttention.forward = eager_forward
    model = LlavaLlamaForCausalLM.from_pretrained(str(Path(model_dir) / "original"), torch_dtype=torch.float32,
                                                  attn_implementation="eager")
    model.get_vision_tower().load_model()
    return model.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="tiny_llava15.build() output directory")
    ap.add_argument("--out", required=True)
    ap.add_argument("--scratch", help="also save full-vocabulary scores here (for max-diff reports)")
    args = ap.parse_args()
    model = load_official(args.model)
    before, after = prompt_ids()
    ids = torch.tensor([[1, *before, tiny.IMAGE_TOKEN_INDEX, *after]])
    pixels = tiny.fixed_pixels(1)
    img_start = 1 + len(before)
    STATE["image"] = torch.arange(img_start, img_start + tiny.N_IMAGE_TOKENS)
    out = {"commit": COMMIT, "question": QUESTION, "ids_before_image": before, "ids_after_image": after,
           "img_start": img_start, "prompt_len": ids.shape[1] - 1 + tiny.N_IMAGE_TOKENS,
           "pixels_sha256": tiny.tensor_sha256(pixels), "topk": TOPK, "runs": []}
    full = {}
    for name, flags in RUNS:
        STATE["flags"] = flags
        with torch.inference_mode():  # llava_wrapper.py chat_step_by_step: greedy, num_beams=1, use_cache
            gen = model.generate(ids, images=pixels, do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS,
                                 use_cache=True, output_scores=True, return_dict_in_generate=True)
        STATE["flags"] = None
        scores = torch.stack([s[0].float() for s in gen.scores])
        full[name] = scores
        new = gen.sequences[0, -len(gen.scores):].tolist()  # inputs_embeds generation: new tokens last
        out["runs"].append({"name": name, "flags": flags, "new_ids": new, "steps": [step_record(s[None]) for s in scores]})
        print(name, new, flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "knockout_official.json").write_text(json.dumps(out, separators=(",", ":")))
    if args.scratch:
        Path(args.scratch).mkdir(parents=True, exist_ok=True)
        torch.save(full, Path(args.scratch) / "knockout_official_full.pt")


if __name__ == "__main__":
    main()
