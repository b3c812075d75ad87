"""Golden fixtures from the official PAI code (LALBJ/PAI @ 9bbd8bd), run unmodified on CPU.

Runs in the official stack's venv (bench/parity/official_env.sh), never in CI:

    python bench/parity/pai_official.py --pai /work/official/PAI --model BUILD_DIR --out tests/fixtures/official/pai

What runs is the official code: ``model_loader.prepare_llava_inputs`` (prompt assembly and
``img_start_idx``), ``ModelLoader.init_cfg_processor`` (the image-free prompt, repeated per beam),
``attention.llama_modify`` and ``CFG.CFGLogits``, inside transformers 4.37's ``generate`` as
``pope_eval.py:113-143`` calls it. What is ours: ``cpu_shim`` (CUDA/fp16 -> CPU/fp32, stubs for
the MiniGPT-4/Shikra imports), a word-hash tokenizer (Vicuna's is not available here; the ids
are recorded, so CI never needs it), loading the tiny model of ``tiny_llava15.py`` directly
(``from_pretrained`` + ``load_model()``, as ``llava/model/builder.py`` does, minus fp16/cuda) with
``attn_implementation="eager"``: the official environment (environment.yml: torch 2.0.1,
transformers 4.37.0) has no SDPA, so 4.37 ran eager attention; with a newer torch 4.37 would pick
SDPA, whose prefill mask is None, and the patched ``llama_new_forward`` would then attend without
a causal mask.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cpu_shim  # noqa: E402

cpu_shim.install()
cpu_shim.stub_modules(
    ["minigpt4.common.eval_utils", "mllm.models"],
    **{"minigpt4.common.eval_utils": {"init_model": None}, "mllm.models": {"load_pretrained": None}},
)

import torch  # noqa: E402

import tiny_llava15 as tiny  # noqa: E402  (only constants and fixed_pixels; no transformers 5 API)

QUESTIONS = [
    "Is there a dog in the image?",
    "Describe the image in detail.",
]
# (name, use_attn, alpha, use_cfg, gamma, beams); official defaults alpha 0.2, gamma 1.1 (README.md:65,82)
RUNS = [
    ("attn", True, 0.2, False, 1.1, 1),
    ("cfg", False, 0.2, True, 1.1, 1),
    ("both", True, 0.2, True, 1.1, 1),
    ("attn", True, 0.2, False, 1.1, 2),
    ("cfg", False, 0.2, True, 1.1, 2),
    ("both", True, 0.2, True, 1.1, 2),
    ("both_strong", True, 1.0, True, 2.0, 1),  # argparse defaults gamma 2 (pope_eval.py:53), large alpha
    ("both_gamma1", True, 0.5, True, 1.0, 1),  # CFG.py:30-31 returns before turning the boost back on
]
START_LAYER, END_LAYER = 2, 32  # README.md:65 --start-layer 2 --end-layer 32
MAX_NEW_TOKENS = 8
TOPK = 16


class WordHashTokenizer:
    """Stands in for Vicuna's tokenizer: whitespace words -> ids in [3, 31993) by sha256."""

    bos_token_id = 1

    @staticmethod
    def word_id(word: str) -> int:
        return 3 + int(hashlib.sha256(word.encode()).hexdigest(), 16) % 31990

    def __call__(self, texts, return_tensors="pt", padding="longest", add_special_tokens=False):
        from transformers import BatchEncoding

        rows = [[self.word_id(w) for w in t.split()] for t in texts]
        width = max(len(r) for r in rows)
        assert all(len(r) == width for r in rows), "one question per call: no padding"
        return BatchEncoding({"input_ids": torch.tensor(rows, dtype=torch.long)})


