"""Golden fixtures from the official Perception Magnifier code (ShunqiM/PM @ 58c2c0f), run on CPU.

Runs in the official stack's venv (bench/parity/official_env.sh, plus ``scipy<1.14``, which
attention_resampler.py imports), never in CI:

    bash bench/parity/regenerate.sh --pm /work/official/PM      # the one command (with PAI / PAINT flags)
    # or by hand:
    python bench/parity/tiny_llava15.py /tmp/pm_parity/model                      # our venv
    /work/venvs/official/bin/python bench/parity/pm_official.py \\
        --official /work/official/PM --model /tmp/pm_parity/model --out tests/fixtures/official/pm

What runs is the official code, from the checkout: its ``llava`` package
(``LcdLlavaLlamaForCausalLM``, the class ``load_pretrained_model(subclass=True)`` loads,
model_generate.py:194; ``override_mask`` in its forward, llava_llama.py:240-241), its
``evolve_pm_sampling`` (pm_sample.py:407-429: the patched ``GenerationMixin.sample``), the
per-token path ``sample(resample_args=...)`` (pm_sample.py:136-264) with the POPE script's
settings (scripts/pope/run_llava_pm.sh), and ``process_images_return_pad``
(helper_functions.py:266) for the padded view and pixels.

The two paths:

- ``once`` (stands in for the QA path, model_generate.py:319-418 then 557-561, which is not run):
  the harness runs ``sample`` with ``max_new_tokens=1`` and records its step 0 (the unmasked first
  forward, then re-forwards of the whole prompt with ``override_mask``, exit on ``sum_attention``:
  the same map, 2-means, mask and exit code as the QA loop, which instead re-forwards through a
  sampled ``generate`` per pass and reads its first step's attentions), then the official
  ``generate`` on the magnified image's pixels gives the answer ids and logits
  (model_generate.py:557-561). The QA path's first-token scoring is recorded too (``first_token.json``):
  the official ``generate`` with the scripts' decoding (T=1, no top-k/top-p, so ``scores[0]`` are the
  raw first-step logits) on the original and on the magnified image, scored by the official
  ``calibrate_label_dict`` / ``get_prob_from_logits`` (utils/metrics.py, model_generate.py:301-314 and
  562-581), with a word-level stand-in for Vicuna's tokenizer (``tiny_llava15.word``).
- ``every_token`` (``--resample_during_sampling``): ``sample`` with ``max_new_tokens=NEW_TOKENS``.

Observation only: the functions ``sample`` looks up in its module (``aggregate_layer_attention``,
``get_highlight_mask``, ``prepare_attention_mask``, ``revise_mask``, ``toImg``, ``invtrans``,
``attention_sampling``, ``process_images``) are wrapped to record their inputs and outputs, and a
logits processor records the raw logits of each step. Decoding: the official runs sample at T=1
(model_generate.py:698); here ``top_k=1`` makes that sampling deterministic (the argmax), so the
ids are comparable with greedy decoding.

The runtime shim: ``cpu_shim.install()`` (``.cuda()``/``"cuda"`` -> CPU, ``.half()`` keeps fp32)
and empty stand-ins (``stubs`` below) for modules imported at the top of official files but never
called on this path: cv2 and matplotlib (plotting and the bbox/crop variants), and
``experiments.API.DatasetManager`` (not in the repository's LLaVA path). Both are hashed into
provenance.json. The pure functions of attention_resampler.py and API_LLaVA/main.py are also
recorded on synthetic maps (flat, one-hot, random).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cpu_shim  # noqa: E402

cpu_shim.install()

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import tiny_llava15 as tiny  # noqa: E402

OFFICIAL_COMMIT = "58c2c0f"
NEW_TOKENS = 4
TOPK = 16
# Fixed "text" ids around the image (no Vicuna tokenizer here): ~system prompt, then the question.
PROMPTS = [
    (
        [319, 13563, 1546, 263, 12758, 1404, 322, 385, 23116, 21082, 3148, 1001, 29901],
        [1317, 727, 263, 11203, 297, 278, 1967, 29973, 319, 1799, 29901],
    ),
    ([3148, 1001, 29901], [20355, 915, 278, 1967, 29889, 319, 1799, 29901]),
]
# scripts/pope/run_llava_pm.sh and scripts/mme/run_llava_pm.sh
SETTINGS = {
    "pope": dict(enhance_coe=15, kernel_size=5, exit_threshold=0.4, max_iteration=8),
    "mme": dict(enhance_coe=10, kernel_size=3, exit_threshold=0.3, max_iteration=8),
    # the other exits, with the official arguments: --max_iteration 1, and an exit threshold the
    # tiny model's second map falls under (its maps keep ~4.7-5.0 of attention on the image)
    "pope_iter1": dict(enhance_coe=15, kernel_size=5, exit_threshold=0.4, max_iteration=1),
    "pope_exit": dict(enhance_coe=15, kernel_size=5, exit_threshold=4.9, max_iteration=8),
}


def stubs() -> None:
    """Stand-ins for modules imported at the top of official files, never called on this path."""
    import types

    import transformers.models.llama.modeling_llama  # noqa: F401  (before the stand-ins)

    def stub(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        m.__path__ = []
        sys.modules[name] = m

    for name in ("cv2", "matplotlib", "matplotlib.pyplot", "matplotlib.patches"):
        stub(name)
    for name in ("experiments.API.DatasetManager", "experiments.API.DatasetManager.DatasetManager"):
        stub(name)
    stub("experiments.API.DatasetManager.DatasetManager.dataloader", get_data=None)


STUBS = inspect.getsource(stubs)


def fixed_images() -> dict[str, Image.Image]:
    """Deterministic test images: smooth colour fields with a few small bright squares."""
    out = {}
    rng = np.random.default_rng(7)
    for name, (w, h) in {"wide": (160, 120), "square": (128, 128), "tall": (96, 144)}.items():
        coarse = rng.uniform(40, 200, size=(4, 4, 3)).astype(np.float32)
        img = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BILINEAR), dtype=np.float32)
        for _ in range(3):
            x, y, s = int(rng.integers(0, w - 16)), int(rng.integers(0, h - 16)), int(rng.integers(6, 16))
            img[y : y + s, x : x + s] = rng.uniform(0, 255, size=3)
        out[name] = Image.fromarray(img.astype(np.uint8), "RGB")
    return out


class Trace:
    """Records the official functions' inputs/outputs in call order (wrapping, not changing them)."""

    def __init__(self, module):
        self.events = []
        for name in (
            "aggregate_layer_attention",
            "get_highlight_mask",
            "prepare_attention_mask",
            "revise_mask",
            "toImg",
            "invtrans",
            "attention_sampling",
            "process_images",
        ):
            setattr(module, name, self.wrap(name, getattr(module, name)))

    def wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.events.append((name, args, kwargs, out))
            return out

        return wrapper

    def steps(self) -> list[dict]:
        """Group the events into decoding steps (one perception map and magnified image each)."""
        steps, cur = [], None
        for name, args, _kwargs, out in self.events:
            if cur is None:
                cur = {"maps": [], "highlight_in": [], "highlight": [], "override_masks": []}
            if name == "aggregate_layer_attention":
                cur["maps"].append(np.asarray(out[1]))  # deep_aggregate (sum over deep layers), 24x24
            elif name == "get_highlight_mask":
                cur["highlight_in"].append(np.asarray(args[0]))
                cur["highlight"].append(np.asarray(out))
            elif name == "prepare_attention_mask":
                cur["override_masks"].append(np.asarray(out))
            elif name == "revise_mask":
                cur["h_star"] = args[0].numpy()
                cur["enhanced"] = out.detach().numpy()
            elif name == "toImg":
                cur["grid_uint8"] = np.asarray(out)
            elif name == "invtrans":
                cur["upsampled"] = np.asarray(out)
            elif name == "attention_sampling":
                cur["sampled_float"] = np.asarray(out)
            elif name == "process_images":
                cur["magnified_pixels"] = out.float().numpy()
                steps.append(cur)
                cur = None
        self.events = []
        return steps


