"""bench/lochead_next_blocks.py: the LLaVA-NeXT built from the trained LLaVA-1.5 ShapeWorld checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def _lm_inputs(model, inputs) -> torch.Tensor:
    """The embeddings the language model receives (image features already scattered in)."""
    seen = {}

    def keep(module, args, kwargs):
        seen["e"] = kwargs["inputs_embeds"]

    hook = model.model.language_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return seen["e"][0]


def test_converted_next_keeps_llava15_weights_and_geometry(tmp_path):
    import lochead_next_blocks as bench
    from transformers import (
        AutoProcessor,
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
    )

    from lmms_eval_plugins.paths import CHECKPOINTS
    from lmms_eval_plugins.shapeworld.data import rec_docs, render_doc
    from methods.families import image_geometry

    src = CHECKPOINTS["shapeworld-tiny"]
    path = bench.convert(src, tmp_path / "next", newline="mean", newline_scenes=8)
    # processor token counts = methods/geometry.py for square and non-square images (raises otherwise);
    # the ShapeWorld image by hand: 8x8 base + 2x2 tiles of 8x8 = 16x16 with 16 newlines
    counts = bench.check_geometry(path, [(336, 336), (500, 160), (200, 336)])
    assert counts["336x336"] == {"tokens": 64 + 16 * 17, "base": "8x8", "highres": "16x16", "newlines": 16}
    assert counts["500x160"] == {
        "tokens": 64 + 8 * 25,
        "base": "8x8",
        "highres": "8x24",
        "newlines": 8,
    }  # 1x3 tiles, padding rows removed

    old = LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    new = LlavaNextForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    new_sd = new.state_dict()
    assert all(torch.equal(new_sd[k], v) for k, v in old.state_dict().items())

    # the LM sees LLaVA-1.5's own image embeddings in the base block and the mean-feature newline after each high-res row
    image = render_doc(rec_docs("test")[0])
    text = "USER: <image>\nwhere is the circle ? ASSISTANT:"
    p_old, p_new = AutoProcessor.from_pretrained(src), AutoProcessor.from_pretrained(path)
    in_old, in_new = (
        p_old(images=image, text=text, return_tensors="pt"),
        p_new(images=image, text=text, return_tensors="pt"),
    )
    e_old, e_new = _lm_inputs(old, in_old), _lm_inputs(new, in_new)
    geo = image_geometry(new.config, p_new, image.size, in_new["input_ids"])
    img_old = (in_old["input_ids"][0] == old.config.image_token_id).nonzero().flatten()
    torch.testing.assert_close(e_new[geo.base.positions], e_old[img_old], rtol=0, atol=1e-5)
    nl = new.model.image_newline
    assert nl.abs().sum() > 0 and torch.equal(e_new[geo.newlines], nl.expand(16, -1))
