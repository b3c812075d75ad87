"""Golden knockout / pruning / FastV / re-prompting fixtures from OmriKaduri/vlm-interp @ 8f38051, run without edits.

Runs in the official stack's venv (transformers 4.37.2 + llava-torch 1.2.2.post1, CPU, fp32):

    python bench/parity/vlminterp_official.py --official /work/official/vlm-interp \
        --llava-fork /work/official/vlm-interp/llava_fork_files --model BUILD_DIR \
        --out tests/fixtures/official --scratch DIR

What is official here, run without edits (their sha256 go to provenance.json). Four of the six files are
reconstructions, not checkouts (bench/parity/README.md, "vlm-interp"): the two ``modified_llava_files/``
and the two fork files were rebuilt from transformers 4.37.2 / llava-torch 1.2.2.post1 plus the hunks read
from the look-up tool's pages; the fork's ``llava_llama.py`` has since matched a snapshot byte for byte,
its ``llava_arch.py`` has not:
- ``modified_llava_files/modeling_llama.py`` and ``modified_llava_files/utils.py`` copied over transformers
  4.37.2's ``models/llama/modeling_llama.py`` and ``generation/utils.py`` in a scratch copy of the package,
  which is what the repository's ``update_local_env_llava.sh`` does to site-packages;
- the LLaVA fork the README installs (``OmriKaduri/LLaVA`` @ 9a20030: ``llava/model/llava_arch.py``, which
  builds ``image_tokens_mask`` / ``query_tokens_mask``, and ``llava/model/language_model/llava_llama.py``,
  which passes them and the knockout kwargs to ``generate``) copied over llava-torch 1.2.2.post1 likewise;
- ``mllm/llava/llava_wrapper.py`` (``LlavaWrapper.chat_step_by_step``, ``predict_from_cache`` and
  ``chat_step_by_step_from_cache``) and ``mllm/utils/attention_store.py`` (``TokenAttentionStore``,
  ``get_top_k_indices``) imported from the checkout.

What this script drives by hand (the runner scripts need COCO / MME images, a hub checkpoint and h5 files):
- ``LlavaWrapper.__init__`` is skipped (it loads ``liuhaotian/llava-v1.5-7b`` from the hub): the object gets the
  tiny model (original layout), a word-hash tokenizer (Vicuna's is not available offline; ids are stored in the
  fixtures) and ``model_name`` from ``get_model_name_from_path("liuhaotian/llava-v1.5-7b")``, as ``__init__`` sets;
- ``predict_for_token`` is replaced by its three calls (a new ``TokenAttentionStore``,
  ``model.set_attention_store``, ``chat_step_by_step``) on fixed fp32 pixels: its image loading and
  ``process_images(...).to(float16)`` would replace the fixed pixels, and its disk writes (h5, json) change nothing;
- run_on_coco.py's loop: the describe pass, ``store.get_top_k_indices(float(k), method)``, the json round trip of the
  indices (lists of ints), and the question with ``topk_indices`` for ``max_layer_for_i2t_attn=-1``;
- run_on_coco_from_cache.py: ``kv_cache.h5`` / ``attention.h5`` are the describe store's ``keys`` / ``values`` and
  ``query_tokens_mask.nonzero().squeeze()`` as numpy (what the h5 round trip returns), and a fresh wrapper has no
  attention store (``model.set_attention_store(None)``);
- observation only: a forward hook on ``lm_head`` keeps each forward's last-row logits (chat_step_by_step returns
  ids only; its ``output_ids[..., 1:]`` drops the BOS that 4.37's generate puts before the new tokens of an
  ``inputs_embeds`` call, so every greedy id is checked against it), forward pre-hooks read the FastV kept
  positions (layer K's ``position_ids``) and the compressed cache's length and first position.
Runtime shims: ``cpu_shim.py`` (``cuda`` -> CPU, fp32) and stub modules for cv2 / h5py / matplotlib (imported by
attention_store.py, called only by its disk writers). ``attn_implementation="eager"`` at load (the patched
``LlamaModel.__init__`` forces eager as well).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cpu_shim  # noqa: E402

cpu_shim.install()

import torch  # noqa: E402

COMMIT = "8f380519c09587d15fba86c5bb3ebb6c2e0592ef"
FORK_COMMIT = "9a200309ba27aed8faa663bb82fecba02b113d28"
OFFICIAL_FILES = [
    "modified_llava_files/modeling_llama.py",
    "modified_llava_files/utils.py",
    "mllm/llava/llava_wrapper.py",
    "mllm/utils/attention_store.py",
]
FORK_FILES = ["llava/model/llava_arch.py", "llava/model/language_model/llava_llama.py"]
QUESTION = "Is there a red circle in the image?"
DESCRIBE = "<image>\n describe the image"  # run_on_coco.py describe_prompt_text
FOLLOWUP = "Is there a blue square in the image?"  # run_on_coco_from_cache.py appends " ASSISTANT:"
RECORDED_STEPS = 6  # per-step top-k records kept for the first steps (every greedy id is kept)
TOPK = 16
K_FRACTION, K_COUNT = 0.05, 28  # -k 0.05 (int(0.05 * 576) = 28) and -k 28
# (name, chat_step_by_step kwargs) as run_on_coco.py passes them for its flags
KNOCKOUT_RUNS = [
    ("baseline", dict(max_layer_for_i2t_attn=32, min_token_for_i2t_attn_masking=1)),
    ("generated_all_layers", dict(max_layer_for_i2t_attn=-1, min_token_for_i2t_attn_masking=1)),
    ("generated_from_16", dict(max_layer_for_i2t_attn=15, min_token_for_i2t_attn_masking=1)),
    ("no_encoding_all_layers", dict(max_layer_for_i2t_attn=-1, min_token_for_i2t_attn_masking=0)),
    ("no_encoding_from_16", dict(max_layer_for_i2t_attn=15, min_token_for_i2t_attn_masking=0)),
    ("block_query_all_layers", dict(max_layer_for_i2t_attn=-1, min_token_for_i2t_attn_masking=0, block_query=True)),
    ("block_query_from_16", dict(max_layer_for_i2t_attn=15, min_token_for_i2t_attn_masking=0, block_query=True)),
    (
        "block_query_unidirection_from_16",
        dict(max_layer_for_i2t_attn=15, min_token_for_i2t_attn_masking=0, block_query_unidirection=True),
    ),
    (
        "block_vis_to_all_from_16",
        dict(max_layer_for_i2t_attn=15, min_token_for_i2t_attn_masking=0, block_vis_to_all_from_layer=True),
    ),
    (
        "gen_not_4_to_20",
        dict(
            max_layer_for_i2t_attn=32,
            min_token_for_i2t_attn_masking=1,
            block_vis_to_gen_not_between_layers_4_to_20=True,
        ),
    ),
    (
        "query_not_4_to_20",
        dict(
            max_layer_for_i2t_attn=32,
            min_token_for_i2t_attn_masking=0,
            block_vis_to_query_not_between_layers_4_to_20=True,
        ),
    ),
    (
        "all_not_4_to_20",
        dict(
            max_layer_for_i2t_attn=32,
            min_token_for_i2t_attn_masking=0,
            block_vis_to_all_not_between_layers_4_to_20=True,
        ),
    ),
]
FASTV_RUNS = [(2, 0.5), (16, 0.05)]  # (-fastv_layer, -fastv_ratio)
LOGITS: list = []
SEEN: dict = {}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def word_id(word: str) -> int:
    return 3 + int(hashlib.sha256(word.encode()).hexdigest(), 16) % 31990


class WordTokenizer:
    """Stand-in for Vicuna's tokenizer: whitespace words hashed to ids, BOS (1) first as LlamaTokenizer does."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text):
        return types.SimpleNamespace(input_ids=[self.bos_token_id] + [word_id(w) for w in text.split()])

    def decode(self, token):
        return str(int(token))

    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(str(int(t)) for t in row) for row in rows]


