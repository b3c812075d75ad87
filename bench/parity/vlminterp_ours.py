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
        out = tech.generate(
            model,
            req,
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels,
            do_sample=False,
            max_new_tokens=len(run["steps"]),
            num_beams=1,
            output_scores=True,
            return_dict_in_generate=True,
        )
    return out, ids.shape[1]


# --- pruning, FastV, compressed context (reprompt/ fixtures) ---

_DESCRIBE: dict = {}


def memoize_describe_pass() -> None:
    """The fixtures' describe pass is the official 300 greedy steps; every selection, pruned run and context
    here starts from the same one, so run it once per (model, ids, pixels, steps)."""
    from methods import reprompt_scoring

    if getattr(reprompt_scoring.describe_pass, "memoized", False):
        return
    original = reprompt_scoring.describe_pass

    def describe_pass(model, ids, pixel_values, image_pos, n_tokens, **image_kwargs):
        if image_kwargs:  # not the fixtures' case (one 336 px image)
            return original(model, ids, pixel_values, image_pos, n_tokens, **image_kwargs)
        key = (id(model), tuple(ids[0].tolist()), tiny.tensor_sha256(pixel_values), n_tokens)
        if key not in _DESCRIBE:
            _DESCRIBE[key] = original(model, ids, pixel_values, image_pos, n_tokens)
        return _DESCRIBE[key]

    describe_pass.memoized, describe_pass.original = True, original
    reprompt_scoring.describe_pass = describe_pass


def prune_technique(model, golden: dict, selection: str, prune_rows: str = "decode"):
    """Reprompt with the official selection for one fixture selection method (keep count as the fixture's)."""
    from methods.reprompt import Reprompt

    memoize_describe_pass()
    score = {
        "attn_over_gen_percentage": "attn_over_gen",
        "attn_over_gen": "attn_over_gen",
        "attn_over_query": "attn_over_query",
        "norm": "norm",
        "norm_percentage": "norm",
    }[selection]
    k = golden["k_fraction"] if selection.endswith("_percentage") else golden["k_count"]
    return Reprompt(
        len(model.model.language_model.layers),
        mode="prune",
        selection="describe",
        keep_ratio=k,
        describe_score=score,
        describe_tokens=len(golden["describe"]["new_ids"]),
        prune_rows=prune_rows,
    )


def selection_ours(model, pixels, golden: dict, selection: str):
    """(per-layer kept absolute positions in ranked order, describe-pass new ids)."""
    from methods import reprompt_scoring

    tech = prune_technique(model, golden, selection)
    d = golden["describe"]
    ids = tiny.hf_ids(d["ids_before_image"], d["ids_after_image"])
    pos = (ids[0] == tiny.IMAGE_TOKEN_ID).nonzero().flatten()
    rows, hidden, new, _ = reprompt_scoring.describe_pass(model, ids, pixels, pos, tech.params["describe_tokens"])
    kept = tech.official_selection(model, ids, pixels, pos)
    return {l: pos[idx] for l, idx in kept.items()}, new[0].tolist()


def run_prune_ours(model, pixels, golden: dict, run: dict):
    """Generate the fixture question through Reprompt.generate with the describe selection."""
    from methods.technique import Request

    prune_rows = "decode" if run["flags"]["min_token"] == 1 else "all"
    tech = prune_technique(model, golden, run["selection"], prune_rows)
    d, q = golden["describe"], golden["question"]
    d_ids = tiny.hf_ids(d["ids_before_image"], d["ids_after_image"])
    tech.describe_ids = lambda req: d_ids  # the fixture's describe prompt (no tokenizer here)
    ids = tiny.hf_ids(q["ids_before_image"], q["ids_after_image"])
    req = Request(ids, tiny.IMAGE_TOKEN_ID, ids.shape[1], images=[pixels])
    with torch.no_grad():
        out = tech.generate(
            model,
            req,
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels,
            do_sample=False,
            max_new_tokens=len(run["steps"]),
            num_beams=1,
            output_scores=True,
            return_dict_in_generate=True,
        )
    return out, ids.shape[1]


