"""The VIRAL parity harness's shared pieces: a tiny random DINOv2 teacher, deterministic draws, a fixed batch.

Used by ``viral_official.py`` (the official stack, transformers 4.37) and by
``tests/test_parity_viral.py`` (ours, transformers 5), so every value here must depend only on a
seed and on names, never on a library's initialiser:

- ``teacher_state(seed)``: a DINOv2 with ViT-B/14's layout (518 px, 14 px patches, a 37x37
  position table, CLS, LayerScale, no registers) and tiny widths, in the hub layout of
  ``facebookresearch/dinov2`` (``blocks.i.attn.qkv``), drawn parameter by parameter in sorted-name
  order; ``save_teacher`` writes it as a transformers ``Dinov2Model`` directory in the key layout of
  the published ``facebook/dinov2-base`` checkpoint (``attention.attention.query``), which both
  transformers 4.37 and 5 load.
- ``draw(key, shape, seed, scale)``: one tensor from a generator seeded by (seed, crc32(key)), for
  the LoRA A matrices (keyed ``"<layer>.<module>"``) and the VRA projector (keyed ``"<i>.weight"``),
  which the harness overwrites after the official code has created them, so that our side can
  rebuild them without storing them. (Their initialisers are not what parity is about.)
- ``batch_ids(seed)``: two samples, the second shorter (right padding), each with one image.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from pathlib import Path

import torch
from tiny_llava15 import normal

TEACHER_SEED = 1
TEACHER = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4, image_size=518, patch_size=14)
PROJECTOR_DIM = 48  # the official default is 2048; tiny so that the fixture stays small
Z_DIM = TEACHER["hidden_size"]
TARGET_LAYER = 16
VRA_WEIGHT = 0.5
LORA = dict(r=128, alpha=256, dropout=0.05)
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def teacher_shapes() -> dict:
    d, n = TEACHER["hidden_size"], TEACHER["image_size"] // TEACHER["patch_size"]
    f = d * TEACHER["mlp_ratio"]
    shapes = {
        "cls_token": (1, 1, d),
        "mask_token": (1, d),
        "pos_embed": (1, 1 + n * n, d),
        "patch_embed.proj.weight": (d, 3, TEACHER["patch_size"], TEACHER["patch_size"]),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    for i in range(TEACHER["num_hidden_layers"]):
        b = f"blocks.{i}."
        shapes.update(
            {
                b + "norm1.weight": (d,),
                b + "norm1.bias": (d,),
                b + "attn.qkv.weight": (3 * d, d),
                b + "attn.qkv.bias": (3 * d,),
                b + "attn.proj.weight": (d, d),
                b + "attn.proj.bias": (d,),
                b + "ls1.gamma": (d,),
                b + "norm2.weight": (d,),
                b + "norm2.bias": (d,),
                b + "mlp.fc1.weight": (f, d),
                b + "mlp.fc1.bias": (f,),
                b + "mlp.fc2.weight": (d, f),
                b + "mlp.fc2.bias": (d,),
                b + "ls2.gamma": (d,),
            }
        )
    return shapes


def teacher_state(seed: int = TEACHER_SEED, draw_normal=None) -> dict:
    """Hub-layout (facebookresearch/dinov2) state dict: norms 1 + 0.1 N, LayerScale 0.5 + 0.1 N,
    position table 0.5 N, other 1-D 0.02 N, matrices N / sqrt(fan_in). N from ``tiny_llava15.normal``
    (the same on every CPU) unless ``draw_normal(shape, gen)`` is given."""
    draw_normal = draw_normal or normal
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(teacher_shapes().items()):
        noise = draw_normal(shape, gen)
        if name.endswith("gamma"):
            value = 0.5 + 0.1 * noise
        elif "norm" in name and name.endswith("weight"):
            value = 1 + 0.1 * noise
        elif name == "pos_embed":
            value = 0.5 * noise
        elif len(shape) == 1 or name in ("cls_token", "mask_token"):
            value = 0.02 * noise
        else:
            value = noise / math.sqrt(math.prod(shape[1:]))
        out[name] = value.contiguous()
    return out


def hf_teacher_state(hub: dict) -> dict:
    """Hub layout -> the key layout of the published facebook/dinov2-base checkpoint."""
    d = TEACHER["hidden_size"]
    out = {
        "embeddings.cls_token": hub["cls_token"],
        "embeddings.mask_token": hub["mask_token"],
        "embeddings.position_embeddings": hub["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": hub["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": hub["patch_embed.proj.bias"],
        "layernorm.weight": hub["norm.weight"],
        "layernorm.bias": hub["norm.bias"],
    }
    for i in range(TEACHER["num_hidden_layers"]):
        b, e = f"blocks.{i}.", f"encoder.layer.{i}."
        for part, (w, bias) in zip(
            ("query", "key", "value"), zip(hub[b + "attn.qkv.weight"].split(d), hub[b + "attn.qkv.bias"].split(d))
        ):
            out[e + f"attention.attention.{part}.weight"] = w.contiguous()
            out[e + f"attention.attention.{part}.bias"] = bias.contiguous()
        out[e + "attention.output.dense.weight"] = hub[b + "attn.proj.weight"]
        out[e + "attention.output.dense.bias"] = hub[b + "attn.proj.bias"]
        out[e + "layer_scale1.lambda1"] = hub[b + "ls1.gamma"]
        out[e + "layer_scale2.lambda1"] = hub[b + "ls2.gamma"]
        for k in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
            out[e + k + ".weight"] = hub[b + k + ".weight"]
            out[e + k + ".bias"] = hub[b + k + ".bias"]
    return out


def teacher_config() -> dict:
    return {
        "architectures": ["Dinov2Model"],
        "model_type": "dinov2",
        "hidden_size": TEACHER["hidden_size"],
        "num_hidden_layers": TEACHER["num_hidden_layers"],
        "num_attention_heads": TEACHER["num_attention_heads"],
        "mlp_ratio": TEACHER["mlp_ratio"],
        "image_size": TEACHER["image_size"],
        "patch_size": TEACHER["patch_size"],
        "num_channels": 3,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "layerscale_value": 1.0,
        "qkv_bias": True,
        "use_swiglu_ffn": False,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    }


def save_teacher(out_dir, seed: int = TEACHER_SEED) -> dict:
    """A transformers Dinov2Model directory (config, safetensors, the dinov2-base preprocessor)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_teacher_state(teacher_state(seed)), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(teacher_config(), indent=2))
    (out / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "BitImageProcessor",
                "do_resize": True,
                "size": {"shortest_edge": 256},
                "do_center_crop": True,
                "crop_size": {"height": 224, "width": 224},
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": [0.485, 0.456, 0.406],
                "image_std": [0.229, 0.224, 0.225],
                "resample": 3,
            },
            indent=2,
        )
    )
    return {"seed": seed, "fingerprint": state_fingerprint(teacher_state(seed)), **TEACHER}