def install_official(official: Path, fork: Path, site: Path) -> None:
    """update_local_env_llava.sh on a scratch copy of transformers, the fork's files on a copy of llava-torch."""
    site.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__")
    for pkg in ("transformers", "llava"):
        src = Path(importlib.util.find_spec(pkg).submodule_search_locations[0])
        if (site / pkg).exists():
            shutil.rmtree(site / pkg)
        shutil.copytree(src, site / pkg, ignore=ignore)
    shutil.copy(official / "modified_llava_files/utils.py", site / "transformers/generation/utils.py")
    shutil.copy(
        official / "modified_llava_files/modeling_llama.py", site / "transformers/models/llama/modeling_llama.py"
    )
    for rel in FORK_FILES:
        shutil.copy(fork / rel, site / rel)
    sys.path.insert(0, str(official))
    sys.path.insert(0, str(site))


def load_official(model_dir):
    from llava.model import LlavaLlamaForCausalLM

    model = LlavaLlamaForCausalLM.from_pretrained(
        str(Path(model_dir) / "original"), torch_dtype=torch.float32, attn_implementation="eager"
    )
    model.get_vision_tower().load_model()
    model.lm_head.register_forward_hook(lambda m, i, o: LOGITS.append(o[0, -1].detach().float().clone()))
    return model.eval()