class LogitsRecorder:
    """A logits processor that records the raw logits of each step and returns them unchanged."""

    def __init__(self):
        self.rows = []

    def __call__(self, input_ids, scores):
        self.rows.append(scores.detach().float().clone())
        return scores


def logits_record(rows: list) -> dict:
    s = torch.cat(rows, dim=0)
    vals, idx = s.topk(TOPK, dim=-1)
    return {"topk_values": vals.tolist(), "topk_indices": idx.tolist(), "sum": s.double().sum(-1).tolist()}


def load_official(official: Path, model_dir: Path):
    sys.path.insert(0, str(official))  # experiments.* (as model_generate.py:9-12 arranges)
    sys.path.insert(0, str(official / "experiments"))  # llava.*, utils.*
    stubs()
    from experiments.utils import pm_sample
    from llava.model import LcdLlavaLlamaForCausalLM

    pm_sample.evolve_pm_sampling()  # model_generate.py:24-25
    model = LcdLlavaLlamaForCausalLM.from_pretrained(
        str(model_dir / "original"), torch_dtype=torch.float32, attn_implementation="eager"
    )
    tower = model.get_vision_tower()
    if not tower.is_loaded:
        tower.load_model()
    ensure_clip_weights(tower.vision_tower, model_dir / "original" / "clip" / "model.safetensors")
    model.generation_config.pad_token_id = tiny.LLAMA_COMMON["pad_token_id"]
    return model.float().eval(), tower.image_processor, pm_sample


