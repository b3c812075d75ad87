"""Golden fixtures from the official localization-heads code, both versions, run unmodified on CPU.

Two stages, never in CI: ``collect`` in the official stack's venv (bench/parity/official_env.sh),
``analyze`` in one with the numpy and scipy 8ce33b0's dependency_pip.txt pins (numpy 2.2.6, scipy 1.15.3;
regenerate.sh --lochead-numpy builds it), since numpy >= 2 makes HEAD's entropies float32 (NEP 50):

    python bench/parity/lochead_official.py collect --llava /work/official/PAI --model MODEL_DIR --scratch S
    python bench/parity/lochead_official.py analyze --head /work/official/lochead_head \\
        --v2 /work/official/lochead_v2 --scratch S --out tests/fixtures/official/lochead

``collect`` (LLaVA-1.5's own forward): the tiny model of ``tiny_llava15.py`` in the original layout,
loaded with a LLaVA-1.5 ``llava`` package (the one bundled with PAI; the LocalizationHeads checkouts
bundle a copy rewritten for transformers 4.52.3, dependency_pip.txt, which this venv does not have)
with eager attention; one forward with ``output_attentions=True`` and the official slice
``attn[:, :, -1:, begin_pos_vis:begin_pos_vis + vis_len]`` (9ffe219 collector.py:280-300; HEAD
localization_heads_finder.py:163-174 takes the same slice of the prefill attention). The prompt is
the official form (conv ``referseg``, SeparatorStyle.PLAIN: system + "\\n" + "<image>\\n" + query,
conversation.py:98-110 and :373-380; token 29871 dropped, lab/stations.py:316-324), as ids: no
Vicuna tokenizer here, so the ids are fixed and recorded. Saved as HEAD's stage-1 pickles
([L, H, 1, V] tensors, localization_heads_finder.py:181).

``analyze`` (the official analysis and box code, imported from the checkouts):
HEAD 8ce33b0 ``LocalizationHeadsFinder.analyze_attention_file`` (stage 2, on the pickles; the class is
created without ``__init__``, which would load a 7B model) and ``spatial_entropy`` /
``find_elbow_point``; 9ffe219 ``analyze.analyze_heads`` with ``conf/logic/selection_v1.yaml`` and the
box steps of ``pipeline.py:70-74`` (``bbox.combine_heads``, ``binarize_mean_relu``, ``bbox_from_mask``,
``scale_bbox_to_image``). ``localization_heads_finder.py`` imports the model stack, hydra, omegaconf
and matplotlib at its top; stand-ins for those (``stubs`` below, hashed into provenance.json) are
never called on this path. Both versions' pure steps are also recorded on synthetic maps.
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
import cpu_shim  # noqa: E402

cpu_shim.install()

import torch  # noqa: E402

import tiny_llava15 as tiny  # noqa: E402

HEAD_COMMIT = "8ce33b0b24ad85c7aa78fe86f2d8d8bf1ded676c"
V2_COMMIT = "9ffe219d20ec376eb4dd14d42c54bb3299ffdb4a"
N_SAMPLES = 8
V2_TOP_K = 5  # conf/logic/selection_v1.yaml top_k
# referseg system prompt + "\n" as fixed ids (conversation.py:373-380); "\n" = 13
SYSTEM_IDS = [887, 526, 263, 8444, 4086, 322, 18551, 20255, 29889, 887, 526, 2221, 304, 2274, 278, 7604, 2793, 13]
EXPRESSIONS = [  # "\n" + expression (29871 already dropped)
    [13, 263, 11203, 29889],
    [13, 17952, 29889],
    [13, 278, 2175, 11203, 373, 278, 1492],
    [13, 2654, 17184, 297, 278, 25157],
    [13, 278, 13328, 1559],
    [13, 263, 2319, 7933, 8424, 2446, 304, 278, 4094],
    [13, 1023, 3148],
    [13, 278, 11203, 29892, 451, 278, 6635, 29889],
]
# the image sizes the v2 box is scaled to (scale_bbox_to_image uses only the size)
IMAGE_SIZES = [(640, 480), (480, 640), (500, 500), (640, 427), (427, 640), (800, 600), (336, 336), (1024, 512)]


def stubs() -> None:
    """Stand-ins for modules imported at the top of localization_heads_finder.py, never called in stage 2."""

    def stub(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        m.__path__ = []
        sys.modules[name] = m

    stub("hydra", main=lambda **kw: lambda fn: fn)
    stub("omegaconf", DictConfig=dict, OmegaConf=None)
    stub("matplotlib")
    stub("matplotlib.pyplot")
    stub("lab", MetadataStation=None, AttentionStation=None, StationEngine=None)
    stub("llava")
    stub(
        "llava.constants",
        IMAGE_TOKEN_INDEX=-200,
        DEFAULT_IMAGE_TOKEN="<image>",
        DEFAULT_IM_START_TOKEN="<im_start>",
        DEFAULT_IM_END_TOKEN="<im_end>",
        IMAGE_PLACEHOLDER="<image-placeholder>",
    )
    stub("llava.conversation", conv_templates={})
    stub("llava.model")
    stub("llava.model.builder", load_pretrained_model=None)
    stub("llava.utils", disable_torch_init=None)
    stub("llava.mm_utils", process_images=None, tokenizer_image_token=None, get_model_name_from_path=None)


STUBS = inspect.getsource(stubs)


def collect(args) -> None:
    sys.path.insert(0, str(Path(args.llava).resolve()))
    from llava.model import LlavaLlamaForCausalLM  # LLaVA-1.5 (bundled with the given checkout)

    model = LlavaLlamaForCausalLM.from_pretrained(
        str(Path(args.model) / "original"), torch_dtype=torch.float32, attn_implementation="eager"
    )
    model.get_vision_tower().load_model()
    model.eval()
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    pixels = tiny.fixed_pixels(N_SAMPLES)
    samples = []
    for i in range(N_SAMPLES):
        before, after = SYSTEM_IDS, EXPRESSIONS[i]
        ids = torch.tensor([[1, *before, tiny.IMAGE_TOKEN_INDEX, *after]])
        begin_pos_vis = 1 + len(before)
        with torch.inference_mode():
            out = model(input_ids=ids, images=pixels[i : i + 1], output_attentions=True, return_dict=True)
        attn = torch.stack([t[0] for t in out.attentions], 0)  # [L, H, Tq, Tk] (collector.py:291-294)
        attn = attn[:, :, -1:, begin_pos_vis : begin_pos_vis + tiny.N_IMAGE_TOKENS].contiguous()  # collector.py:300
        with open(scratch / f"sample{i}.pkl", "wb") as f:
            pickle.dump(attn, f)  # HEAD's stage-1 file (localization_heads_finder.py:181)
        samples.append(
            {"before": before, "after": after, "begin_pos_vis": begin_pos_vis, "image_size": list(IMAGE_SIZES[i])}
        )
    info = json.loads((Path(args.model) / "model_info.json").read_text())
    (scratch / "collect.json").write_text(
        json.dumps({"samples": samples, "model": info, "llava": str(args.llava), "stack": _versions()}, indent=1)
    )


def _versions() -> dict:
    """The versions that decide the arithmetic of this stage (the analysis: numpy's promotion rules)."""
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "numpy": np.__version__, "torch": torch.__version__}
    for name in ("scipy", "transformers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _pins(checkout: Path) -> dict:
    """numpy / scipy / torch as the checkout's dependency_pip.txt pins them (8ce33b0: 2.2.6, 1.15.3, 2.7.0)."""
    pins = {}
    for line in (checkout / "dependency_pip.txt").read_text().splitlines():
        name, _, version = line.strip().partition("==")
        if name in ("numpy", "scipy", "torch"):
            pins[name] = version
    return pins


def _finite(x):
    return None if not math.isfinite(float(x)) else float(x)


def _load_v2(v2: Path):
    sys.path.insert(0, str(v2))
    import analyze as v2_analyze  # noqa: E402  (9ffe219)
    import bbox as v2_bbox  # noqa: E402  (9ffe219)
    import yaml

    logic = yaml.safe_load((v2 / "conf" / "logic" / "selection_v1.yaml").read_text())

    def ns(d):
        return types.SimpleNamespace(**{k: ns(v) if isinstance(v, dict) else v for k, v in d.items()})

    sys.path.remove(str(v2))
    return v2_analyze, v2_bbox, types.SimpleNamespace(logic=ns(logic)), logic


def _load_head(head: Path):
    stubs()
    sys.path.insert(0, str(head))
    import localization_heads_finder as lhf  # noqa: E402  (8ce33b0)

    sys.path.remove(str(head))
    finder = lhf.LocalizationHeadsFinder.__new__(lhf.LocalizationHeadsFinder)  # no __init__: no 7B model
    return finder


def synthetic_maps() -> dict:
    """Edge cases of the entropy and the elbow (24 x 24 maps, values like attention)."""
    rng = np.random.default_rng(3)
    maps = {}
    maps["uniform"] = np.full((24, 24), 1 / 576, np.float32)
    one = np.full((24, 24), 1e-4, np.float32)
    one[5:8, 9:12] = 0.05
    maps["one_blob"] = one
    two = one.copy()
    two[15:18, 2:4] = 0.02
    two[20, 20] = 0.004
    maps["two_blobs_and_a_speck"] = two
    faint = np.full((24, 24), 1e-3, np.float32)
    faint[3, 3] = 1.5e-3  # relu mass above the mean but below the 0.001 binarisation: no component
    maps["faint"] = faint
    maps["random"] = rng.dirichlet(np.full(576, 0.3)).astype(np.float32).reshape(24, 24) * 0.6
    bottom = np.full((24, 24), 2e-4, np.float32)
    bottom[-1, :] = 0.02
    maps["bottom_row"] = bottom
    return maps


def synthetic_stacks() -> dict:
    """Small [L, H, 1, 576] attention stacks built from the synthetic maps."""
    m = {k: torch.from_numpy(v).flatten() for k, v in synthetic_maps().items()}
    scaled = lambda t, f: t * f  # noqa: E731
    # layers 0-1 hold the strong heads (dropped by 9ffe219), layer 2 only bottom-row heads: nothing is kept
    fallback = torch.stack(
        [
            torch.stack([scaled(m["one_blob"], 3.0), scaled(m["two_blobs_and_a_speck"], 3.0)]),
            torch.stack([scaled(m["random"], 1.5), scaled(m["one_blob"], 2.5)]),
            torch.stack([scaled(m["bottom_row"], 2.0), scaled(m["bottom_row"], 1.0)]),
        ]
    )[:, :, None, :]
    mixed = torch.stack(
        [
            torch.stack([m["uniform"], m["faint"], scaled(m["random"], 0.5)]),
            torch.stack([scaled(m["one_blob"], 0.2), m["two_blobs_and_a_speck"], m["uniform"]]),
            torch.stack([m["random"], scaled(m["one_blob"], 1.2), m["faint"]]),
            torch.stack([scaled(m["two_blobs_and_a_speck"], 1.1), m["bottom_row"], scaled(m["random"], 0.8)]),
        ]
    )[:, :, None, :]
    return {"v2_fallback": fallback.float().contiguous(), "mixed": mixed.float().contiguous()}


def analyze(args) -> None:
    scratch, out = Path(args.scratch), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    collected = json.loads((scratch / "collect.json").read_text())
    v2_analyze, v2_bbox, cfg, logic = _load_v2(Path(args.v2))
    finder = _load_head(Path(args.head))
    P = 24
    arrays = {}
    fixture = {"samples": [], "synthetic": {}, "v2_logic": logic, "v2_top_k": V2_TOP_K}
    for i, s in enumerate(collected["samples"]):
        path = scratch / f"sample{i}.pkl"
        with open(path, "rb") as f:
            attn = pickle.load(f)  # [L, H, 1, V]
        L, H, _, V = attn.shape
        # HEAD: stage 2 (analyze_attention_file), its elbow threshold (a flattened head index)
        sums = [finder.vis_attn_summation(attn[l, h, 0]) for l in range(L) for h in range(H)]
        threshold_idx = int(finder.find_elbow_point(list(range(L * H)), sums))
        head_results = finder.analyze_attention_file(str(path))
        # 9ffe219: analyze_heads, then the box of pipeline.py:70-74
        thr_val = float(v2_analyze.elbow_chord(sums))
        kept = v2_analyze.analyze_heads(cfg, attn, {"patch_size": P})
        top = kept[:V2_TOP_K]
        combo = v2_bbox.combine_heads(attn, top, P=P, sigma=cfg.logic.smoothing.sigma)
        mask = v2_bbox.binarize_mean_relu(combo)
        bbox_grid = v2_bbox.bbox_from_mask(mask)
        bbox_img = v2_bbox.scale_bbox_to_image(bbox_grid, tuple(s["image_size"]), P)
        arrays[f"s{i}_v2_combined"] = combo
        # the maps of the heads either version ranks first (the full [L, H, V] tensor stays in the scratch
        # directory; its max diff against our capture is measured at regeneration time)
        shown = {(r["layer"], r["head"]) for r in head_results[:10]} | {(r["layer"], r["head"]) for r in top}
        shown = sorted(shown)
        arrays[f"s{i}_shown_heads"] = np.array(shown, np.int64)
        arrays[f"s{i}_shown_maps"] = np.stack([attn[l, h, 0].numpy() for l, h in shown]).astype(np.float32)
        se_head = np.array(
            [r["spatial_entropy"] for r in sorted(head_results, key=lambda r: r["head_idx"])], np.float64
        )
        arrays[f"s{i}_head_entropy"] = se_head
        fixture["samples"].append(
            {
                **s,
                "head": {
                    "threshold_idx": threshold_idx,
                    "ranking": [[r["layer"], r["head"]] for r in head_results],
                    "num_above_threshold": int(sum(bool(r["above_threshold"]) for r in head_results)),
                    "top10": [[r["layer"], r["head"], _finite(r["spatial_entropy"])] for r in head_results[:10]],
                },
                "v2": {
                    "threshold_value": thr_val,
                    "kept": [[r["layer"], r["head"]] for r in kept],
                    "top": [[r["layer"], r["head"]] for r in top],
                    "mask": ["".join(map(str, row)) for row in mask.astype(int).tolist()],
                    "bbox_grid": list(map(int, bbox_grid)),
                    "bbox_img": list(map(int, bbox_img)),
                },
            }
        )
        arrays[f"s{i}_sums"] = np.array(sums, np.float64)
        arrays[f"s{i}_v2_kept_entropy"] = np.array([r["spatial_entropy"] for r in kept], np.float64)
    for name, m in synthetic_maps().items():
        t = torch.from_numpy(m)
        head = finder.spatial_entropy(t)
        v2 = v2_analyze.spatial_entropy(t, logic["entropy"]["binarize_threshold"])
        arrays[f"syn_{name}"] = m
        fixture["synthetic"][name] = {
            "head": {
                "entropy": _finite(head["spatial_entropy"]),
                "num_components": int(head["num_components"]),
                "bottom_row_focus": bool((head["labeled_array"][-1, :] > 0).all()),
            },
            "v2": {
                "entropy": _finite(v2["spatial_entropy"]),
                "num_components": int(v2["num_components"]),
                "bottom_row_focus": bool((m[-1, :] > 0.05).any()),
            },
        }
        # the box steps of pipeline.py:70-74 with this map as the only selected head
        combo = v2_bbox.combine_heads(
            t.reshape(1, 1, 1, -1), [{"layer": 0, "head": 0}], P=24, sigma=cfg.logic.smoothing.sigma
        )
        grid = v2_bbox.bbox_from_mask(v2_bbox.binarize_mean_relu(combo))
        fixture["synthetic"][name]["v2"]["bbox_grid"] = list(map(int, grid))
        fixture["synthetic"][name]["v2"]["bbox_img"] = list(map(int, v2_bbox.scale_bbox_to_image(grid, (640, 480), 24)))
    # whole analyses on small synthetic stacks [L, H, 1, 576]: 9ffe219's fallback (nothing kept: the top sums
    # without bottom-row focus, analyze.py:113-116) and HEAD's ranking with its elbow bug on 4 x 3 heads
    fixture["synthetic_stacks"] = {}
    for name, stack in synthetic_stacks().items():
        arrays[f"stack_{name}"] = stack[:, :, 0].numpy()
        path = Path(args.scratch) / f"stack_{name}.pkl"
        with open(path, "wb") as f:
            pickle.dump(stack, f)
        kept = v2_analyze.analyze_heads(cfg, stack, {"patch_size": 24})
        head_results = finder.analyze_attention_file(str(path))
        fixture["synthetic_stacks"][name] = {
            "v2_kept": [[r["layer"], r["head"], _finite(r["spatial_entropy"])] for r in kept],
            "head_ranking": [[r["layer"], r["head"], _finite(r["spatial_entropy"])] for r in head_results],
        }
    curves = {
        "convex": [0.01 * k * k for k in range(40)],
        "plateau": [1.0] * 5 + [0.1 * k for k in range(20)],
        "shuffled": list(np.random.default_rng(5).permutation(np.linspace(0, 1, 30) ** 3)),
    }
    fixture["elbow"] = {
        name: {
            "values": [float(v) for v in c],
            "head_index": int(finder.find_elbow_point(list(range(len(c))), list(c))),
            "v2_value": float(v2_analyze.elbow_chord(list(c))),
        }
        for name, c in curves.items()
    }
    np.savez_compressed(out / "arrays.npz", **arrays)
    (out / "lochead_official.json").write_text(json.dumps(fixture, indent=None, separators=(",", ":")) + "\n")
    provenance(args, collected, out)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def provenance(args, collected, out: Path) -> None:
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True).stdout.split()
    doc = {
        "repositories": {
            "head": {
                "repository": "https://github.com/seilk/LocalizationHeads",
                "commit": HEAD_COMMIT,
                "files": ["localization_heads_finder.py"],
            },
            "v2": {
                "repository": "https://github.com/liu-hanyu-97/LocalizationHeads (fork holding the authors' 9ffe219)",
                "commit": V2_COMMIT,
                "files": ["analyze.py", "bbox.py", "conf/logic/selection_v1.yaml"],
            },
        },
        "collection": "LLaVA-1.5 forward (original layout, eager, output_attentions=True) with the llava package of "
        f"{Path(collected['llava']).name}; slice of 9ffe219 collector.py:300; the LocalizationHeads checkouts' own llava "
        "package needs transformers 4.52.3 (dependency_pip.txt), not the LLaVA-1.5 stack of this venv",
        "harness": "LOCHEAD_LLAVA=/work/official/PAI bash bench/parity/regenerate.sh --lochead /work/official/lochead_head:/work/official/lochead_v2 "
        f"--lochead-numpy {np.__version__}",
        "model": {"builder": "bench/parity/tiny_llava15.py", **collected["model"]},
        "shim": {
            "cpu_shim_sha256": _sha(HERE / "cpu_shim.py"),
            "stubs": STUBS,
            "stubs_sha256": hashlib.sha256(STUBS.encode()).hexdigest(),
            "harness_sha256": _sha(Path(__file__)),
        },
        # the analysis ran here; numpy decides the entropies' dtype (float32 from 2.0 on, NEP 50)
        "official_stack": {**_versions(), "pip_freeze": freeze},
        "pinned_by_head": {"file": "dependency_pip.txt", **_pins(Path(args.head))},
        "collect_stack": collected.get("stack"),
        "not_in_official_code": "neither version ranks heads by selection frequency over samples (the paper's step); "
        "HEAD returns one sample's heads sorted by entropy, 9ffe219 boxes each sample with its own top-5",
    }
    (out / "provenance.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=("collect", "analyze"))
    ap.add_argument("--llava", help="collect: a checkout with LLaVA-1.5's llava/ package (PAI's)")
    ap.add_argument("--model", help="collect: tiny_llava15.build() output directory")
    ap.add_argument("--head", help="analyze: LocalizationHeads @ 8ce33b0")
    ap.add_argument("--v2", help="analyze: LocalizationHeads @ 9ffe219")
    ap.add_argument("--scratch", required=True)
    ap.add_argument("--out")
    a = ap.parse_args()
    collect(a) if a.stage == "collect" else analyze(a)
