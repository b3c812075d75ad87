"""Localization heads: heads files and head discovery.

A heads file is JSON: the model id, its layers x heads, where the heads came from, and the ranked
(layer, head) pairs (0-based) with their selection statistics. ``discover_heads`` makes the ranking:
one prefill per sample, the sample's best heads under ``selection`` (methods/lochead_maps.py for ours,
methods/lochead_official.py for the official rules), heads ranked by how often they are selected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from pathlib import Path
from typing import Iterable, Sequence

import torch

from . import families, hooks
from .lochead import BLOCKS
from .lochead_maps import capture_image_maps, image_attention_sum, image_grid, select_sample_heads
from .lochead_official import official_prompt_ids, rank_heads_official, rank_heads_official_v2, select_heads
from .technique import Request, RequestError

# The heads shipped in heads/llava-1.5-7b-hf.json (0-based layer, head): a third-party fork's hand-set
# list (liu-hanyu-97/LocalizationHeads conf/logic/selection_best.yaml), not the paper's or the official code's.
FORK_HEADS_7B = ((14, 24), (14, 13), (14, 26))

# ---------------------------------------------------------------------------------------
# Heads files
# ---------------------------------------------------------------------------------------


class HeadsFileError(ValueError):
    pass


def model_geometry(model) -> dict:
    tc = model.config.text_config
    return {"num_layers": hooks.num_layers(model, "lm"), "num_heads": int(tc.num_attention_heads)}


def model_id(model) -> str:
    return str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "unknown")


def same_model_id(a: str, b: str) -> bool:
    """Model ids match on their last path component (a hub id and a local copy of it agree)."""
    norm = lambda s: Path(str(s).rstrip("/")).name.lower()  # noqa: E731
    return norm(a) == norm(b)


def write_heads_file(
    path,
    heads: Sequence[dict],
    *,
    model_id: str,
    num_layers: int,
    num_heads: int,
    source: str,
    extra: dict | None = None,
):
    """Write a heads file: JSON with the model id, its geometry, where the heads came from, and the ranked heads."""
    doc = {
        "model_id": model_id,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "source": source,
        **(extra or {}),
        "heads": [
            {
                "layer": int(h["layer"]),
                "head": int(h["head"]),
                **{k: v for k, v in h.items() if k not in ("layer", "head")},
            }
            for h in heads
        ],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)  # atomic: concurrent discoveries (one per accelerate rank) never leave a half file
    return doc


def read_heads_file(path) -> dict:
    """Parse and structurally check a heads file (no model needed)."""
    path = Path(path)
    if not path.is_file():
        raise HeadsFileError(f"heads file {path} does not exist; run `lmms-plugins discover-heads` or use heads=auto")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HeadsFileError(
            f"heads file {path} is not valid JSON ({e}); regenerate it with `lmms-plugins discover-heads`"
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("heads"), list) or not doc["heads"]:
        raise HeadsFileError(
            f"heads file {path} has no 'heads' list; expected {{'model_id': ..., 'heads': [{{'layer': L, 'head': H}}, ...]}}"
        )
    for i, h in enumerate(doc["heads"]):
        ok = isinstance(h, dict) and all(
            isinstance(h.get(k), int) and not isinstance(h.get(k), bool) for k in ("layer", "head")
        )
        if not ok:
            raise HeadsFileError(f"heads file {path}: entry {i} ({h!r}) needs integer 'layer' and 'head' (0-based)")
    if "model_id" not in doc:
        raise HeadsFileError(f"heads file {path} has no 'model_id'")
    return doc


def load_heads(path, model, *, check_model_id: bool = True) -> list[tuple[int, int]]:
    """The ranked (layer, head) list of a heads file, validated against ``model``."""
    doc = read_heads_file(path)
    geo = model_geometry(model)
    mid = model_id(model)
    if check_model_id and not same_model_id(doc["model_id"], mid):
        raise HeadsFileError(
            f"heads file {path} was made for model {doc['model_id']!r}, but the loaded model is {mid!r}. Heads do not "
            "transfer between models: discover them for this model (`lmms-plugins discover-heads` or heads=auto), or, "
            "if this is the same checkpoint under another name, pass check_model_id=false"
        )
    for key in ("num_layers", "num_heads"):
        if key in doc and not isinstance(doc[key], int):
            raise HeadsFileError(f"heads file {path}: {key} must be an integer, not {doc[key]!r}")
        if key in doc and doc[key] != geo[key]:
            raise HeadsFileError(
                f"heads file {path} is for a model with {key}={doc[key]}, but the loaded model has {geo[key]}"
            )
    for h in doc["heads"]:
        if not (0 <= h["layer"] < geo["num_layers"] and 0 <= h["head"] < geo["num_heads"]):
            raise HeadsFileError(
                f"heads file {path} names layer {h['layer']} head {h['head']} (0-based), outside this model's "
                f"{geo['num_layers']} layers x {geo['num_heads']} heads: it was made for another model"
            )
    return [(h["layer"], h["head"]) for h in doc["heads"]]


def random_heads(num_layers: int, num_heads: int, k: int, seed: int) -> list[tuple[int, int]]:
    """k distinct (layer, head) pairs drawn uniformly with ``seed`` (the random-head baseline)."""
    rng = random.Random(seed)
    pairs = [(l, h) for l in range(num_layers) for h in range(num_heads)]
    return rng.sample(pairs, min(k, len(pairs)))


# ---------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------


def _finite_or_none(x: float):
    return x if math.isfinite(x) else None


@dataclasses.dataclass
class DiscoveryResult:
    """Selection counts over samples; ``ranked()`` gives the heads file entries."""

    num_layers: int
    num_heads: int
    n_samples: int = 0
    counts: dict = dataclasses.field(default_factory=dict)  # (l, h) -> times selected
    entropy_sum: dict = dataclasses.field(default_factory=dict)  # (l, h) -> sum of entropy when selected
    s_img_sum: torch.Tensor | None = None  # (layers, heads) summed over samples
    knee_sizes: list = dataclasses.field(default_factory=list)

    def add(self, selected, s_img, entropy, n_candidates):
        self.n_samples += 1
        self.s_img_sum = s_img.clone() if self.s_img_sum is None else self.s_img_sum + s_img
        self.knee_sizes.append(n_candidates)
        for lh in selected:
            self.counts[lh] = self.counts.get(lh, 0) + 1
            self.entropy_sum[lh] = self.entropy_sum.get(lh, 0.0) + entropy[lh]

    def state(self) -> dict:
        """JSON-able state (partial results of a long discovery; ``from_state`` resumes it)."""
        key = lambda lh: f"{lh[0]},{lh[1]}"  # noqa: E731
        return {
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "n_samples": self.n_samples,
            "counts": {key(k): v for k, v in self.counts.items()},
            "entropy_sum": {key(k): v for k, v in self.entropy_sum.items()},
            "s_img_sum": None if self.s_img_sum is None else self.s_img_sum.tolist(),
            "knee_sizes": self.knee_sizes,
        }

    @classmethod
    def from_state(cls, doc: dict) -> "DiscoveryResult":
        lh = lambda k: tuple(int(v) for v in k.split(","))  # noqa: E731
        s_img = doc.get("s_img_sum")
        return cls(
            doc["num_layers"],
            doc["num_heads"],
            doc["n_samples"],
            {lh(k): v for k, v in doc["counts"].items()},
            {lh(k): v for k, v in doc["entropy_sum"].items()},
            None if s_img is None else torch.tensor(s_img),
            list(doc["knee_sizes"]),
        )

    def ranked(self) -> list[dict]:
        order = sorted(self.counts, key=lambda lh: (-self.counts[lh], self.entropy_sum[lh] / self.counts[lh], lh))
        mean_s = self.s_img_sum / max(self.n_samples, 1)
        return [
            {
                "layer": l,
                "head": h,
                "frequency": round(self.counts[(l, h)] / self.n_samples, 4),
                "count": self.counts[(l, h)],
                "mean_entropy": _finite_or_none(
                    round(self.entropy_sum[(l, h)] / self.counts[(l, h)], 4)
                ),  # None: 9ffe219's fallback heads have no entropy
                "mean_s_img": round(float(mean_s[l, h]), 4),
            }
            for l, h in order
        ]

    def table(self, top: int = 20) -> str:
        rows = ["rank  layer  head  frequency  mean_entropy  mean_S_img"]
        for i, r in enumerate(self.ranked()[:top], 1):
            rows.append(
                f"{i:>4}  {r['layer']:>5}  {r['head']:>4}  {r['frequency']:>9.3f}  {r['mean_entropy'] if r['mean_entropy'] is not None else math.inf:>12.3f}  {r['mean_s_img']:>10.3f}"
            )
        return "\n".join(rows)


def prompt_inputs(processor, image, text: str, prompt: str = "task", family: str = "llava") -> dict:
    """Processor inputs for one image + text: the processor's chat template (as lmms-eval's chat llava_hf
    builds them; Qwen2.5-VL: with lmms-eval qwen2_5_vl's system message first, the image resized by the
    processor at its min/max pixels), or (prompt="official") the official referseg prompt (official_prompt_ids)."""
    token = getattr(processor, "image_token", "<image>")
    text = text.replace(token, "").replace("<image>", "").strip()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    system = families.adapter(family).system_prompt
    if system is not None:  # as the family's lmms-eval class puts it first
        msgs.insert(0, {"role": "system", "content": system})
    chat = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=chat, return_tensors="pt")
    if prompt == "official":
        image_token_id = processor.tokenizer.convert_tokens_to_ids(token)
        n_image = int((inputs["input_ids"] == image_token_id).sum())
        ids = torch.tensor([official_prompt_ids(processor.tokenizer, text, image_token_id, n_image)])
        inputs["input_ids"], inputs["attention_mask"] = ids, torch.ones_like(ids)
    return inputs


def sample_grid(model, processor, image, inputs: dict, block: str = "base") -> tuple[torch.Tensor, tuple[int, int]]:
    """(positions, (rows, cols)) of the grid one discovery sample's maps are read over: LLaVA-1.5's square
    grid (``image_grid``), else the ``block`` of the family's geometry (methods/geometry.py), built from the
    same Request evaluation builds, so discovery and ``LocHead.locate`` read the same cells."""
    input_ids = inputs["input_ids"]
    if families.adapter(getattr(model.config, "model_type", "llava")).square_grid:
        pos = hooks.image_positions(input_ids, model.config.image_token_id)
        return pos, image_grid(model, pos.numel())
    req = Request(
        input_ids=input_ids,
        image_token_id=model.config.image_token_id,
        prompt_len=input_ids.shape[1],
        images=[image],
        processor=processor,
        config=model.config,
        inputs={k: inputs[k] for k in families.adapter(model.config).request_inputs if inputs.get(k) is not None},
    )
    b = next((b for b in req.geometry.blocks if b.name == block), None)  # InternVL: one tile, no highres block
    if b is None or b.rows * b.cols == 0:
        raise RequestError(f"the {block} block of this {image.size} image is empty; use block=base")
    return b.positions.to(input_ids.device), b.grid_hw


def discover_heads(
    model,
    processor,
    samples: Iterable[tuple],
    *,
    per_sample: int = 10,
    connectivity: int = 8,
    selection: str = "ours",
    prompt: str = "task",
    progress=None,
    on_sample=None,
    result: "DiscoveryResult | None" = None,
    block: str = "base",
    precision: str = "fp32",
) -> DiscoveryResult:
    """Run the selection over ``samples`` ((PIL image, prompt text) pairs), one prefill each.

    ``selection``: ours | official (HEAD) | official_v2 (9ffe219); ``prompt``: task | official.
    ``result``: a partial result to continue (its first ``n_samples`` samples are skipped).
    ``block``: LLaVA-NeXT/OneVision and InternVL, the geometry block the maps are read from (base | highres,
    as lochead's ``block``); the other families have one block (Qwen: the rows x cols merged grid).
    ``precision``: fp32 | official (the official selections' maps, sums and entropies in fp16, as the
    official fp16 runs; lochead_official.rank_heads_official).
    """
    family = getattr(model.config, "model_type", "llava")
    if prompt != "task" and not families.adapter(family).square_grid:
        raise RequestError(f"discovery with prompt={prompt} is LLaVA-1.5 only; use prompt=task on {family}")
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, not {block!r}")
    geo = model_geometry(model)
    result = result or DiscoveryResult(**geo)
    device = next(model.parameters()).device
    for i, (image, text) in enumerate(samples):
        if i < result.n_samples:
            continue
        inputs = prompt_inputs(processor, image, text, prompt, family).to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        pos, grid = sample_grid(model, processor, image, inputs, block)
        maps = capture_image_maps(model, inputs, pos)
        s_img = image_attention_sum(maps)
        if selection == "ours":
            selected, s_img, candidates, entropy = select_sample_heads(maps, grid, per_sample, connectivity)
        else:
            fp16 = precision == "official"
            ranked = (
                rank_heads_official(maps, grid, fp16)
                if selection == "official"
                else rank_heads_official_v2(maps, grid, fp16=fp16)
            )
            entropy = {(r["layer"], r["head"]): r["spatial_entropy"] for r in ranked}
            candidates = [lh for lh, e in entropy.items() if math.isfinite(e)]
            selected = select_heads(maps, grid, selection, per_sample, connectivity, fp16)
        result.add(selected, s_img, entropy, len(candidates))
        if on_sample is not None:
            on_sample(result.n_samples - 1, image, maps, s_img, candidates, selected, grid)
        if progress is not None:
            progress.update(1)
    return result