def ensure_clip_weights(clip, path: Path) -> None:
    """Load the tower's checkpoint strictly (transformers 4.37 only warns on a key-prefix mismatch)."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    sd = {k if k.startswith("vision_model.") else "vision_model." + k: v for k, v in sd.items()}
    clip.load_state_dict(sd, strict=True)


def resample_args(settings: dict, image_pad_pil, pad_mask, image_processor, vis_start: int):
    """model_generate.py:282-298 with the script's flags (run_llava_pm.sh)."""
    ra = argparse.Namespace()
    ra.image_pad_pil = image_pad_pil
    ra.resample_method = "magnify"
    ra.normalize_mask = "norm_enhance"
    ra.image_processor = image_processor
    ra.vis_start = vis_start
    ra.deep_layer = 12
    ra.map_constructor = "sum_scale"
    ra.single_layer = False
    ra.kernel_size = settings["kernel_size"]
    ra.enhance_coe = settings["enhance_coe"]
    ra.heatmap = "iterative"
    ra.exit_criteria = "sum_attention"
    ra.exit_threshold = settings["exit_threshold"]
    ra.max_iteration = settings["max_iteration"]
    ra.pad_mask = pad_mask
    ra.iterative_search = "token_mask"
    return ra


@contextlib.contextmanager
def accept_resample_args():
    """The per-token path as released cannot start: transformers 4.37.2 (requirements.txt) rejects
    ``resample_args`` in ``generate`` (``_validate_model_kwargs``: not a forward argument of
    ``LcdLlavaLlamaForCausalLM``), an official bug. For these calls only, skip that validation."""
    from transformers.generation.utils import GenerationMixin

    original = GenerationMixin._validate_model_kwargs
    GenerationMixin._validate_model_kwargs = lambda self, model_kwargs: None
    try:
        yield
    finally:
        GenerationMixin._validate_model_kwargs = original


def gen_kwargs(max_new: int, recorder: LogitsRecorder) -> dict:
    """model_generate.py:263-276 (T=1 sampling) with top_k=1: deterministic."""
    from transformers.generation.logits_process import LogitsProcessorList

    return dict(
        do_sample=True,
        temperature=1.0,
        top_k=1,
        num_beams=1,
        max_new_tokens=max_new,
        use_cache=True,
        output_scores=True,
        return_dict_in_generate=True,
        output_attentions=True,
        logits_processor=LogitsProcessorList([recorder]),
    )


