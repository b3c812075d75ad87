"""Measured differences between llava_pm preset=official and the official PM fixtures.

    python bench/parity/pm_compare.py [--fixtures tests/fixtures/official/pm] [--first-token]

Runs the same cases as tests/test_parity_pm.py (our venv, no official stack) and prints, per
case and step, the max abs differences of the maps, H* and the enhanced map, how many cells of
the 8-bit map differ, whether the magnified image and the ids are equal, and the max abs
differences of the answer's logits at the official top-16 ids and of their vocabulary sums.
``--first-token``: instead, the registered ``llava_pm`` (tests/_parity_wrappers.py) answers the loglikelihood
requests of first_token.json's cases (" Yes" / " No", with resample_cd=0 and 1) and the script prints, per case,
the largest difference of log P(answer) from the official first-step distribution's, the official p_y next
to our probabilities, and both answers. docs/pm.md quotes it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default=str(ROOT / "tests" / "fixtures" / "official" / "pm"))
    ap.add_argument("--first-token", action="store_true", help="the loglikelihood path against first_token.json")
    args = ap.parse_args()
    if args.first_token:
        return first_token(Path(args.fixtures))
    import test_parity_pm as t

    from methods import pm_magnify

    t.FIX = Path(args.fixtures)
    data, arrays, prov = fixtures = t.load_fixtures()
    tiny = t._tiny()
    model = t.build_model(tiny, prov)
    processor = t.official_processor(tiny, arrays)
    worst = {"map": 0.0, "h_star": 0.0, "enhanced": 0.0, "cells": 0, "logits": 0.0, "logit_sum": 0.0}
    rows = []
    for name, case in data["cases"].items():
        for refresh in ("once", "every_token") if "every_token" in case else ("once",):
            with t.logit_rows(model) as logit_rows:
                _, tech, _, ids = t._run(model, processor, tiny, fixtures, name, refresh)
            refs = [case["once"]] if refresh == "once" else case["every_token"]["steps"]
            prefixes = [f"{name}/once/"] if refresh == "once" else [f"{name}/every/{i}/" for i in range(len(refs))]
            want_ids = case["once"]["new_ids"] if refresh == "once" else case["every_token"]["new_ids"]
            for ours, ref, prefix in zip(tech.steps, refs, prefixes):
                s = ours.search
                d_map = (
                    max(float(np.abs(r - arrays[f"{prefix}map{i}"].ravel()).max()) for i, r in enumerate(s.raw))
                    if len(s.raw) == ref["passes"]
                    else float("nan")
                )
                d_h = float(np.abs(s.h_star - arrays[f"{prefix}h_star"].ravel()).max())
                d_e = float(np.abs(ours.grid_map - arrays[f"{prefix}enhanced"]).max())
                cells = int(
                    (
                        pm_magnify.official_quantise(torch.from_numpy(ours.grid_map)) != arrays[f"{prefix}grid_uint8"]
                    ).sum()
                )
                same_img = bool(np.array_equal(np.asarray(ours.image), arrays[f"{prefix}magnified"]))
                blocked = [np.flatnonzero(b).tolist() for b in s.blocked] == ref["blocked"]
                rows.append(
                    f"{prefix:32s} passes {len(s.raw)}/{ref['passes']} blocked_equal {blocked} map {d_map:.1e} "
                    f"h* {d_h:.1e} enhanced {d_e:.1e} 8bit_cells {cells} image_equal {same_img}"
                )
                worst |= {
                    "map": max(worst["map"], d_map),
                    "h_star": max(worst["h_star"], d_h),
                    "enhanced": max(worst["enhanced"], d_e),
                    "cells": max(worst["cells"], cells),
                }
            ref_logits = case["once"]["answer_logits"] if refresh == "once" else case["every_token"]["logits"]
            ours = torch.cat(logit_rows)
            d_l = float(
                (
                    ours.gather(-1, torch.tensor(ref_logits["topk_indices"]))
                    - torch.tensor(ref_logits["topk_values"], dtype=torch.float64)
                )
                .abs()
                .max()
            )
            d_s = float((ours.sum(-1) - torch.tensor(ref_logits["sum"])).abs().max())
            worst["logits"], worst["logit_sum"] = max(worst["logits"], d_l), max(worst["logit_sum"], d_s)
            rows.append(f"{name} {refresh}: ids equal {ids == want_ids} logits (top 16) {d_l:.1e} sums {d_s:.1e}")
    print("\n".join(rows))
    print("worst:", worst)


def first_token(fixtures: Path) -> None:
    import json
    import tempfile

    import test_parity_pm_first_token as ft
    from _parity_wrappers import Wrappers

    from lmms_eval_plugins.testing import load_parity_script

    ft.FIX = fixtures
    golden = json.loads((fixtures / "first_token.json").read_text())
    tiny = load_parity_script("tiny_llava15")
    wrappers = Wrappers(tiny, golden["provenance"], Path(tempfile.mkdtemp()))
    utils = ft.load_task_utils()
    worst = 0.0
    for name, case in golden["cases"].items():
        for label, extra in (("magnified", ""), ("resample_cd", f",resample_cd={case['resample_cd']['cd']}")):
            record = case[label]
            lm = wrappers.get("llava_pm", ft.MODEL_ARGS[case["settings"]] + extra, case["prompt"]["before"])
            results, _ = ft.ask(lm, tiny, case)
            ids = [ft.answer_id(tiny, w) for w in ("Yes", "No")]
            diff = max(abs(-loss - record["logprob"][str(i)]) for (loss, _), i in zip(results, ids))
            worst = max(worst, diff)
            ours = [float(np.exp(-loss)) for loss, _ in results]
            print(
                f"{name:22s} {label:11s} log P diff {diff:.1e}  P(Yes), P(No) ours {ours[0]:.6f} {ours[1]:.6f}  "
                f"official p_y {record['p_y'][0]:.6f} {record['p_y'][1]:.6f}  answers ours "
                f"{utils.first_token_answer(results)} official {record['answer']}",
                flush=True,
            )
    print("worst log P diff:", worst)


if __name__ == "__main__":
    main()