def wrapper(model):
    from llava.mm_utils import get_model_name_from_path

    # attention_store.py imports these for its disk writers only; stubbed after transformers' availability checks
    cpu_shim.stub_modules(["cv2", "h5py", "matplotlib", "matplotlib.pyplot"])
    from mllm.llava.llava_wrapper import LlavaWrapper

    w = LlavaWrapper.__new__(LlavaWrapper)  # __init__ would load liuhaotian/llava-v1.5-7b
    w.model_name = get_model_name_from_path("liuhaotian/llava-v1.5-7b")
    w.tokenizer, w.model, w.image_processor, w.context_len, w.cache_strategy = WordTokenizer(), model, None, 2048, None
    return w


def step_record(scores: torch.Tensor) -> dict:
    vals, idx = scores.float().topk(TOPK, dim=-1)
    return {"topk_values": vals.tolist(), "topk_indices": idx.tolist(), "sum": scores.float().sum(-1).tolist()}


def predict(w, pixels, prompt, **kwargs):
    """predict_for_token's calls: a new TokenAttentionStore, set_attention_store, chat_step_by_step."""
    from mllm.utils.attention_store import TokenAttentionStore

    store = TokenAttentionStore()
    w.model.set_attention_store(store)
    LOGITS.clear()
    _, output_ids = w.chat_step_by_step(w.tokenizer, pixels, prompt, None, verbose=False, **kwargs)
    scores = torch.stack(LOGITS)
    ids = scores.argmax(-1).tolist()
    assert ids == output_ids[0].tolist(), "greedy ids differ from chat_step_by_step's output"
    return store, scores, ids