def step_record(scores: torch.Tensor) -> dict:
    """A small, exact-enough record of one step's (rows, vocab) scores."""
    s = scores.float()
    finite = torch.isfinite(s)
    vals, idx = s.masked_fill(~finite, float("-inf")).topk(TOPK, dim=-1)
    return {
        "topk_values": vals.tolist(),
        "topk_indices": idx.tolist(),
        "n_finite": finite.sum(-1).tolist(),
        "finite_sum": s.masked_fill(~finite, 0).sum(-1).tolist(),
        "finite_sumsq": s.masked_fill(~finite, 0).pow(2).sum(-1).tolist(),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pai", required=True, help="official PAI checkout (its own llava/ package is used)")
    ap.add_argument("--model", required=True, help="tiny_llava15.build() output directory")
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--scratch", help="also save full-vocabulary tensors here (outside the fixtures) for max-diff reports"
    )
    args = ap.parse_args()
    full = {"layout": {}, "runs": []}
    sys.path.insert(0, str(Path(args.pai).resolve()))
    torch.manual_seed(0)

    import attention  # official
    import constants  # official
    import model_loader  # official
    from llava.model import LlavaLlamaForCausalLM  # official (bundled)
    from transformers.generation.logits_process import LogitsProcessorList

    model = LlavaLlamaForCausalLM.from_pretrained(
        str(Path(args.model) / "original"), torch_dtype=torch.float32, attn_implementation="eager"
    )
    model.get_vision_tower().load_model()
    model.eval()

    loader = model_loader.ModelLoader.__new__(model_loader.ModelLoader)  # skip load_model(): no 7B download
    loader.model_name = "llava-1.5"
    loader.tokenizer = WordHashTokenizer()
    loader.vlm_model = loader.llm_model = model
    template = constants.SYSTEM_MESSAGE + constants.INSTRUCTION_TEMPLATE["llava-1.5"]  # pope_eval.py:94-96
    pixels = tiny.fixed_pixels(1)

    out = {"prompts": [], "layout": {}, "runs": []}
    for qi, question in enumerate(QUESTIONS):
        questions, kwargs = loader.prepare_inputs_for_model(template, [question], {"pixel_values": [pixels]})
        ids = kwargs["input_ids"][0].tolist()
        cut = ids.index(constants.IMAGE_TOKEN_INDEX)
        prompt = {
            "question": question,
            "ids_before_image": ids[1:cut],
            "ids_after_image": ids[cut + 1 :],
            "img_start_idx": loader.img_start_idx,
            "img_end_idx": loader.img_end_idx,
        }
        out["prompts"].append(prompt)

        # Layout equivalence, official side: plain prefill logits of the original layout.
        with torch.inference_mode():
            logits = model(input_ids=kwargs["input_ids"], images=kwargs["images"]).logits[0]
        full["layout"][str(qi)] = logits.clone()
        out["layout"][str(qi)] = {
            "n_positions": logits.shape[0],
            "last_row": step_record(logits[-1:]),
            "rows_checksum": logits.sum(-1).tolist()[-8:],  # last 8 rows (prompt text after the image)
            "image_row_sum": float(logits[loader.img_start_idx : loader.img_end_idx].sum()),
        }

        for name, use_attn, alpha, use_cfg, gamma, beams in RUNS:
            # pope_eval.py:113-143, unchanged but for output_scores/return_dict_in_generate (recording only)
            model_loader_kwargs = dict(kwargs)
            attention.llama_modify(
                model, START_LAYER, END_LAYER, use_attn, alpha, use_cfg, loader.img_start_idx, loader.img_end_idx
            )
            processor = loader.init_cfg_processor(questions, gamma, beams, START_LAYER, END_LAYER) if use_cfg else None
            if processor is not None:
                model_loader_kwargs["logits_processor"] = LogitsProcessorList([processor])
            with torch.inference_mode():
                gen = model.generate(
                    do_sample=False,
                    max_new_tokens=MAX_NEW_TOKENS,
                    use_cache=True,
                    num_beams=beams,
                    output_attentions=False,
                    output_hidden_states=False,
                    output_scores=True,
                    return_dict_in_generate=True,
                    **model_loader_kwargs,
                )
            new = gen.sequences[:, kwargs["input_ids"].shape[1] :]
            full["runs"].append(torch.stack([s.float() for s in gen.scores]))
            out["runs"].append(
                {
                    "prompt": qi,
                    "name": name,
                    "use_attn": use_attn,
                    "alpha": alpha,
                    "use_cfg": use_cfg,
                    "gamma": gamma,
                    "num_beams": beams,
                    "start_layer": START_LAYER,
                    "end_layer": END_LAYER,
                    "new_ids": new.tolist(),
                    "sequences_scores": gen.sequences_scores.tolist()
                    if getattr(gen, "sequences_scores", None) is not None
                    else None,
                    "steps": [step_record(s) for s in gen.scores],
                }
            )
            # undo llama_modify for the next run (pope_eval re-applies it per sample in the same way)
            attention.llama_modify(model, START_LAYER, END_LAYER, False, alpha, False, 0, 0)
            print(name, "beams", beams, "prompt", qi, "->", new.tolist(), flush=True)

    out["pixels_sha256"] = tiny.tensor_sha256(pixels)
    out["max_new_tokens"] = MAX_NEW_TOKENS
    out["topk"] = TOPK
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "pai_official.json").write_text(json.dumps(out, separators=(",", ":")))
    print("wrote", Path(args.out) / "pai_official.json", flush=True)
    if args.scratch:
        Path(args.scratch).mkdir(parents=True, exist_ok=True)
        torch.save(full, Path(args.scratch) / "pai_official_full.pt")


if __name__ == "__main__":
    main()