def fastv_technique(model, golden: dict, run: dict):
    """``llava_reprompt mode=fastv`` at the run's layer and ratio, and the fixture question's ids."""
    from methods.reprompt import Reprompt

    ids = tiny.hf_ids(golden["ids_before_image"], golden["ids_after_image"])
    tech = Reprompt(
        len(model.model.language_model.layers),
        mode="fastv",
        fastv_layer=run["fastv_layer"],
        fastv_ratio=run["fastv_ratio"],
    )
    return tech, ids


def run_fastv_ours(model, pixels, golden: dict, run: dict):
    """``llava_reprompt mode=fastv`` on the fixture question (fastv_official.json)."""
    from methods.technique import Request

    tech, ids = fastv_technique(model, golden, run)
    req = Request(ids, tiny.IMAGE_TOKEN_ID, ids.shape[1], images=[pixels])
    with torch.no_grad():
        out = tech.generate(
            model,
            req,
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels,
            do_sample=False,
            max_new_tokens=len(run["steps"]),
            num_beams=1,
            output_scores=True,
            return_dict_in_generate=True,
        )
    return out, ids.shape[1]


def run_cache_ours(model, pixels, prune_golden: dict, golden: dict, run: dict):
    """The official compressed context from our describe pass (HF layout), then greedy answers (scores per step)."""
    from methods import reprompt_context, reprompt_scoring

    memoize_describe_pass()
    d = prune_golden["describe"]
    ids = tiny.hf_ids(d["ids_before_image"], d["ids_after_image"])
    pos = (ids[0] == tiny.IMAGE_TOKEN_ID).nonzero().flatten()
    rows, _, _, cache = reprompt_scoring.describe_pass(model, ids, pixels, pos, len(d["new_ids"]))
    kept = dict(
        enumerate(
            reprompt_scoring.attn_over_gen(
                rows, reprompt_scoring.official_count(prune_golden["k_fraction"], pos.numel())
            )
        )
    )
    kept = {l: pos[i] for l, i in kept.items()}
    query = torch.tensor(golden["query_positions"])
    ctx = reprompt_context.official_context(cache, query, kept, run["strategy"], pos.numel())
    suffix = torch.tensor([golden["followup_ids"]])
    with torch.no_grad():
        out = model.generate(
            **_from_cache_inputs(model, ctx, suffix),
            do_sample=False,
            max_new_tokens=len(run["steps"]),
            output_scores=True,
            return_dict_in_generate=True,
        )
    return out, ctx


def _from_cache_inputs(model, ctx, suffix):
    """generate() inputs for a compressed context (as methods.reprompt_context.generate_from builds them)."""
    from methods.kv_cache import with_cache

    n, s = ctx.entries, suffix.shape[1]
    ids = torch.cat([torch.zeros((1, n), dtype=suffix.dtype), suffix], dim=1)
    positions = torch.cat([ctx.positions, ctx.next_position + torch.arange(s)])[None]
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        position_ids=positions,
        use_cache=True,
        **with_cache(ctx.cache()),
    )


# --- every stored greedy step, teacher-forced ---
# The fixtures store all 300 greedy ids of each official run (``official_new_ids``) but scores for the first
# 6 steps only. One forward over the prompt and the official ids (the technique's ``forward``: the same edits,
# rows >= prompt_len are the decode rows) gives our logits at every step given the official prefix; our greedy
# run reproduces the 300 ids exactly when each official id is our argmax there. Where two logits are within the
# scores' tolerance (a near-tie), either pick is consistent with the official logits, so such a step passes
# when the official id is within ``tie`` of our max; the next steps still condition on the official ids.


def forced_steps(new_ids: list[int]) -> list[int]:
    """The official ids a teacher-forced forward can feed: all of them up to the first that is the llava-hf
    layout's image token id (31999, an ordinary vocabulary id in the original layout, where the image is
    -200): in one forward it would count as an image placeholder, while a decode step embeds it as text."""
    return new_ids[: new_ids.index(tiny.IMAGE_TOKEN_ID) + 1] if tiny.IMAGE_TOKEN_ID in new_ids else new_ids