def prompt_ids(w, question):
    """The ids chat_step_by_step builds (llava_v1 template, tokenizer_image_token), split at the image."""
    from llava.conversation import conv_templates
    from llava.mm_utils import tokenizer_image_token

    conv = conv_templates["llava_v1"].copy()
    conv.append_message(conv.roles[0], question if "<image>" in question else "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), w.tokenizer, -200)
    cut = ids.index(-200)
    assert ids[0] == 1
    return ids[1:cut], ids[cut + 1 :]


def record(scores, ids, **extra):
    n = min(RECORDED_STEPS, len(ids))
    return {**extra, "new_ids": ids[:n], "official_new_ids": ids, "steps": [step_record(s[None]) for s in scores[:n]]}


def knockout(w, pixels, full):
    before, after = prompt_ids(w, QUESTION)
    img_start = 1 + len(before)
    out = {
        "commit": COMMIT,
        "question": QUESTION,
        "ids_before_image": before,
        "ids_after_image": after,
        "img_start": img_start,
        "prompt_len": 1 + len(before) + 576 + len(after),
        "pixels_sha256": None,
        "topk": TOPK,
        "runs": [],
    }
    for name, kw in KNOCKOUT_RUNS:
        _, scores, ids = predict(w, pixels, QUESTION, topk_indices=None, **kw)
        full[name] = scores[:RECORDED_STEPS]
        flags = {
            "max_layer": kw["max_layer_for_i2t_attn"],
            "min_token": kw["min_token_for_i2t_attn_masking"],
            **{k: v for k, v in kw.items() if k not in ("max_layer_for_i2t_attn", "min_token_for_i2t_attn_masking")},
        }
        out["runs"].append(record(scores, ids, name=name, flags=flags))
        print(name, len(ids), ids[:RECORDED_STEPS], flush=True)
    return out


def selections(store):
    """store.get_top_k_indices as run_on_coco.py calls it (k = float(args.k)), then the json round trip."""
    sel, notes = {}, {}
    for name, method, k in (
        ("attn_over_gen_percentage", "attn_over_gen_percentage", K_FRACTION),
        ("attn_over_gen", "attn_over_gen", K_COUNT),
        ("attn_over_query", "attn_over_query", K_COUNT),
        ("norm", "norm", K_COUNT),
        ("norm_percentage", "norm_percentage", K_FRACTION),
    ):
        try:
            top = store.get_top_k_indices(float(k), method)
        except TypeError as e:  # [:k] with a float k
            notes[name] = f"raises TypeError with run_on_coco.py's float k ({e}); called with int k here"
            top = store.get_top_k_indices(int(k), method)
        sel[name] = [t.tolist() for t in top]
    return sel, notes


def prune(w, pixels, full):
    d_before, d_after = prompt_ids(w, DESCRIBE)
    q_before, q_after = prompt_ids(w, QUESTION)
    store, _, d_ids = predict(w, pixels, DESCRIBE, max_layer_for_i2t_attn=32, topk_indices=None)
    sel, notes = selections(store)
    img = store.image_tokens_mask.nonzero().squeeze()
    out = {
        "commit": COMMIT,
        "describe": {"ids_before_image": d_before, "ids_after_image": d_after, "new_ids": d_ids},
        "question": {"ids_before_image": q_before, "ids_after_image": q_after},
        "img_start": int(img.min()),
        "k_fraction": K_FRACTION,
        "k_count": K_COUNT,
        "selections": sel,
        "selection_notes": notes,
        "runs": [],
    }
    for s in ("attn_over_gen_percentage", "attn_over_query", "norm"):
        for name, min_token in (("decode_only", 1), ("no_encoding", 0)):
            _, scores, ids = predict(
                w,
                pixels,
                QUESTION,
                max_layer_for_i2t_attn=-1,
                topk_indices=copy.deepcopy(sel[s]),
                min_token_for_i2t_attn_masking=min_token,
            )
            full[f"{s}/{name}"] = scores[:RECORDED_STEPS]
            out["runs"].append(
                record(scores, ids, selection=s, name=name, flags=dict(max_layer=-1, min_token=min_token))
            )
            print(s, name, len(ids), ids[:RECORDED_STEPS], flush=True)
    return out, store


def fastv(w, pixels, full):
    before, after = prompt_ids(w, QUESTION)
    img_start = 1 + len(before)
    out = {"commit": COMMIT, "ids_before_image": before, "ids_after_image": after, "img_start": img_start, "runs": []}
    for layer, ratio in FASTV_RUNS:

        def seen(mod, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] > 1:  # the prefill: layer K gets keep_indexs as its position_ids
                SEEN["positions"] = kwargs["position_ids"][0].tolist()

        h = w.model.model.layers[layer].register_forward_pre_hook(seen, with_kwargs=True)
        _, scores, ids = predict(
            w,
            pixels,
            QUESTION,
            max_layer_for_i2t_attn=32,
            topk_indices=None,
            min_token_for_i2t_attn_masking=1,
            fastv_layer=layer,
            fastv_ratio=ratio,
        )
        h.remove()
        kept = SEEN.pop("positions")
        image = [p for p in kept if img_start <= p < img_start + 576]
        name = f"fastv_{layer}_{ratio}"
        full[name] = scores[:RECORDED_STEPS]
        out["runs"].append(
            record(
                scores,
                ids,
                name=name,
                fastv_layer=layer,
                fastv_ratio=ratio,
                kept_image_positions=sorted(set(image)),
                kept_positions_at_layer=kept,
                last_image_token_in_topk=image.count(img_start + 575) > 1,
            )
        )
        print(name, len(ids), ids[:RECORDED_STEPS], "duplicates:", len(image) - len(set(image)), flush=True)
    return out


def from_cache(w, store, selection, full):
    """run_on_coco_from_cache.py for each -cache_strategy, with the describe pass's kv cache and top-k."""
    keys, values = list(store.keys), list(store.values)
    query = store.query_tokens_mask.nonzero().squeeze().cpu().numpy()  # attention.h5 "query_tokens_mask"
    prompt = f"{FOLLOWUP} ASSISTANT:"
    out = {
        "commit": COMMIT,
        "followup_ids": w.tokenizer(prompt).input_ids,
        "cache_entries_full": keys[0].shape[-2],
        "query_positions": query.tolist(),
        "topk": selection,
        "runs": [],
    }
    w.model.set_attention_store(None)  # run_on_coco_from_cache.py's wrapper never ran predict_for_token

    def seen(mod, args, kwargs):
        if "entries" not in SEEN:
            SEEN["entries"] = kwargs["past_key_value"].get_seq_length(0)
            SEEN["first_position"] = int(kwargs["position_ids"][0, 0])

    h = w.model.model.layers[0].register_forward_pre_hook(seen, with_kwargs=True)
    for strategy in ("qs", "q", "s"):
        w.cache_strategy = strategy
        LOGITS.clear()
        SEEN.clear()
        _, tokens, _ = w.predict_from_cache(
            prompt,
            None,
            output_path=None,
            write_to_disk=False,
            kv=[(keys.copy(), values.copy(), None)],
            cache_strategy=strategy,
            query_tokens_mask=[query],
            topk_indices=[copy.deepcopy(selection)],
        )
        scores = torch.stack(LOGITS)
        ids = scores.argmax(-1).tolist()
        # predict_from_cache's tokens: the prompt after BOS, then the new tokens
        assert tokens == [str(i) for i in out["followup_ids"][1:] + ids], "greedy ids differ from predict_from_cache's"
        full[strategy] = scores[:RECORDED_STEPS]
        out["runs"].append(
            record(scores, ids, strategy=strategy, position_offset=SEEN["first_position"], entries=SEEN["entries"])
        )
        print(strategy, SEEN, len(ids), ids[:RECORDED_STEPS], flush=True)
    h.remove()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", required=True, help="vlm-interp files at 8f38051 (modified_llava_files/, mllm/)")
    ap.add_argument("--llava-fork", required=True, help="OmriKaduri/LLaVA files at 9a20030 (llava/model/...)")
    ap.add_argument("--model", required=True, help="tiny_llava15.build() output directory")
    ap.add_argument("--out", required=True, help="tests/fixtures/official (writes knockout/ and reprompt/)")
    ap.add_argument("--scratch", required=True)
    ap.add_argument("--only", choices=["knockout", "reprompt"])
    args = ap.parse_args()
    official, fork, scratch = Path(args.official), Path(args.llava_fork), Path(args.scratch)
    install_official(official, fork, scratch / "site")
    import tiny_llava15 as tiny

    torch.set_num_threads(1)
    model = load_official(args.model)
    w = wrapper(model)
    pixels = tiny.fixed_pixels(1)
    files = {
        **{rel: sha256(official / rel) for rel in OFFICIAL_FILES},
        **{f"OmriKaduri/LLaVA@{FORK_COMMIT[:7]}:{rel}": sha256(fork / rel) for rel in FORK_FILES},
    }
    meta = {
        "official_files_sha256": files,
        "harness_sha256": {p: sha256(HERE / p) for p in ("vlminterp_official.py", "cpu_shim.py", "tiny_llava15.py")},
    }
    (scratch / "official_meta.json").write_text(json.dumps(meta, indent=2))
    out = Path(args.out)
    if args.only != "reprompt":
        full = {}
        ko = knockout(w, pixels, full)
        ko["pixels_sha256"] = tiny.tensor_sha256(pixels)
        (out / "knockout").mkdir(parents=True, exist_ok=True)
        (out / "knockout/knockout_official.json").write_text(json.dumps(ko, separators=(",", ":")))
        torch.save(full, scratch / "knockout_official_full.pt")
    if args.only != "knockout":
        full, full_fastv, full_cache = {}, {}, {}
        pr, store = prune(w, pixels, full)
        fv = fastv(w, pixels, full_fastv)
        ca = from_cache(w, store, pr["selections"]["attn_over_gen_percentage"], full_cache)
        (out / "reprompt").mkdir(parents=True, exist_ok=True)
        for name, obj, f in (("prune", pr, full), ("fastv", fv, full_fastv), ("cache", ca, full_cache)):
            (out / f"reprompt/{name}_official.json").write_text(json.dumps(obj, separators=(",", ":")))
            torch.save(f, scratch / f"{name}_official_full.pt")


if __name__ == "__main__":
    main()
