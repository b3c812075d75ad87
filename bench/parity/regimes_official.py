"""Golden fixtures of the official analyses on planted attention (regimes.py): the non-degenerate regimes.

Runs in the official stacks' venvs (bench/parity/official_env.sh, plus scipy and pyyaml), never in CI: PM's
half with numpy 1.x (its torch 2.1.2 pin), the lochead half with 8ce33b0's numpy 2.2.6 / scipy 1.15.3:

    bash bench/parity/regenerate.sh --regimes /work/official/PM:/work/official/lochead_head:/work/official/lochead_v2 \
        --python /work/venv/bin/python                                   # the one command, or by hand:
    /work/venvs/official/bin/python bench/parity/regimes_official.py --part pm --pm /work/official/PM \\
        --out tests/fixtures/official/regimes
    /work/venvs/official_np2/bin/python bench/parity/regimes_official.py --part lochead \\
        --head /work/official/lochead_head --v2 /work/official/lochead_v2 --out tests/fixtures/official/regimes

What runs is the official code, from the checkouts, on inputs built by ``regimes.py`` (numpy only, the
same bits on every CPU; their sha256 are stored, the inputs themselves are rebuilt by the tests):

- Localization heads: HEAD 8ce33b0 ``LocalizationHeadsFinder.analyze_attention_file`` (on the planted
  [32, 32, 1, 576] stack saved as its stage-1 pickle) and ``find_elbow_point``; 9ffe219
  ``analyze.analyze_heads`` with ``conf/logic/selection_v1.yaml`` and the box steps of ``pipeline.py:70-74``
  (``bbox.combine_heads``, ``binarize_mean_relu``, ``bbox_from_mask``, ``scale_bbox_to_image``). Loaded
  exactly as lochead_official.py loads them (its stubs, cpu_shim).
- Perception Magnifier: the official search loop is fused with the model call inside the patched
  ``GenerationMixin.sample`` (pm_sample.py:136-264), so ``pm_sample.sample`` itself runs, unmodified, with
  ``self`` a scripted model (``ScriptedModel`` below): its forward returns, for the key mask the loop passes as
  ``override_mask``, the planted attention of ``regimes.PMModel`` renormalised over the visible keys
  (``[1, 32, 1, T]`` per layer: the loop reads only the last query row, attention_resampler.py:196). The
  functions the loop looks up in its module are wrapped to record inputs and outputs (pm_official.Trace):
  every pass's deep map, 2-means highlight, override mask, H*, the enhanced / 8-bit / upsampled map and
  the magnified image. The search settings are run_llava_pm.sh's (POPE 15/5/0.4/8, MME 10/3/0.3/8) and one
  other ``--exit_threshold`` value. ``accept_resample_args`` is not needed: ``sample`` is called directly.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import lochead_official  # noqa: E402  (installs cpu_shim; its loaders and stubs)
import pm_official  # noqa: E402
import regimes  # noqa: E402

import torch  # noqa: E402
from PIL import Image  # noqa: E402

PM_COMMIT = "58c2c0fdc7199ecca92d3ef7ca0aa36a078296b6"
V2_TOP_K = 5
IMAGE_SIZES = [
    (640, 480),
    (480, 640),
    (500, 500),
    (640, 427),
    (427, 640),
    (800, 600),
    (336, 336),
    (1024, 512),
    (600, 600),
]


def _fin(x):
    return None if not math.isfinite(float(x)) else float(x)


def lochead(args, arrays: dict) -> dict:
    v2_analyze, v2_bbox, cfg, logic = lochead_official._load_v2(Path(args.v2))
    finder = lochead_official._load_head(Path(args.head))
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    P = regimes.GRID
    out = {"v2_logic": logic, "v2_top_k": V2_TOP_K, "samples": []}
    for i, spec in enumerate(regimes.LOCHEAD_SPECS):
        stack = regimes.lochead_stack(spec)
        attn = torch.from_numpy(stack)[:, :, None, :].contiguous()  # [L, H, 1, V] as collector.py:300 slices it
        path = scratch / f"regime{i}.pkl"
        with open(path, "wb") as f:
            pickle.dump(attn, f)
        L, H = stack.shape[:2]
        sums = [finder.vis_attn_summation(attn[l, h, 0]) for l in range(L) for h in range(H)]
        threshold_idx = int(finder.find_elbow_point(list(range(L * H)), sums))
        head_results = finder.analyze_attention_file(str(path))
        kept = v2_analyze.analyze_heads(cfg, attn, {"patch_size": P})
        top = kept[:V2_TOP_K]
        combo = v2_bbox.combine_heads(attn, top, P=P, sigma=cfg.logic.smoothing.sigma)
        mask = v2_bbox.binarize_mean_relu(combo)
        bbox_grid = v2_bbox.bbox_from_mask(mask)
        size = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        bbox_img = v2_bbox.scale_bbox_to_image(bbox_grid, size, P)
        name = spec["name"]
        arrays[f"lh/{name}/head_entropy"] = np.array(
            [r["spatial_entropy"] for r in sorted(head_results, key=lambda r: r["head_idx"])], np.float64
        )
        arrays[f"lh/{name}/head_components"] = np.array(
            [r["num_components"] for r in sorted(head_results, key=lambda r: r["head_idx"])], np.int64
        )
        arrays[f"lh/{name}/v2_combined"] = combo.astype(np.float32)
        arrays[f"lh/{name}/sums"] = np.array(sums, np.float64)
        out["samples"].append(
            {
                "name": name,
                "spec": spec,
                "stack_sha256": regimes.sha256(stack),
                "image_size": list(size),
                "object_cells": regimes.blob_cells(regimes.blob(*spec["object"])),
                "distractor_cells": regimes.blob_cells(regimes.blob(*spec["distractor"])),
                "head": {
                    "threshold_idx": threshold_idx,
                    "ranking": [[r["layer"], r["head"]] for r in head_results],
                    "top10": [[r["layer"], r["head"], _fin(r["spatial_entropy"])] for r in head_results[:10]],
                },
                "v2": {
                    "threshold_value": float(v2_analyze.elbow_chord(sums)),
                    "kept": [
                        [r["layer"], r["head"], _fin(r["spatial_entropy"]), int(r["num_components"])] for r in kept
                    ],
                    "top": [[r["layer"], r["head"]] for r in top],
                    "mask": ["".join(map(str, row)) for row in mask.astype(int).tolist()],
                    "bbox_grid": list(map(int, bbox_grid)),
                    "bbox_img": list(map(int, bbox_img)),
                    # how far the combined map's cells are from its mean (the box's threshold): ties would be CPU-dependent
                    "mean_margin": float(np.abs(combo.astype(np.float64) - float(combo.mean())).min()),
                },
            }
        )
        s = out["samples"][-1]
        print(
            name,
            "v2 box",
            s["v2"]["bbox_grid"],
            "top",
            [(k[0], k[1], round(k[2], 3) if k[2] is not None else None) for k in s["v2"]["kept"][:5]],
            "HEAD thr",
            threshold_idx,
            "top3",
            s["head"]["top10"][:3],
            flush=True,
        )
    return out


class ScriptedModel:
    """``self`` for pm_sample.sample: a forward that returns the planted attention for the mask it is given."""

    def __init__(self, model: regimes.PMModel, dtype=torch.float32):
        self.m = model
        self.dtype = dtype  # float16: the attention an fp16 model returns (fp32 softmax rounded to fp16)
        self.config = types.SimpleNamespace(is_encoder_decoder=False, image_aspect_ratio="pad")
        self.generation_config = types.SimpleNamespace(
            pad_token_id=0,
            eos_token_id=None,
            output_scores=False,
            output_attentions=True,
            output_hidden_states=False,
            return_dict_in_generate=False,
        )
        self.visible = []  # the key mask of every forward

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids, "images": kwargs.get("images")}

    def __call__(
        self,
        input_ids=None,
        images=None,
        override_mask=None,
        return_dict=True,
        output_attentions=None,
        output_hidden_states=None,
        allow_modify=True,
        **kwargs,
    ):
        T = self.m.length
        if override_mask is None:
            visible = np.ones(T, dtype=bool)
        else:
            om = override_mask[0].cpu().numpy()
            assert om.shape == (T,), (om.shape, T)
            visible = om > 0.5
        self.visible.append(visible)
        att = self.m.attention(visible)  # [L, H, T] float32
        attentions = tuple(
            torch.from_numpy(np.ascontiguousarray(att[l]))[None, :, None, :].to(self.dtype) for l in range(att.shape[0])
        )
        logits = torch.zeros(1, input_ids.shape[1], 32)
        logits[..., 3] = 10.0
        return types.SimpleNamespace(attentions=attentions, logits=logits)

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False):
        return model_kwargs


def pm(args, arrays: dict, out_dir: Path) -> dict:
    official = Path(args.pm).resolve()
    sys.path.insert(0, str(official))
    sys.path.insert(0, str(official / "experiments"))
    pm_official.stubs()
    from experiments.utils import pm_sample
    from experiments.utils.helper_functions import process_images_return_pad
    from transformers import CLIPImageProcessor
    from transformers.generation.logits_process import LogitsProcessorList
    from transformers.generation.stopping_criteria import MaxLengthCriteria, StoppingCriteriaList

    trace = pm_official.Trace(pm_sample)
    # LLaVA-1.5's processor settings (openai/clip-vit-large-patch14-336's preprocessor_config.json)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=list(pm_official.tiny.CLIP_MEAN),
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    image = Image.fromarray(regimes.pm_image(), "RGB")
    cfg = types.SimpleNamespace(image_aspect_ratio="pad")
    image_tensor, image_pad_pil, pad_mask = process_images_return_pad([image], image_processor, cfg)
    pad_mask = np.array(pad_mask, dtype=int)
    assert image_pad_pil.size == image.size and np.array_equal(np.asarray(image_pad_pil), np.asarray(image)), (
        "a square image is its own padded view"
    )
    out = {"settings": regimes.PM_SETTINGS, "before": regimes.PM_BEFORE, "after": regimes.PM_AFTER, "cases": {}}
    for spec in regimes.PM_SPECS:
        model = regimes.PMModel(spec)
        stub = ScriptedModel(model, torch.float16 if getattr(args, "fp16", False) else torch.float32)
        input_ids = torch.tensor([[1, *regimes.PM_BEFORE, pm_official.tiny.IMAGE_TOKEN_INDEX, *regimes.PM_AFTER]])
        vis_start = len(regimes.PM_BEFORE) + 1  # model_generate.py:260
        assert vis_start == model.vis_start and input_ids.shape[1] + 575 == model.length
        settings = regimes.PM_SETTINGS[spec["settings"]]
        ra = pm_official.resample_args(settings, image_pad_pil, pad_mask, image_processor, vis_start)
        torch.manual_seed(0)
        with torch.inference_mode():
            pm_sample.sample(
                stub,
                input_ids,
                logits_processor=LogitsProcessorList(),
                stopping_criteria=StoppingCriteriaList([MaxLengthCriteria(max_length=input_ids.shape[1] + 1)]),
                pad_token_id=0,
                output_attentions=True,
                output_scores=False,
                return_dict_in_generate=False,
                resample_args=ra,
                images=image_tensor.float(),
            )
        (step,) = trace.steps()
        name = spec["name"]
        p = f"pm/{name}/"
        n_div = regimes.N_LAYERS - ra.deep_layer  # pm_sample.py:167 and :203 divide by len(attentions[0]) - deep_layer
        for i, m in enumerate(step["maps"]):
            arrays[f"{p}map{i}"] = np.asarray(m) if getattr(args, "fp16", False) else m.astype(np.float32)
        arrays[f"{p}h_star"] = step["h_star"].astype(np.float32)
        arrays[f"{p}enhanced"] = step["enhanced"].astype(np.float32)
        arrays[f"{p}grid_uint8"] = step["grid_uint8"]
        arrays[f"{p}upsampled"] = step["upsampled"]
        arrays[f"{p}magnified"] = step["sampled_float"].astype(np.uint8)
        blocked = [
            np.flatnonzero(~np.asarray(m[vis_start : vis_start + 576], dtype=bool)).tolist()
            for m in step["override_masks"]
        ]
        # the forwards the scripted model saw: 1 unmasked, one per refinement pass, then the answer forward on the magnified image
        seen = [np.flatnonzero(~v[vis_start : vis_start + 576]).tolist() for v in stub.visible]
        assert seen[0] == [] and seen[1:-1] == blocked and seen[-1] == [], (
            "the override masks reached the scripted model"
        )
        stats = [
            float(m.sum().item()) / n_div for m in step["maps"][1:]
        ]  # pm_sample.py:203's exit statistic, from the traced maps
        beta = settings["exit_threshold"]
        out["cases"][name] = {
            "spec": spec,
            "weights_sha256": regimes.sha256(model.weights),
            "passes": len(step["maps"]) - 1,
            "highlight": [np.flatnonzero(h).tolist() for h in step["highlight"]],
            "blocked": blocked,
            "exit_stats": stats,
            "exit": "threshold" if stats[-1] <= beta else "max_iteration",
            "exit_margin": float(min(abs(s - beta) for s in stats)),
            "object_cells": [regimes.blob_cells(regimes.blob(*o[:4])) for o in spec["objects"]],
            "magnified_pixels_sha256": pm_official.tiny.tensor_sha256(torch.from_numpy(step["magnified_pixels"])),
        }
        c = out["cases"][name]
        print(
            name,
            "passes",
            c["passes"],
            "exit",
            c["exit"],
            [round(s, 3) for s in stats],
            "blocked",
            [len(b) for b in blocked],
            flush=True,
        )
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pm", help="ShunqiM/PM @ 58c2c0f (the pm half)")
    ap.add_argument("--head", help="LocalizationHeads @ 8ce33b0 (the lochead half)")
    ap.add_argument("--v2", help="LocalizationHeads @ 9ffe219 (the lochead half)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--scratch", default="/tmp/regimes_scratch")
    ap.add_argument(
        "--fp16",
        action="store_true",
        help="PM only: the scripted model returns fp16 attention, as an fp16 model does (the official runs); "
        "writes the PM fixture of tests/fixtures/official/regimes_fp16",
    )
    ap.add_argument(
        "--part",
        choices=("both", "lochead", "pm"),
        default="both",
        help="regenerate one half into the existing fixture (the other half, its arrays and its stack kept): the "
        "lochead half in a venv with 8ce33b0's numpy 2.2.6, PM's in the official venv (numpy 1.x; torch 2.1.2, "
        "which PM's requirements pin, does not run with numpy 2)",
    )
    args = ap.parse_args()
    needs = {"pm": ("pm",), "lochead": ("head", "v2"), "both": ("pm", "head", "v2")}["pm" if args.fp16 else args.part]
    missing = [f"--{n}" for n in needs if not getattr(args, n)]
    if missing:
        ap.error(f"--part {args.part} needs {' '.join(missing)} (the official checkouts)")
    args.out.mkdir(parents=True, exist_ok=True)
    arrays: dict = {}
    if args.fp16:
        return write_fp16(args, arrays)
    fixture, stacks = {}, {}
    if args.part != "both":  # keep the other half as it was made
        fixture = json.loads((args.out / "regimes_official.json").read_text())
        kept_prefix = "pm/" if args.part == "lochead" else "lh/"
        with np.load(args.out / "arrays.npz") as old:
            arrays.update({k: old[k] for k in old.files if k.startswith(kept_prefix)})
        old_prov = json.loads((args.out / "provenance.json").read_text())
        stacks = old_prov.get("official_stacks") or {
            "lochead": old_prov["official_stack"],
            "pm": old_prov["official_stack"],
        }
    if args.part in ("both", "pm"):  # first: lochead_official's stubs replace the `llava` package PM imports
        fixture["pm"] = pm(args, arrays, args.out)
    if args.part in ("both", "lochead"):
        fixture["lochead"] = lochead(args, arrays)
    np.savez_compressed(args.out / "arrays.npz", **arrays)
    (args.out / "regimes_official.json").write_text(json.dumps(fixture, separators=(",", ":")) + "\n")
    sha = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True).stdout.split()
    provenance = {
        "repositories": {
            "pm": {
                "repository": "https://github.com/ShunqiM/PM",
                "commit": PM_COMMIT,
                "files": [
                    "experiments/utils/pm_sample.py",
                    "experiments/utils/attention_resampler.py",
                    "experiments/API/API_LLaVA/main.py",
                    "experiments/utils/helper_functions.py",
                    "experiments/llava/mm_utils.py",
                ],
            },
            "head": {
                "repository": "https://github.com/seilk/LocalizationHeads",
                "commit": lochead_official.HEAD_COMMIT,
                "files": ["localization_heads_finder.py"],
            },
            "v2": {
                "repository": "https://github.com/liu-hanyu-97/LocalizationHeads (fork holding the authors' 9ffe219)",
                "commit": lochead_official.V2_COMMIT,
                "files": ["analyze.py", "bbox.py", "conf/logic/selection_v1.yaml"],
            },
        },
        "harness": "bash bench/parity/regenerate.sh --regimes /work/official/PM:/work/official/lochead_head:/work/official/lochead_v2 "
        "--python /work/venv/bin/python (runs regimes_official.py --part pm in the official venv, then --part lochead "
        "in the lochead venv with numpy 2.2.6 / scipy 1.15.3; --out tests/fixtures/official/regimes)",
        "inputs": "bench/parity/regimes.py (planted attention; rebuilt by the tests, checked by sha256)",
        "shim": {
            "cpu_shim_sha256": sha(HERE / "cpu_shim.py"),
            "lochead_stubs_sha256": hashlib.sha256(lochead_official.STUBS.encode()).hexdigest(),
            "pm_stubs_sha256": hashlib.sha256(pm_official.STUBS.encode()).hexdigest(),
            "scripted_model": inspect.getsource(ScriptedModel),
            "harness_sha256": sha(Path(__file__)),
            "regimes_sha256": sha(HERE / "regimes.py"),
        },
        "changes_to_official_behaviour": [
            "PM: pm_sample.sample runs with a scripted model as self (its forward returns planted attention for the given override_mask); "
            "sample's own code, and every function it calls, is unmodified",
            "cpu_shim: cuda -> cpu; stubs for modules imported but never called (lochead_official.stubs, pm_official.stubs)",
        ],
    }
    stack = {"python": sys.version.split()[0], "pip_freeze": freeze}
    for part in ("lochead", "pm"):
        if args.part in ("both", part):
            stacks[part] = stack
    provenance["official_stacks"] = stacks  # the stack each half was made with (--part)
    (args.out / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    print("wrote", args.out, sum(f.stat().st_size for f in args.out.iterdir()), "bytes", flush=True)


def write_fp16(args, arrays: dict) -> None:
    """The PM regimes with fp16 attention: pm_sample.sample's own numpy float16 sums, 2-means and exit sums."""
    fixture = {"pm": pm(args, arrays, args.out), "attention_dtype": "float16"}
    for key, value in list(arrays.items()):
        if key.endswith("map0") or "/map" in key:
            assert value.dtype == np.float16, (key, value.dtype)  # the official deep maps came out fp16
    np.savez_compressed(args.out / "arrays.npz", **arrays)
    (args.out / "regimes_official.json").write_text(json.dumps(fixture, separators=(",", ":")) + "\n")
    sha = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True).stdout.split()
    provenance = {
        "repository": "https://github.com/ShunqiM/PM",
        "commit": PM_COMMIT,
        "harness": "python bench/parity/regimes_official.py --fp16 --pm /tmp/official_PM --head X --v2 X "
        "--out tests/fixtures/official/regimes_fp16 (in the official venv; PM only, --head/--v2 unused)",
        "what": "PM's pm_sample.sample on the planted regimes (regimes.py) with the scripted model's attention in "
        "float16, as an fp16 model returns it; everything after is the official code's own arithmetic",
        "shim": {
            "cpu_shim_sha256": sha(HERE / "cpu_shim.py"),
            "pm_stubs_sha256": hashlib.sha256(pm_official.STUBS.encode()).hexdigest(),
            "scripted_model": inspect.getsource(ScriptedModel),
            "harness_sha256": sha(Path(__file__)),
            "regimes_sha256": sha(HERE / "regimes.py"),
        },
        "official_stack": {"python": sys.version.split()[0], "pip_freeze": freeze},
    }
    (args.out / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    print("wrote", args.out, sum(f.stat().st_size for f in args.out.iterdir()), "bytes", flush=True)


if __name__ == "__main__":
    main()