def _forced(tech, model, pixels, prompt: torch.Tensor, new_ids: list[int]) -> torch.Tensor:
    """(steps, vocab) logits of each greedy step of ``new_ids`` after ``prompt``, through ``tech.forward``
    (``new_ids`` as ``forced_steps`` cuts them)."""
    from methods.technique import Request

    new_ids = forced_steps(new_ids)
    n = prompt.shape[1]
    full = torch.cat([prompt, torch.tensor([new_ids[:-1]], dtype=prompt.dtype)], dim=1)
    req = Request(full, tiny.IMAGE_TOKEN_ID, n, images=[pixels])
    with torch.no_grad():
        out = tech.forward(model, req, input_ids=full, attention_mask=torch.ones_like(full), pixel_values=pixels)
    return out.logits[0, n - 1 :].float()


def forced_ours(model, pixels, golden: dict, run: dict) -> torch.Tensor:
    """Knockout: our logits at each of the run's ``official_new_ids`` steps."""
    from methods.knockout import Knockout

    ids = tiny.hf_ids(golden["ids_before_image"], golden["ids_after_image"])
    tech = Knockout(len(model.model.language_model.layers), **official_params(run["flags"]))
    return _forced(tech, model, pixels, ids, run["official_new_ids"])


def forced_prune_ours(model, pixels, golden: dict, run: dict) -> torch.Tensor:
    """Pruning with the describe selection: our logits at each of the run's ``official_new_ids`` steps."""
    prune_rows = "decode" if run["flags"]["min_token"] == 1 else "all"
    tech = prune_technique(model, golden, run["selection"], prune_rows)
    d, q = golden["describe"], golden["question"]
    d_ids = tiny.hf_ids(d["ids_before_image"], d["ids_after_image"])
    tech.describe_ids = lambda req: d_ids
    ids = tiny.hf_ids(q["ids_before_image"], q["ids_after_image"])
    return _forced(tech, model, pixels, ids, run["official_new_ids"])


def forced_fastv_ours(model, pixels, golden: dict, run: dict) -> torch.Tensor:
    """FastV: our logits at each of the run's ``official_new_ids`` steps."""
    tech, ids = fastv_technique(model, golden, run)
    return _forced(tech, model, pixels, ids, run["official_new_ids"])


def forced_cache_ours(model, pixels, prune_golden: dict, golden: dict, run: dict) -> torch.Tensor:
    """Compressed context: our logits at each of the run's ``official_new_ids`` steps (one forward of the
    follow-up and the official ids after the context, ``reprompt_context.forward_from``)."""
    from methods import reprompt_context, reprompt_scoring

    memoize_describe_pass()
    d = prune_golden["describe"]
    ids = tiny.hf_ids(d["ids_before_image"], d["ids_after_image"])
    pos = (ids[0] == tiny.IMAGE_TOKEN_ID).nonzero().flatten()
    rows, _, _, cache = reprompt_scoring.describe_pass(model, ids, pixels, pos, len(d["new_ids"]))
    count = reprompt_scoring.official_count(prune_golden["k_fraction"], pos.numel())
    kept = {l: pos[i] for l, i in enumerate(reprompt_scoring.attn_over_gen(rows, count))}
    ctx = reprompt_context.official_context(
        cache, torch.tensor(golden["query_positions"]), kept, run["strategy"], pos.numel()
    )
    suffix = torch.tensor([golden["followup_ids"] + forced_steps(run["official_new_ids"])[:-1]])
    with torch.no_grad():
        logits = reprompt_context.forward_from(model, ctx, suffix).logits
    return logits[0, len(golden["followup_ids"]) - 1 :].float()


def step_mismatches(logits: torch.Tensor, want: list[int]) -> list[tuple[int, int, int, float]]:
    """(step, our argmax, official id, our max - our logit of the official id) where they differ."""
    assert logits.shape[0] == len(want), (logits.shape, len(want))
    top = logits.argmax(-1)
    gap = logits.max(-1).values - logits.gather(-1, torch.tensor(want)[:, None])[:, 0]
    return [(i, int(top[i]), w, float(gap[i])) for i, w in enumerate(want) if int(top[i]) != w]
