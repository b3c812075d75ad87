"""Our official localization-heads steps against the official results, measured at regeneration time (our venv).

    python bench/parity/lochead_compare.py --scratch S --model MODEL_DIR --fixtures tests/fixtures/official/lochead

1. On the official attention itself (the full [L, H, V] maps the collect stage saved in the scratch
   directory, too large for the fixtures): our HEAD ranking, 9ffe219 kept list, top-5 box must be equal;
   the largest entropy difference (0 where our float32 arithmetic is the official one's under numpy 2.2.6).
2. Our hook layer's capture on the llava-hf layout against those maps: max abs diff, and how many
   heads' entropies flip (a cell within the capture noise of a binarisation threshold).
The numbers go into provenance.json under "measured".
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))
import tiny_llava15 as tiny  # noqa: E402

from methods import hooks, lochead_maps, lochead_official  # noqa: E402

GRID = (24, 24)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scratch", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--fixtures", required=True)
    a = ap.parse_args()
    fix = Path(a.fixtures)
    fx = json.loads((fix / "lochead_official.json").read_text())
    arrays = np.load(fix / "arrays.npz")
    model = tiny.load_hf(a.model)
    hooks.install(model)
    pixels = tiny.fixed_pixels(len(fx["samples"]))
    m = {
        "on_official_maps": {"head_ranking_equal": 0, "v2_kept_equal": 0, "v2_box_equal": 0},
        "on_official_maps_entropy_max_abs_diff": {"head": 0.0, "v2_kept": 0.0},
        "capture": {"max_abs_diff": 0.0, "head_entropy_flips": 0, "max_entropy_diff_unflipped": 0.0},
        "samples": len(fx["samples"]),
    }
    for i, s in enumerate(fx["samples"]):
        with open(Path(a.scratch) / f"sample{i}.pkl", "rb") as f:
            ref = pickle.load(f)[:, :, 0].float()
        head = lochead_official.rank_heads_official(ref, GRID)
        m["on_official_maps"]["head_ranking_equal"] += [[r["layer"], r["head"]] for r in head] == s["head"]["ranking"]
        kept = lochead_official.rank_heads_official_v2(ref, GRID)
        m["on_official_maps"]["v2_kept_equal"] += [[r["layer"], r["head"]] for r in kept] == s["v2"]["kept"]
        diffs = m["on_official_maps_entropy_max_abs_diff"]
        for key, ours_se, ref_se in (
            (
                "head",
                [r["spatial_entropy"] for r in sorted(head, key=lambda r: (r["layer"], r["head"]))],
                arrays[f"s{i}_head_entropy"],
            ),
            ("v2_kept", [r["spatial_entropy"] for r in kept], arrays[f"s{i}_v2_kept_entropy"]),
        ):
            if len(ours_se) == len(ref_se):
                both = [(x, y) for x, y in zip(ours_se, ref_se) if math.isfinite(x) and math.isfinite(y)]
                diffs[key] = max([diffs[key]] + [abs(x - float(y)) for x, y in both])
        top = [(r["layer"], r["head"]) for r in kept[:5]]
        box = lochead_official.official_box_grid(
            lochead_maps.combine_head_maps(torch.stack([ref[l, h].reshape(GRID) for l, h in top]), 1.0)
        )
        m["on_official_maps"]["v2_box_equal"] += list(box) == s["v2"]["bbox_grid"]
        ids = tiny.hf_ids(s["before"], s["after"])
        pos = hooks.image_positions(ids, tiny.IMAGE_TOKEN_ID)
        ours = lochead_maps.capture_image_maps(model, {"input_ids": ids, "pixel_values": pixels[i : i + 1]}, pos)
        m["capture"]["max_abs_diff"] = max(m["capture"]["max_abs_diff"], float((ours - ref).abs().max()))
        e_ours = {
            (r["layer"], r["head"]): r["spatial_entropy"] for r in lochead_official.rank_heads_official(ours, GRID)
        }
        for r in head:
            e, o = r["spatial_entropy"], e_ours[(r["layer"], r["head"])]
            if math.isfinite(e) != math.isfinite(o) or (math.isfinite(e) and abs(e - o) > 2e-5):
                m["capture"]["head_entropy_flips"] += 1
            elif math.isfinite(e):
                m["capture"]["max_entropy_diff_unflipped"] = max(m["capture"]["max_entropy_diff_unflipped"], abs(e - o))
    prov_path = fix / "provenance.json"
    prov = json.loads(prov_path.read_text())
    prov["measured"] = m
    prov_path.write_text(json.dumps(prov, indent=1) + "\n")
    print(json.dumps(m, indent=1))
    n = len(fx["samples"])
    assert all(v == n for v in m["on_official_maps"].values()), (
        "our official steps differ from the official code on its own maps"
    )


if __name__ == "__main__":
    main()