def pixel_lut(image_processor) -> torch.Tensor:
    """(3, 256) the processor's value for every 8-bit level per channel (rescale + normalise only)."""
    ramp = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16)[:, :, None], 3, axis=2)
    out = image_processor.preprocess(
        Image.fromarray(ramp, "RGB"), do_resize=False, do_center_crop=False, return_tensors="pt"
    )["pixel_values"][0]
    return out.reshape(3, 256)


def official_pixels_u8(image_pad_pil, image_processor, image_tensor) -> np.ndarray:
    """The 8-bit 336 x 336 image behind the official pixels: transformers 4.37's CLIPImageProcessor
    resizes a square image with PIL bicubic, so pixels == lut[c][u8]. Checked bit for bit here, so
    CI can rebuild the official pixel tensor from a PNG and the lut."""
    size = image_processor.crop_size["height"]
    u8 = np.asarray(image_pad_pil.resize((size, size), Image.BICUBIC))
    lut = pixel_lut(image_processor)
    rebuilt = torch.stack([lut[c][torch.from_numpy(u8[:, :, c].astype(np.int64))] for c in range(3)])
    assert torch.equal(rebuilt, image_tensor[0].float()), "official pixels are not lut[u8] of a PIL bicubic resize"
    return u8


def step_arrays(prefix: str, step: dict, arrays: dict, vis_start: int) -> dict:
    """Store a step's arrays (npz) and return its small JSON part."""
    for i, m in enumerate(step["maps"]):
        arrays[f"{prefix}map{i}"] = m.astype(np.float32)
    arrays[f"{prefix}h_star"] = step["h_star"].astype(np.float64)
    arrays[f"{prefix}enhanced"] = step["enhanced"].astype(np.float32)
    arrays[f"{prefix}grid_uint8"] = step["grid_uint8"]
    arrays[f"{prefix}upsampled"] = step["upsampled"]
    arrays[f"{prefix}magnified"] = step["sampled_float"].astype(np.uint8)
    return {
        "passes": len(step["maps"]),
        "blocked": [
            np.flatnonzero(~np.asarray(m[vis_start : vis_start + 576], dtype=bool)).tolist()
            for m in step["override_masks"]
        ],
        "mask_lengths": [len(m) for m in step["override_masks"]],
        "highlight": [np.flatnonzero(h).tolist() for h in step["highlight"]],
        "sampled_is_integral": bool(np.all(step["sampled_float"] == np.round(step["sampled_float"]))),
        "magnified_pixels_sha256": tiny.tensor_sha256(torch.from_numpy(step["magnified_pixels"])),
        "magnified_pixels_sum": float(step["magnified_pixels"].astype(np.float64).sum()),
    }


RESAMPLE_CD = 1.0  # a --resample_cd value for the contrast record (the scripts leave it at 0)


def qa_kwargs() -> dict:
    """model_generate.py:263-276 as the POPE / MME scripts run it: T=1 sampling with top_p and top_k None,
    so transformers 4.37 adds no warper and ``scores[0]`` are the first step's raw logits; max_new_tokens 1
    (the scripts' 10 leave ``scores[0]`` as it is, and only ``scores[0]`` is scored)."""
    return dict(
        do_sample=True,
        temperature=1.0,
        top_p=None,
        top_k=None,
        num_beams=1,
        max_new_tokens=1,
        use_cache=True,
        output_scores=True,
        return_dict_in_generate=True,
        output_attentions=True,
    )


class WordTokenizer:
    """Stands in for Vicuna's tokenizer where the official scoring decodes ids (utils/metrics.py:50):
    the word-level vocabulary of ``tiny_llava15.word``."""

    def decode(self, ids, **kwargs):
        return tiny.words([ids] if isinstance(ids, int) else list(ids))


