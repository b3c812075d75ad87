"""What knockout's deepstack=keep|drop changes on the tiny random Qwen3-VL of tests/test_qwen3_vl.py.

For two prompts x two images and five knockout settings: the last prompt row's max |logit difference|
between keeping DeepStack's injected features and dropping them, and whether the 6-token greedy answers
agree. A random model: this measures the mechanics (where the choice can matter at all), not what it does
to a trained model. docs/qwen3_vl.md has the table.

    OMP_NUM_THREADS=1 PYTHONPATH=.:tests python bench/qwen3_vl_deepstack.py
"""

from __future__ import annotations

import tempfile

import torch
import test_qwen3_vl as T
from transformers import Qwen3VLForConditionalGeneration

from lmms_eval_plugins import testing
from methods import hooks
from methods.knockout import Knockout

SETTINGS = {
    "both, every layer": {"mode": "both"},
    "query, every layer": {"mode": "query"},
    "both, after:1": {"mode": "both", "window": "after:1"},
    "both, layers 0-1": {"mode": "both", "from_layer": 0, "to_layer": 2},
    "no knockout": {"from_layer": 2, "to_layer": 2},
}


def main() -> None:
    ckpt = testing.build_tiny_qwen3_vl(tempfile.mkdtemp(), **T.PIXELS)
    model = Qwen3VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    processor = T._processor(ckpt)
    hooks.install(model)
    print("| prompt | image | knockout | last-row max diff keep vs drop | same 6-token answer |")
    print("|---|---|---|---|---|")
    for text in ("is there a red square in the image?", "how many blue circle are there ?"):
        for size in ((100, 37), (48, 40)):
            inputs = dict(T._inputs(processor, size, text))
            req = T._request(model, processor, inputs, T._resized(size))
            n = inputs["input_ids"].shape[1]
            for label, params in SETTINGS.items():
                out = {}
                for injection in ("keep", "drop"):
                    t = Knockout(4, injection=injection, **params)
                    with torch.no_grad():
                        logits = t.forward(model, req, **inputs).logits[0, -1]
                        answer = t.generate(model, req, **inputs, max_new_tokens=6, do_sample=False)[0, n:]
                    out[injection] = logits, answer.tolist()
                diff = (out["keep"][0] - out["drop"][0]).abs().max().item()
                same = out["keep"][1] == out["drop"][1]
                print(f"| {text} | {size[0]}x{size[1]} | {label} | {diff:.3f} | {same} |")


if __name__ == "__main__":
    main()