def state_fingerprint(state: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to(torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def compare_legacy(seed: int = TEACHER_SEED) -> dict:
    """The teacher drawn with torch.randn (the first fixtures' draw, CPU-dependent last bits) next to ``normal``'s."""
    old = teacher_state(seed, lambda shape, gen: torch.randn(tuple(shape), generator=gen, dtype=torch.float32))
    new = teacher_state(seed)
    return {
        "legacy": state_fingerprint(old),
        "normal": state_fingerprint(new),
        "max_abs_diff": max((new[k] - old[k]).abs().max().item() for k in new),
    }


def draw(key: str, shape, seed: int = 0, scale: float | None = None) -> torch.Tensor:
    """A tensor that depends only on (seed, key, shape): N(0, 1) * scale (default 1 / sqrt(fan_in))."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    noise = normal(tuple(shape), gen)
    if scale is None:
        scale = 1 / math.sqrt(math.prod(shape[1:])) if len(shape) > 1 else 0.02
    return noise * scale


def lora_key(module_name: str) -> str | None:
    """'...layers.15.self_attn.q_proj...' -> '15.q_proj' (same in both layouts)."""
    parts = module_name.split(".")
    if "layers" not in parts:
        return None
    i = parts.index("layers")
    leaf = [p for p in parts[i + 1 :] if p in LORA_MODULES]
    return f"{parts[i + 1]}.{leaf[0]}" if leaf else None


def set_lora_a(model, seed: int = 0) -> int:
    """Overwrite every language-model LoRA A with ``draw(layer.module)``; returns how many."""
    n = 0
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not hasattr(mod, "lora_A") or "vision" in name:
                continue
            key = lora_key(name)
            if key is None:
                continue
            for lin in mod.lora_A.values():
                lin.weight.copy_(draw("lora_A." + key, lin.weight.shape, seed))
                n += 1
    return n


def projector_state(d_model: int, seed: int = 0) -> dict:
    """The VRA projector d -> PROJECTOR_DIM -> PROJECTOR_DIM -> Z_DIM, keys '0|2|4.weight|bias'."""
    dims = [(PROJECTOR_DIM, d_model), (PROJECTOR_DIM, PROJECTOR_DIM), (Z_DIM, PROJECTOR_DIM)]
    out = {}
    for i, shape in zip((0, 2, 4), dims):
        out[f"{i}.weight"] = draw(f"proj.{i}.weight", shape, seed)
        out[f"{i}.bias"] = draw(f"proj.{i}.bias", shape[:1], seed, scale=0.02)
    return out


def batch_ids(seed: int = 0):
    """Two samples as (before, after, n_answer): BOS + before + <image> + after; the last n_answer
    tokens of ``after`` are the answer (labels), the rest is prompt."""
    gen = torch.Generator().manual_seed(20_000 + seed)
    samples = []
    for n_before, n_after, n_answer in ((10, 8, 5), (5, 4, 3)):
        ids = torch.randint(3, 31000, (n_before + n_after,), generator=gen).tolist()
        samples.append((ids[:n_before], ids[n_before:], n_answer))
    return samples


LOOP_PIXEL_SEED = 7


def loop_samples(n: int, seed: int = 1):
    """``n`` samples for the training-loop fixture, as ``batch_ids``: lengths drawn (prompt 2-9 words
    before the image, 3-9 after it, 1 to all but one of those the answer), ids drawn."""
    gen = torch.Generator().manual_seed(30_000 + seed)
    samples = []
    for _ in range(n):
        n_before = int(torch.randint(2, 10, (1,), generator=gen))
        n_after = int(torch.randint(3, 10, (1,), generator=gen))
        n_answer = int(torch.randint(1, n_after, (1,), generator=gen))
        ids = torch.randint(3, 31000, (n_before + n_after,), generator=gen).tolist()
        samples.append((ids[:n_before], ids[n_before:], n_answer))
    return samples