def score_record(scores: torch.Tensor, metrics) -> dict:
    """The official scoring of one first-step score row (model_generate.py:562-581): ``calibrate_label_dict``
    (the softmax's top 10, decoded, lower-cased and stripped, each word's most probable id kept) and
    ``get_prob_from_logits`` (p_y = [P(yes), P(no)], 0 for a word not in the top 10), and the answer the
    evaluation reads from them (eval_pope_seeds.py:62-63; MME/convert_and_eval.py:74 the same from ``naive``).
    ``logprob`` (the harness's, not official): the whole distribution's log-probability of each answer word's id."""
    naive, logits_raw = metrics.calibrate_label_dict(scores, WordTokenizer(), return_logits=True)
    p_y = metrics.get_prob_from_logits(naive)
    logp = torch.log_softmax(scores[0].double(), dim=-1)
    return {
        "naive": naive,
        "logits_raw": logits_raw,
        "p_y": p_y,
        "answer": "yes" if p_y[0] > p_y[1] else "no",
        "top10": torch.softmax(scores, dim=-1)[0].topk(10).indices.tolist(),
        "logprob": {str(i): float(logp[i]) for i in tiny.ANSWER_WORDS},
    }


def first_token_scores(model, input_ids, images, magnified_pixels, raw_first_row, metrics) -> dict:
    """The QA path's scores: the first generate on the original image (``original_p_y``, model_generate.py:
    301-314), the generate on the magnified image (model_generate.py:557-566, 581) and their contrast
    ``scores + cd * (scores - original_scores)`` at cd = RESAMPLE_CD (model_generate.py:572-579)."""
    with torch.inference_mode():
        original = model.generate(input_ids=input_ids, images=images, **qa_kwargs())["scores"][0]
        scores = model.generate(input_ids=input_ids, images=magnified_pixels, **qa_kwargs())["scores"][0]
    assert torch.equal(scores.float(), raw_first_row), "scores[0] are not the raw first-step logits"
    contrast = scores + RESAMPLE_CD * (scores - original)
    return {
        "original": score_record(original, metrics),
        "magnified": score_record(scores, metrics),
        "resample_cd": {"cd": RESAMPLE_CD, **score_record(contrast, metrics)},
    }


def run_case(
    model, image_processor, pm_sample, trace, image, prompt, settings, out_dir, name, arrays, every: bool
) -> dict:
    from experiments.utils.helper_functions import process_images_return_pad
    from llava.mm_utils import process_images

    image_tensor, image_pad_pil, pad_mask = process_images_return_pad(
        [image], image_processor, model.config
    )  # model_generate.py:91
    pad_mask = np.array(pad_mask, dtype=int)
    before, after = prompt
    input_ids = torch.tensor([[1, *before, tiny.IMAGE_TOKEN_INDEX, *after]])
    vis_start = len(before) + 1  # model_generate.py:260
    case = {"prompt": {"before": before, "after": after}, "vis_start": vis_start, "pad_size": list(image_pad_pil.size)}
    resized = official_pixels_u8(image_pad_pil, image_processor, image_tensor)
    Image.fromarray(resized, "RGB").save(out_dir / f"{name}_view336.png")
    case["pixels_sha256"] = tiny.tensor_sha256(image_tensor.float())
    case["pixels_sum"] = float(image_tensor.double().sum())
    images = image_tensor.to(dtype=torch.float32)

    # once: step 0 of the per-token path, standing in for the QA path's map (see the module docstring)
    rec = LogitsRecorder()
    ra = resample_args(settings, image_pad_pil, pad_mask, image_processor, vis_start)
    with torch.inference_mode(), accept_resample_args():
        model.generate(input_ids=input_ids, images=images, resample_args=ra, **gen_kwargs(1, rec))
    (step,) = trace.steps()
    case["once"] = step_arrays(f"{name}/once/", step, arrays, vis_start)
    case["once"]["first_logits_magnified"] = logits_record(rec.rows)
    mag = Image.fromarray(step["sampled_float"].astype(np.uint8), "RGB")
    mag.save(out_dir / f"{name}_once_magnified.png")
    # model_generate.py:557-561: the answer on the magnified image
    rec = LogitsRecorder()
    with torch.inference_mode():
        pix = process_images([mag], image_processor, model.config).to(dtype=torch.float32)
        gen = model.generate(input_ids=input_ids, images=pix, **gen_kwargs(NEW_TOKENS, rec))
    trace.steps()  # the plain generate calls process_images only above (discard)
    case["once"]["new_ids"] = gen["sequences"][0, input_ids.shape[1] :].tolist()
    case["once"]["answer_logits"] = logits_record(rec.rows)
    from utils import metrics  # as model_generate.py:24 imports it

    case["first_token"] = first_token_scores(model, input_ids, images, pix, rec.rows[0], metrics)
    case["first_token"]["magnified_sha256"] = hashlib.sha256(np.asarray(mag).tobytes()).hexdigest()
    case["first_token"]["passes"] = case["once"]["passes"]
    # the unmagnified first-step logits (model_generate.py:305-313; resample_cd's original_scores)
    rec = LogitsRecorder()
    with torch.inference_mode():
        model.generate(input_ids=input_ids, images=images, **gen_kwargs(1, rec))
    case["original_logits"] = logits_record(rec.rows)

    if not every:
        return case
    # every_token: pm_sample.py:136-264 at every step
    rec = LogitsRecorder()
    ra = resample_args(settings, image_pad_pil, pad_mask, image_processor, vis_start)
    with torch.inference_mode(), accept_resample_args():
        gen = model.generate(input_ids=input_ids, images=images, resample_args=ra, **gen_kwargs(NEW_TOKENS, rec))
    steps = trace.steps()
    case["every_token"] = {
        "new_ids": gen["sequences"][0, input_ids.shape[1] :].tolist(),
        "logits": logits_record(rec.rows),
        "steps": [step_arrays(f"{name}/every/{i}/", s, arrays, vis_start) for i, s in enumerate(steps)],
    }
    return case


