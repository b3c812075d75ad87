"""The ShapeWorld teacher: a small vision "foundation model" of ShapeWorld for VIRAL.

VIRAL aligns the LLM's image tokens with a strong vision model's patch features (DINOv2
for real LLaVA). ShapeWorld has no DINOv2, so we train one for this world: a small ViT
(transformers ``Dinov2Model``, so it loads by path like any backbone) trained on dense
per-patch labels of ShapeWorld *train* scenes: for every patch, the shape, colour and size
class of the object covering most of it (or background). It sees the scene at 128 px
(twice the tiny LLaVA's 64 px), so its features carry what the tiny model's own encoder
may not resolve: small objects' shapes.

    lmms-plugins viral-teacher --output-dir lmms_eval_plugins/checkpoints/shapeworld-teacher

writes a transformers checkpoint (config.json + model.safetensors), a
preprocessor_config.json (the teacher's normalisation and input size), the label heads
(heads.safetensors) and teacher_info.json (settings, held-out per-patch accuracy).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from methods import viral_teachers

from .shapeworld import scenes as sw

TEACHER_NAME = "shapeworld-teacher"
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
HEADS = {"shape": len(sw.SHAPES) + 1, "colour": len(sw.COLOUR_NAMES) + 1, "size": len(sw.SIZE_CLASSES) + 1}


def teacher_path() -> Path:
    from .paths import CHECKPOINTS

    return CHECKPOINTS[TEACHER_NAME]


def resolve_teacher(spec: str) -> str:
    """``shapeworld-teacher`` -> the shipped checkpoint directory; anything else unchanged."""
    return str(teacher_path()) if spec == TEACHER_NAME else spec


def patch_labels(scene, grid: int, labels=None, min_cover: float = 0.15) -> np.ndarray:
    """(3, grid, grid) int64: shape, colour, size class (0 = background) of the object
    covering the largest part of each patch, if it covers at least ``min_cover`` of it.
    ``labels``: the scene's rendered label map (rendered here if not given)."""
    if labels is None:
        _, labels = scene.render(with_labels=True)
    lab = np.asarray(labels)
    n = lab.shape[0]
    if n % grid:
        raise ValueError(f"canvas {n} is not a multiple of the teacher grid {grid}")
    cell = n // grid
    blocks = lab.reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3).reshape(grid, grid, cell * cell)
    counts = (
        np.stack([(blocks == k + 1).sum(-1) for k in range(len(scene.objects))], -1)
        if scene.objects
        else np.zeros((grid, grid, 1))
    )
    best = counts.argmax(-1)
    covered = counts.max(-1) >= min_cover * cell * cell
    out = np.zeros((3, grid, grid), dtype=np.int64)
    for k, obj in enumerate(scene.objects):
        sel = covered & (best == k)
        out[0][sel] = sw.SHAPES.index(obj.shape) + 1
        out[1][sel] = sw.COLOUR_NAMES.index(obj.colour) + 1
        out[2][sel] = sw.SIZE_CLASSES.index(obj.size) + 1
    return out


def make_split(n: int, tag: str, image_size: int, grid: int, world: str = "train"):
    xs, ys = [], []
    for i in range(n):
        scene = sw.scene_from_seed(sw.derive_seed("viral-teacher", tag, i), world)
        image, labels = scene.render(with_labels=True)
        xs.append(viral_teachers.teacher_pixels([image], image_size, MEAN, STD)[0])
        ys.append(torch.from_numpy(patch_labels(scene, grid, labels)))
    return torch.stack(xs), torch.stack(ys)


def build_backbone(image_size: int, patch: int, hidden: int, layers: int, heads: int):
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        mlp_ratio=2,
        image_size=image_size,
        patch_size=patch,
        layerscale_value=1.0,
    )
    return Dinov2Model(cfg)


def train_teacher(
    output_dir,
    *,
    scenes: int = 2000,
    steps: int = 1000,
    batch_size: int = 16,
    lr: float = 1e-3,
    image_size: int = 128,
    patch: int = 8,
    hidden: int = 96,
    layers: int = 3,
    heads: int = 4,
    seed: int = 0,
    held_out: int = 200,
    log=print,
) -> dict:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    grid = image_size // patch
    t0 = time.time()
    x, y = make_split(scenes, "train", image_size, grid)
    xv, yv = make_split(held_out, "held-out", image_size, grid)
    log(f"viral-teacher: {scenes} train / {held_out} held-out scenes rendered in {time.time() - t0:.0f}s")
    backbone = build_backbone(image_size, patch, hidden, layers, heads)
    head = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in HEADS.items()})
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    g = torch.Generator().manual_seed(seed)

    def logits(batch):
        tokens = backbone(pixel_values=batch).last_hidden_state[:, 1:]
        return {k: h(tokens) for k, h in head.items()}

    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        out = logits(x[idx])
        loss = sum(
            nn.functional.cross_entropy(out[k].reshape(-1, n), y[idx][:, i].reshape(-1))
            for i, (k, n) in enumerate(HEADS.items())
        )
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps:
            log(f"viral-teacher: step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    acc = evaluate(backbone, head, xv, yv)
    log(f"viral-teacher: held-out per-patch accuracy {json.dumps(acc)}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone.save_pretrained(out, safe_serialization=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out / "heads.safetensors"))
    (out / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_mean": list(MEAN),
                "image_std": list(STD),
                "crop_size": {"height": image_size, "width": image_size},
                "size": {"shortest_edge": image_size},
                "do_center_crop": True,
            },
            indent=2,
        )
    )
    info = {
        "what": "ShapeWorld teacher for VIRAL: Dinov2Model trained on dense per-patch shape/colour/size labels",
        "scenes": scenes,
        "held_out": held_out,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "image_size": image_size,
        "patch": patch,
        "hidden": hidden,
        "layers": layers,
        "heads": heads,
        "held_out_accuracy": acc,
        "seconds": round(time.time() - t0),
    }
    (out / "teacher_info.json").write_text(json.dumps(info, indent=2))
    return info


@torch.no_grad()
def evaluate(backbone, head, x, y) -> dict:
    backbone.eval()
    tokens = torch.cat([backbone(pixel_values=x[i : i + 64]).last_hidden_state[:, 1:] for i in range(0, len(x), 64)])
    acc = {}
    for i, k in enumerate(HEADS):
        pred = head[k](tokens).argmax(-1)
        target = y[:, i].reshape(len(x), -1)
        obj = target > 0
        acc[k + "_all"] = round(float((pred == target).float().mean()), 4)
        acc[k + "_object_patches"] = round(float((pred[obj] == target[obj]).float().mean()), 4)
    return acc
