"""Our side of the PAI parity check: ``llava_pai preset=official`` on one fixture run.

Shared by tests/test_parity_pai.py (CI) and bench/parity/pai_compare.py (max-diff report).
"""

from __future__ import annotations

import torch

import tiny_llava15 as tiny


def prompt_ids(prompt: dict) -> torch.Tensor:
    """The HF-layout ids of a fixture prompt; checks the official image span (model_loader.py:121-122)."""
    ids = tiny.hf_ids(prompt["ids_before_image"], prompt["ids_after_image"])
    img = (ids[0] == tiny.IMAGE_TOKEN_ID).nonzero().flatten()
    if (int(img[0]), int(img[-1]) + 1) != (prompt["img_start_idx"], prompt["img_end_idx"]):
        raise AssertionError("the image span differs from the official img_start_idx/img_end_idx")
    return ids


def official_params(run: dict) -> dict:
    """The fixture run's official switches as llava_pai parameters (preset=official otherwise)."""
    from lmms_eval_plugins.models.pai import OFFICIAL

    return {
        **OFFICIAL,
        "alpha": run["alpha"] if run["use_attn"] else 0.0,  # pope_eval.py:49 --use-attn off: no boost
        "start_layer": run["start_layer"],
        "end_layer": run["end_layer"],
        "use_cfg": run["use_cfg"],
        "gamma": run["gamma"],
    }


def run_ours(model, pixels: torch.Tensor, prompt: dict, run: dict):
    """(generate output with scores, prompt length) for one fixture run."""
    from methods.pai import Pai
    from methods.technique import Request

    ids = prompt_ids(prompt)
    pai = Pai(len(model.model.language_model.layers), **official_params(run))
    req = Request(ids, tiny.IMAGE_TOKEN_ID, ids.shape[1], images=[pixels])
    with torch.no_grad():
        out = pai.generate(
            model,
            req,
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels,
            do_sample=False,
            max_new_tokens=len(run["steps"]),
            num_beams=run["num_beams"],
            output_scores=True,
            return_dict_in_generate=True,
        )
    return out, ids.shape[1]