def pure_functions(pm_sample, arrays) -> dict:
    """attention_resampler.py / API_LLaVA/main.py on synthetic maps."""
    from experiments.API.API_LLaVA.main import invtrans, revise_mask, toImg
    from experiments.utils import attention_resampler as ar

    rng = np.random.default_rng(0)
    maps = {
        "flat": np.full((24, 24), 0.01, dtype=np.float32),
        "zeros": np.zeros((24, 24), dtype=np.float32),
        "onehot": np.eye(1, 576, 300, dtype=np.float32).reshape(24, 24),
        "random32": rng.random((24, 24)).astype(np.float32),
        "random64": rng.random((24, 24)),
        "skewed": (rng.exponential(size=(24, 24)) ** 3).astype(np.float32),  # needs many 2-means steps
        "twolevel": np.where(rng.random((24, 24)) < 0.2, 0.9, 0.1).astype(np.float32),
    }
    out = {"highlight": {}, "enhance": {}, "sampling": {}, "inverse_sampling": {}}
    for k, m in maps.items():
        arrays[f"pure/map/{k}"] = m
        out["highlight"][k] = np.flatnonzero(ar.get_highlight_mask(m)).tolist()
    for k in ("flat", "onehot", "random32", "skewed"):
        for kernel, coe in ((3, 10), (5, 15)):
            enh = revise_mask(torch.Tensor(maps[k]), kernel_size=kernel, enhance_coe=coe)
            img = toImg(enh.detach().cpu().reshape(1, 24, 24))
            up = invtrans(img, Image.new("RGB", (160, 160)), method=Image.BICUBIC)
            arrays[f"pure/enhanced/{k}_{kernel}_{coe}"] = enh.detach().numpy()
            arrays[f"pure/grid_uint8/{k}_{kernel}_{coe}"] = np.asarray(img)
            arrays[f"pure/upsampled/{k}_{kernel}_{coe}"] = np.asarray(up)
            out["enhance"][f"{k}_{kernel}_{coe}"] = True
    image = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    arrays["pure/image"] = image
    heat = {
        "flat_uint8": np.full((48, 64), 128, dtype=np.uint8),
        "onehot_uint8": (np.eye(1, 48 * 64, 1000).reshape(48, 64) * 255).astype(np.uint8),
        "random_uint8": rng.integers(0, 256, size=(48, 64), dtype=np.uint8),
        "random_float": rng.random((48, 64)),
        "band_uint8": np.pad(np.full((48, 10), 255, np.uint8), ((0, 0), (20, 34)), constant_values=3),
    }
    for k, h in heat.items():
        arrays[f"pure/heat/{k}"] = h
        for size in ((48, 64), (30, 40)):
            s = ar.attention_sampling(image, h, size, method="bilinear")
            arrays[f"pure/sampled/{k}_{size[0]}x{size[1]}"] = s.astype(np.uint8)
            out["sampling"][f"{k}_{size[0]}x{size[1]}"] = bool(np.all(s == np.round(s)))
    for k, h in heat.items():
        cdf = ar.cumulative_distribution(h.max(axis=0))
        arrays[f"pure/inverse/{k}"] = ar.inverse_sampling(cdf, 64)
        out["inverse_sampling"][k] = True
    return out


