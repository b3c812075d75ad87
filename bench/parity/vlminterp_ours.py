"""Our side of the vlm-interp knockout parity check: ``llava_knockout`` official presets on a fixture run.

Shared by tests/test_parity_knockout.py (CI) and vlminterp_compare.py (max-diff report).
"""

from __future__ import annotations

import torch

import tiny_llava15 as tiny


def official_params(flags: dict) -> dict:
    """A fixture run's run_on_coco.py flags as llava_knockout parameters (mode, last_row, window)."""
    from methods.knockout import OFFICIAL_FLAGS

    names = {
        "block_query": "official_block_query",
        "block_query_unidirection": "official_block_query_unidirection",
        "block_vis_to_all_from_layer": "official_block_vis_to_all_from_layer",
        "block_vis_to_gen_not_between_layers_4_to_20": "official_gen_not_4_to_20",
        "block_vis_to_query_not_between_layers_4_to_20": "official_query_not_4_to_20",
        "block_vis_to_all_not_between_layers_4_to_20": "official_all_not_4_to_20",
    }
    flag = next((f for f in names if flags.get(f)), None)
    preset = names[flag] if flag else ("official" if flags["min_token"] == 1 else "official_no_encoding")
    mode, last_row, window = OFFICIAL_FLAGS[preset]
    if window.startswith("after:"):
        window = f"after:{flags['max_layer']}"  # -max_layer_for_i2t_attn as run_on_coco.py sets it
    return {"mode": mode, "last_row": last_row, "window": window}


def run_ours(model, pixels: torch.Tensor, golden: dict, run: dict):
    """(generate output with scores, prompt length) for one fixture run."""
    from methods.knockout import Knockout
    from methods.technique import Request

    ids = tiny.hf_ids(golden["ids_before_image"], golden["ids_after_image"])
    assert ids.shape[1] == golden["prompt_len"]
    tech = Knockout(len(model.model.language_model.layers), **official_params(run["flags"]))
    req = Request(ids, tiny.IMAGE_TOKEN_ID, ids.shape[1], images=[pixels])
    with torch.no_grad():
        out = tech.generate(model, req, input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                            do_sample=False, max_new_tokens=len(run["steps"]), num_beams=1,
                            output_scores=True, return_dict_in_generate=True)
    return out, ids.shape[1]