def write_first_token(out: Path, cases: dict, common: dict) -> None:
    """first_token.json: per case its inputs and the official first-token scores, with their own provenance
    (the file can be regenerated alone, ``--first-token``, on the current tiny model)."""
    record = {
        name: {
            "image": c["image"],
            "settings": c["settings"],
            "prompt": c["prompt"],
            "pixels_sha256": c["pixels_sha256"],
            **c["first_token"],
        }
        for name, c in cases.items()
    }
    provenance = {
        **common,
        "files": [
            "experiments/eval/model_generate.py",
            "experiments/utils/metrics.py",
            "experiments/utils/pm_sample.py",
        ],
        "harness": "/work/venvs/official/bin/python bench/parity/pm_official.py --official /work/official/PM "
        "--model MODEL_DIR --out tests/fixtures/official/pm [--first-token]",
        "decoding": "model_generate.py:263-276 with the scripts' values: do_sample=True, temperature=1.0, top_k=None, "
        "top_p=None (no warper: scores[0] = raw logits, checked against the logits processor's row), max_new_tokens=1",
        "scoring": "utils/metrics.py calibrate_label_dict(scores, tokenizer, return_logits=True) (top_k=10) and "
        "get_prob_from_logits, unmodified; answer = 'yes' if p_y[0] > p_y[1] else 'no' (eval_pope_seeds.py:62-63)",
        "tokenizer": "WordTokenizer: ids decode to tiny_llava15.word (no Vicuna tokenizer here); answer words "
        + json.dumps(tiny.ANSWER_WORDS),
        "map": "the magnified image of step 0 of pm_sample.sample (as pm_official.json's once path)",
    }
    (out / "first_token.json").write_text(
        json.dumps({"cases": record, "settings": SETTINGS, "provenance": provenance}, indent=1)
    )


def pip_freeze() -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True)
    return out.stdout.split()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", required=True, type=Path, help="checkout of ShunqiM/PM")
    ap.add_argument("--model", required=True, type=Path, help="tiny_llava15.build() output directory")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true", help="one image, one prompt, pope settings")
    ap.add_argument(
        "--first-token",
        action="store_true",
        help="write only first_token.json (the QA path's first-token scoring, once per case; no every_token runs), "
        "leaving the other fixture files as they are",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    import transformers

    transformers.logging.set_verbosity_error()  # the CLIP prefix warning (ensure_clip_weights loads strictly)
    args.out.mkdir(parents=True, exist_ok=True)
    # --first-token: the other fixtures' images go to a scratch directory
    pngs = Path(tempfile.mkdtemp()) if args.first_token else args.out
    model, image_processor, pm_sample = load_official(args.official, args.model)
    trace = Trace(pm_sample)
    images = fixed_images()
    for k, im in images.items():
        im.save(pngs / f"image_{k}.png")
    arrays, cases = {}, {}
    plan = [
        ("wide", 0, "pope", True),
        ("square", 1, "mme", True),
        ("tall", 0, "mme", False),
        ("wide", 1, "pope", False),
        ("square", 0, "pope_iter1", False),
        ("wide", 0, "pope_exit", False),
    ]
    arrays["pixel_lut"] = pixel_lut(image_processor).numpy()
    for img, p, setting, every in plan[:1] if args.quick else plan:
        name = f"{img}_p{p}_{setting}"
        cases[name] = {
            "image": img,
            "prompt_index": p,
            "settings": setting,
            **run_case(
                model,
                image_processor,
                pm_sample,
                trace,
                images[img],
                PROMPTS[p],
                SETTINGS[setting],
                pngs,
                name,
                arrays,
                every and not args.first_token,
            ),
        }
        c = cases[name]
        print(
            name,
            "once passes",
            c["once"]["passes"],
            "ids",
            c["once"]["new_ids"],
            "every",
            c.get("every_token", {}).get("new_ids"),
            [s["passes"] for s in c.get("every_token", {}).get("steps", [])],
            "first token p_y",
            c["first_token"]["magnified"]["p_y"],
            flush=True,
        )
    info = json.loads((args.model / "model_info.json").read_text())
    commit = os.environ.get("PM_COMMIT") or next(
        (
            c
            for c in (
                subprocess.run(
                    ["git", "-C", str(d), "rev-parse", "HEAD"], capture_output=True, text=True
                ).stdout.strip()
                for d in (args.official, Path("/work/.mirror/ShunqiM+PM/repo"))
            )
            if c.startswith(OFFICIAL_COMMIT)
        ),
        "",
    )
    shim_src = (HERE / "cpu_shim.py").read_text()
    common = {
        "repository": "https://github.com/ShunqiM/PM",
        "commit": commit or OFFICIAL_COMMIT,
        "model": {"builder": "bench/parity/tiny_llava15.py", **info},
        "shim": {
            "cpu_shim_sha256": hashlib.sha256(shim_src.encode()).hexdigest(),
            "stubs": STUBS,
            "stubs_sha256": hashlib.sha256(STUBS.encode()).hexdigest(),
        },
        "harness_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "official_stack": {"python": sys.version.split()[0], "pip_freeze": pip_freeze()},
    }
    write_first_token(args.out, cases, common)
    if args.first_token:
        print("wrote", args.out / "first_token.json", flush=True)
        return
    pure = pure_functions(pm_sample, arrays)
    np.savez_compressed(args.out / "arrays.npz", **arrays)
    (args.out / "pm_official.json").write_text(
        json.dumps(
            {"cases": cases, "pure": pure, "settings": SETTINGS, "new_tokens": NEW_TOKENS}, separators=(",", ":")
        )
    )
    provenance = {
        "repository": common["repository"],
        "commit": common["commit"],
        "files": [
            "experiments/utils/pm_sample.py",
            "experiments/utils/attention_resampler.py",
            "experiments/eval/model_generate.py",
            "experiments/API/API_LLaVA/main.py",
            "experiments/utils/helper_functions.py",
            "experiments/llava/",
        ],
        "harness": "/work/venvs/official/bin/python bench/parity/pm_official.py --official /work/official/PM --model MODEL_DIR --out tests/fixtures/official/pm",
        "model": common["model"],
        "shim": common["shim"],
        "harness_sha256": common["harness_sha256"],
        "decoding": "do_sample=True, temperature=1.0 (model_generate.py:698) with top_k=1 (deterministic)",
        "changes_to_official_behaviour": [
            "accept_resample_args: transformers' _validate_model_kwargs skipped for the generate calls that pass "
            "resample_args (the per-token path cannot start otherwise under transformers 4.37.2: an official bug)",
            "cpu_shim: cuda -> cpu, half() keeps float32; stubs: cv2, matplotlib, experiments.API.DatasetManager (never called)",
        ],
        "once_path": "model_generate.py:319-418's map = step 0 of pm_sample.sample (same calls), then model_generate.py:557-561",
        "official_stack": common["official_stack"],
    }
    (args.out / "provenance.json").write_text(json.dumps(provenance, indent=1))
    print("wrote", args.out, flush=True)


if __name__ == "__main__":
    main()
