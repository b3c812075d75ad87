"""Fine-tuning a LLaVA or Qwen2.5-VL checkpoint with VIRAL's alignment loss, on peft LoRA and accelerate.

Families (methods/viral.py ``FAMILIES``): LLaVA-1.5, LLaVA-NeXT / OneVision (the base block is
aligned) and Qwen2.5-VL (the merged tokens, rows x cols). Batches are the checkpoint's own
processor's output (``image_sizes``, ``image_grid_thw``, ``mm_token_type_ids`` kept); on the
families other than LLaVA-1.5 the teacher is a backbone directory seeing the original image
(``teacher_input="image"``).

``train(TrainConfig(...))`` is what ``lmms-plugins viral-train`` runs. It loads the base
checkpoint, puts LoRA adapters on the language model's linear layers (the multimodal
projector optionally trained fully, as in LLaVA's LoRA recipe; the vision tower frozen),
adds the VRA projector, and optimises L = L_LM + weight * L_VRA (methods/viral.py) with
AdamW, linear warm-up and cosine decay. ``accelerate launch`` scales it over devices and
processes unchanged.

Output directory:
  adapter/                      peft LoRA adapter (adapter_model.safetensors + adapter_config.json)
  vra_projector.safetensors     the projector P (only needed to continue training/analysis)
  viral_config.json             every setting, the teacher, the base checkpoint
  log.jsonl                     step, lm_loss, vra_loss, loss, lr, seconds per step
  checkpoints/step-NNNNNN/      the same + optimizer.safetensors + trainer_state.json,
                                resumed with ``resume=True`` (latest) or a path
Nothing is pickled: tensors go to safetensors, everything else to JSON.

Data: LLaVA's instruction format, a JSON list or JSONL of
  {"image": "relative/path.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                   {"from": "gpt", "value": "..."}, ...]}
with ``image_folder`` as the root of the image paths. The loss is on the assistant turns only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from . import viral

LM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclasses.dataclass
class TrainConfig:
    pretrained: str
    data: str
    output_dir: str
    image_folder: str = ""
    teacher: str = "self"  # a vision backbone directory, "self" (the model's own vision tower) or "none"
    teacher_image_size: int | None = None
    teacher_input: str = "image"  # "image": re-process the original image; "pixels": convert the LLaVA pixels;
    # "official": the LLaVA pixels as they are into DINOv2 with its position table resampled (viral.OfficialTeacher)
    preset: str | None = None  # "official": PRESETS["official"] fills every field the caller did not set
    explicit: tuple = ()  # fields the caller set (the CLI's given flags); without it, "not set" means "at its default"
    layer: Any = viral.DEFAULTS["layer"]  # one layer or a list (1-based over hidden_states)
    weight: float = viral.DEFAULTS["weight"]
    loss: str = "direct"  # "direct" (cosine) or "similarity" (Gram-matrix MSE)
    use_projector: bool = True  # False: "similarity" on the hidden states themselves
    multiple_projectors: bool = False  # one projector per target layer (default: one shared)
    train_vra_projector: bool = True
    projector_init: str = "torch"  # "official": N(0, 0.02) weights, zero biases
    teacher_reinit: bool = False  # official bug reproduction: the teacher's Linear layers re-drawn N(0, 0.02)
    proj_hidden: int = viral.DEFAULTS["proj_hidden"]
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    train_mm_projector: bool = True
    lr: float = 2e-4
    proj_lr: float | None = None  # default: lr
    mm_projector_lr: float | None = None  # the multimodal projector's learning rate (default: lr)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    schedule: str = "ours"  # "ours": warm-up (step+1)/warmup; "official": transformers' cosine with warm-up
    batch_size: int = 4
    grad_accum: int = 1
    effective_batch: int | None = None  # sets grad_accum = effective_batch / (batch_size * processes)
    pad_to_square: bool = False  # LLaVA-1.5's image_aspect_ratio=pad (expand2square with the mean colour)
    base_llm: str | None = None  # start from a base LLM + vision tower + stage-1 projector instead of `pretrained`
    vision_tower: str | None = None
    mm_projector: str | None = None
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    max_length: int = 2048
    max_grad_norm: float = 1.0
    seed: int = 0
    dtype: str = "float32"  # or "auto": bfloat16 where the device supports it, else float32
    cache_teacher: bool = True  # teacher features computed once per sample (no augmentation here)
    save_every: int = 0  # optimizer steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    log_every: int = 10
    resume: Any = False  # True: latest checkpoint in output_dir; or a checkpoint directory
    limit: int | None = None  # use only the first N records
    progress: bool = True


# The official recipe (cvlab-kaist/VIRAL @ adc0791: scripts/v1_5/finetune_lora.sh, config.json,
# llava_llama.py, train.py, llava_trainer.py) as data; see docs/viral.md's parity table.
PRESETS = {
    "official": {
        "teacher": "facebook/dinov2-base",  # a local directory of it (the official code loads dinov2_vitb14 from torch.hub)
        "teacher_input": "official",
        "layer": 16,
        "weight": 0.5,
        "loss": "direct",
        "proj_hidden": 2048,
        "lora_r": 128,
        "lora_alpha": 256,
        "lora_dropout": 0.05,
        "train_mm_projector": True,
        "lr": 2e-4,
        "mm_projector_lr": 2e-5,
        "weight_decay": 0.0,
        "warmup_ratio": 0.03,
        "schedule": "official",
        "batch_size": 8,
        "effective_batch": 32,  # 8 per device x 2 accumulation x 2 GPUs
        "epochs": 1.0,
        "max_grad_norm": 1.0,
        "max_length": 2048,
        "dtype": "auto",
        "pad_to_square": True,
        # two behaviours of the official code reproduced (docs/viral.md, "official bugs"):
        "train_vra_projector": False,  # peft freezes it (train.py:1107) and nothing re-enables it
        "projector_init": "official",
        "teacher_reinit": True,  # from_pretrained re-initialises the hub DINOv2's Linear layers
    }
}


def apply_preset(cfg: "TrainConfig") -> "TrainConfig":
    """Fill every field the caller did not set (``cfg.explicit``, else: still at its dataclass default)
    with the preset's value."""
    if not cfg.preset:
        return cfg
    if cfg.preset not in PRESETS:
        raise ValueError(f"preset={cfg.preset!r}: use one of {', '.join(PRESETS)}")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}

    def unset(key):
        return key not in cfg.explicit if cfg.explicit else getattr(cfg, key) == defaults[key]

    for key, value in PRESETS[cfg.preset].items():
        if key == "effective_batch" and not unset("grad_accum"):
            continue  # an explicit --grad-accum wins over the preset's effective batch
        if unset(key):
            setattr(cfg, key, value)
    return cfg


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def layers_of(cfg) -> list[int]:
    if isinstance(cfg.layer, (list, tuple)):
        return [int(x) for x in cfg.layer]
    if isinstance(cfg.layer, str):
        return [int(x) for x in cfg.layer.split(",") if x.strip()]
    return [int(cfg.layer)]


def recipe(cfg) -> dict:
    """What this run does, in the terms of the official recipe (printed and saved with the adapter)."""
    out = {
        "preset": cfg.preset,
        "teacher": cfg.teacher,
        "teacher_input": cfg.teacher_input,
        "layers": layers_of(cfg),
        "weight": cfg.weight,
        "loss": cfg.loss,
        "use_projector": cfg.use_projector,
        "multiple_projectors": cfg.multiple_projectors,
        "projector": f"d -> {cfg.proj_hidden} -> {cfg.proj_hidden} -> d_teacher (SiLU), init {cfg.projector_init}, "
        + ("trained" if cfg.train_vra_projector else "frozen"),
        "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout, "lr": cfg.lr},
        "mm_projector": {
            "trained": cfg.train_mm_projector,
            "lr": cfg.mm_projector_lr if cfg.mm_projector_lr is not None else cfg.lr,
        },
        "weight_decay": cfg.weight_decay,
        "warmup_ratio": cfg.warmup_ratio,
        "schedule": cfg.schedule,
        "batch": {"per_device": cfg.batch_size, "grad_accum": cfg.grad_accum, "effective": cfg.effective_batch},
        "dtype": str(resolve_dtype(cfg.dtype)).removeprefix("torch."),
        "pad_to_square": cfg.pad_to_square,
        "start": (
            {"base_llm": cfg.base_llm, "vision_tower": cfg.vision_tower, "mm_projector": cfg.mm_projector}
            if cfg.base_llm
            else {"pretrained": cfg.pretrained}
        ),
    }
    notes = []
    if not cfg.train_vra_projector:
        notes.append(
            "VRA projector frozen at its initialisation (official LoRA recipe: peft freezes it); --train-vra-projector to train it"
        )
    if cfg.teacher_reinit:
        notes.append(
            "teacher Linear layers re-drawn N(0, 0.02) (official: from_pretrained re-initialises the hub DINOv2); "
            "--no-teacher-reinit for the intended DINOv2"
        )
    out["reproduced_official_bugs"] = notes
    return out


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


def read_records(path: str) -> list[dict]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"training data {p} not found (expected LLaVA-format JSON or JSONL)")
    text = p.read_text()
    records = (
        json.loads(text)
        if text.lstrip().startswith("[")
        else [json.loads(line) for line in text.splitlines() if line.strip()]
    )
    for i, r in enumerate(records):
        if "conversations" not in r:
            raise ValueError(f"{p}: record {i} has no 'conversations' (LLaVA format: image + conversations)")
    return records


def _turns(conversations: list[dict]) -> list[tuple[str, str]]:
    turns, user = [], None
    for msg in conversations:
        role = msg.get("from", msg.get("role"))
        value = msg.get("value", msg.get("content", ""))
        if role in ("human", "user"):
            user = value
        elif role in ("gpt", "assistant") and user is not None:
            turns.append((user, value))
            user = None
    return turns


def expand2square(image, background):
    """LLaVA-1.5's pad-to-square (llava/mm_utils.py expand2square): the image centred on a square of
    ``background`` (the processor's mean colour, 0-255)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), background)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


# What a processor returns per image (concatenated over the batch in ``collate``) and per token (padded).
IMAGE_KEYS = ("pixel_values", "image_sizes", "image_grid_thw")
TOKEN_KEYS = ("mm_token_type_ids",)


def encode_conversation(
    processor, image, conversations: list[dict], max_length: int, pad_to_square: bool = False
) -> dict:
    """input_ids, labels (assistant tokens only) and the processor's image inputs for one record
    (``IMAGE_KEYS`` as the processor returns them for one image, ``TOKEN_KEYS`` per token)."""
    image_token = getattr(processor, "image_token", "<image>")
    if pad_to_square and image is not None:
        image = expand2square(image, tuple(int(x * 255) for x in processor.image_processor.image_mean))
    messages = []
    for k, (user, answer) in enumerate(_turns(conversations)):
        text = user.replace(image_token, "").strip()
        content = ([{"type": "image"}] if k == 0 and image is not None else []) + [{"type": "text", "text": text}]
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    if not messages:
        raise ValueError("a record without any (human, gpt) turn")
    images = [image] if image is not None else None

    def ids(text):
        kw = {"images": images} if images else {}
        return processor(text=text, return_tensors="pt", **kw)

    full = ids(processor.apply_chat_template(messages, tokenize=False))
    input_ids = full["input_ids"][0]
    labels = torch.full_like(input_ids, -100)
    for k in range(1, len(messages), 2):  # assistant turn k: tokens between its prompt and its end
        start = ids(processor.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True))[
            "input_ids"
        ].shape[1]
        end = ids(processor.apply_chat_template(messages[: k + 1], tokenize=False))["input_ids"].shape[1]
        labels[start:end] = input_ids[start:end]
    item = {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}
    for key in TOKEN_KEYS:
        if key in full:
            item[key] = full[key][0][:max_length]
    if images:
        item.update({key: full[key] for key in IMAGE_KEYS if key in full})
    return item


class ConversationDataset(torch.utils.data.Dataset):
    """LLaVA-format records, encoded lazily (and remembered) per index."""

    def __init__(
        self,
        records: list[dict],
        processor,
        image_folder: str = "",
        max_length: int = 2048,
        pad_to_square: bool = False,
    ):
        self.records, self.processor, self.folder, self.max_length = (
            records,
            processor,
            Path(image_folder or "."),
            max_length,
        )
        self.pad_to_square = pad_to_square
        self._cache: dict[int, dict] = {}

    def __len__(self):
        return len(self.records)

    def image(self, i: int):
        r = self.records[i]
        if r.get("image") is None:
            return None
        if isinstance(r["image"], Image.Image):
            return r["image"].convert("RGB")
        return Image.open(self.folder / r["image"]).convert("RGB")

    def __getitem__(self, i: int) -> dict:
        if i not in self._cache:
            self._cache[i] = encode_conversation(
                self.processor, self.image(i), self.records[i]["conversations"], self.max_length, self.pad_to_square
            )
        return {**self._cache[i], "index": i}


def collate(items: list[dict], pad_id: int) -> dict:
    n = max(len(it["input_ids"]) for it in items)
    batch = {
        "input_ids": torch.full((len(items), n), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(items), n, dtype=torch.long),
        "labels": torch.full((len(items), n), -100, dtype=torch.long),
        "index": torch.tensor([it["index"] for it in items]),
    }
    for key in TOKEN_KEYS:
        if key in items[0]:
            batch[key] = torch.zeros(len(items), n, dtype=items[0][key].dtype)
    for b, it in enumerate(items):
        m = len(it["input_ids"])
        batch["input_ids"][b, :m] = it["input_ids"]
        batch["attention_mask"][b, :m] = 1
        batch["labels"][b, :m] = it["labels"]
        for key in TOKEN_KEYS:
            if key in batch:
                batch[key][b, :m] = it[key]
    with_image = [it for it in items if "pixel_values" in it]
    if with_image:
        if len(with_image) != len(items):
            raise ValueError(
                "mixing text-only and image samples in one batch is not supported; use batch_size 1 or separate the data"
            )
        for key in IMAGE_KEYS:
            if key in items[0]:
                batch[key] = _concat([it[key] for it in items])
    return batch


def _concat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per-image processor outputs joined along dim 0; anyres crops (B, n_crops, ...) zero-padded to the
    largest count (the model reads each image's own crops from ``image_sizes``)."""
    if tensors[0].ndim == 5 and len({t.shape[1] for t in tensors}) > 1:
        most = max(t.shape[1] for t in tensors)
        tensors = [torch.cat([t, t.new_zeros(t.shape[0], most - t.shape[1], *t.shape[2:])], dim=1) for t in tensors]
    return torch.cat(tensors)


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch: the same order after a resume. (Not named ``set_epoch``:
    accelerate would drive that with its own iteration counter, which restarts at 0 on resume.)"""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def use_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n


# ---------------------------------------------------------------------------------------
# Checkpoints (safetensors + JSON only)
# ---------------------------------------------------------------------------------------


def _save_optimizer(optimizer, path: Path) -> None:
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    save_file(tensors, str(path / "optimizer.safetensors"))
    (path / "optimizer.json").write_text(json.dumps({"param_groups": sd["param_groups"], "scalars": scalars}))


def _load_optimizer(optimizer, path: Path) -> None:
    from safetensors.torch import load_file

    meta = json.loads((path / "optimizer.json").read_text())
    state: dict = {}
    for name, value in list(load_file(str(path / "optimizer.safetensors")).items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_outputs(out: Path, peft_model, projector, settings: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out / "adapter", safe_serialization=True)
    if projector is not None:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in projector.state_dict().items()},
            str(out / "vra_projector.safetensors"),
        )
    (out / "viral_config.json").write_text(json.dumps(settings, indent=2, default=str))


def latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = sorted((output_dir / "checkpoints").glob("step-*"))
    return ckpts[-1] if ckpts else None


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


def official_lr_lambda(total: int, warmup_ratio: float):
    """The official schedule: transformers' ``get_cosine_schedule_with_warmup`` as LLaVATrainer builds it
    (warm-up steps = ceil(ratio * total); factor step / warmup, so the first optimizer step runs at lr 0,
    then 0.5 * (1 + cos(pi * progress)))."""
    warmup = math.ceil(total * warmup_ratio)

    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return f


def param_groups(model, projector, cfg) -> list[dict]:
    """AdamW groups. The official ones (llava/train/llava_trainer.py:160-194, with finetune_lora.sh's
    --learning_rate 2e-4 --mm_projector_lr 2e-5 --weight_decay 0): every trainable parameter outside the
    multimodal projector at ``lr`` (LoRA, and the VRA projector when it is trained), the multimodal
    projector at ``mm_projector_lr``; weight decay only on non-bias, non-norm weights."""
    mm_lr = cfg.mm_projector_lr if cfg.mm_projector_lr is not None else cfg.lr
    mm_name = viral.family(model.config).mm_projector
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_mm = mm_name in name or "mm_projector" in name
        decay = cfg.weight_decay if (p.ndim > 1 and "norm" not in name) else 0.0
        key = ("mm" if is_mm else "main", decay)
        groups.setdefault(key, {"params": [], "lr": mm_lr if is_mm else cfg.lr, "weight_decay": decay, "name": key[0]})[
            "params"
        ].append(p)
    if projector is not None and any(p.requires_grad for p in projector.parameters()):
        groups[("vra", 0)] = {
            "params": [p for p in projector.parameters() if p.requires_grad],
            "lr": cfg.proj_lr or cfg.lr,
            "weight_decay": cfg.weight_decay,
            "name": "vra_projector",
        }
    return list(groups.values())


def init_projector_official(projector, std: float = 0.02) -> None:
    """The VRA projector as the official code leaves it: transformers 4.37's ``_init_weights`` of the
    Llama model (weights N(0, initializer_range=0.02), biases 0), applied by ``from_pretrained`` to every
    module missing from the checkpoint."""
    with torch.no_grad():
        for m in projector.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.zero_()


def lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def wrap_lora(model, cfg):
    """Freeze the model, LoRA on the language model's linear layers (train.py:169-182 targets the same
    q/k/v/o/gate/up/down projections), the multimodal projector trained fully (saved with the adapter;
    Qwen2.5-VL: the vision merger)."""
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=LM_TARGETS,
        modules_to_save=[viral.family(model.config).mm_projector] if cfg.train_mm_projector else None,
    )
    return get_peft_model(model, lora)


def make_projector(cfg, d_model: int, d_teacher: int):
    """The VRA projector(s): one shared by the target layers, or one per layer; None without a projector."""
    if not cfg.use_projector:
        if cfg.loss != "similarity":
            raise ValueError(
                "use_projector=False needs loss='similarity' (the direct loss compares P(h) with the teacher's width)"
            )
        return None
    n = len(layers_of(cfg)) if cfg.multiple_projectors else 1
    torch.manual_seed(cfg.seed)
    projs = [viral.VraProjector(d_model, d_teacher, cfg.proj_hidden) for _ in range(n)]
    for p in projs:
        if cfg.projector_init == "official":
            init_projector_official(p)
        p.requires_grad_(cfg.train_vra_projector)
    return projs[0] if n == 1 else torch.nn.ModuleList(projs)


def load_base(cfg):
    """(model, processor): ``pretrained`` (LLaVA-1.5, LLaVA-NeXT/OneVision or Qwen2.5-VL) or, with
    ``base_llm``, assembled from a base LLM, a vision tower and a stage-1 projector (the official
    starting point: vicuna-7b-v1.5 + the pretrain projector)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    dtype = resolve_dtype(cfg.dtype)
    if cfg.base_llm:
        return assemble_llava(cfg.base_llm, cfg.vision_tower, cfg.mm_projector, dtype=dtype)
    viral.family(AutoConfig.from_pretrained(cfg.pretrained))  # a clear error before loading anything else
    model = AutoModelForImageTextToText.from_pretrained(cfg.pretrained, dtype=dtype)
    return model, AutoProcessor.from_pretrained(cfg.pretrained)


# LLaVA-1.5's conversation template "v1" (llava/conversation.py conv_vicuna_v1: system, " USER: ", " ASSISTANT: ",
# answers closed by </s>), images first in the user turn as "<image>\n".
VICUNA_V1_TEMPLATE = (
    "{{ bos_token }}A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
    "{% for message in messages %}{% if message['role'] == 'user' %} USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% else %} ASSISTANT: {% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)
OFFICIAL_PARTS = {
    "base_llm": "lmsys/vicuna-7b-v1.5",
    "vision_tower": "openai/clip-vit-large-patch14-336",
    "mm_projector": "liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5 (mm_projector.bin)",
}


def assemble_llava(base_llm, vision_tower, mm_projector, dtype=torch.float32, image_token: str = "<image>"):
    """(LlavaForConditionalGeneration, LlavaProcessor) from the official starting point's parts: a causal LM
    directory (Vicuna-7B-v1.5), a CLIP vision directory (ViT-L/14-336) and the stage-1 projector
    (LLaVA's ``mm_projector.bin`` or a safetensors file, keys ``...mm_projector.0|2.weight|bias``).
    Features from the penultimate CLIP layer without CLS, ``mlp2x_gelu`` (LLaVA-1.5's settings); the
    tokenizer gains ``<image>`` if it lacks it; the chat template is LLaVA-1.5's "v1"."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionModel,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    for key, path in (("base_llm", base_llm), ("vision_tower", vision_tower), ("mm_projector", mm_projector)):
        if not path or not Path(path).exists():
            raise FileNotFoundError(
                f"--{key.replace('_', '-')} {path!r} not found: the official starting point needs a local "
                f"copy of {OFFICIAL_PARTS[key]}"
            )
    llm = AutoModelForCausalLM.from_pretrained(base_llm, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(base_llm)
    clip = CLIPVisionModel.from_pretrained(vision_tower, dtype=dtype)
    image_processor = CLIPImageProcessor.from_pretrained(vision_tower)
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([image_token], special_tokens=True)
    if tokenizer.pad_token is None:  # LLaVA's v1 recipe pads with unk
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    vc = clip.config
    config = LlavaConfig(
        vision_config=vc.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(image_token),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(vc.image_size // vc.patch_size) ** 2,
        tie_word_embeddings=llm.config.tie_word_embeddings,
    )
    config.vision_config.model_type, config.text_config.model_type = vc.model_type, llm.config.model_type
    model = LlavaForConditionalGeneration(config).to(dtype)
    model.model.language_model.load_state_dict(llm.model.state_dict())
    model.lm_head.load_state_dict(llm.lm_head.state_dict())
    model.model.vision_tower.load_state_dict(clip.state_dict())
    weights = _load_tensors(mm_projector)
    mapping = {"linear_1": "mm_projector.0.", "linear_2": "mm_projector.2."}
    state = {}
    for ours, theirs in mapping.items():
        for part in ("weight", "bias"):
            hits = [v for k, v in weights.items() if k.endswith(theirs + part)]
            if len(hits) != 1:
                raise ValueError(
                    f"{mm_projector}: expected one '*{theirs}{part}' tensor (LLaVA's stage-1 mm_projector), found {len(hits)}"
                )
            state[f"{ours}.{part}"] = hits[0].to(dtype)
    model.model.multi_modal_projector.load_state_dict(state)
    if len(tokenizer) > model.config.text_config.vocab_size:
        model.resize_token_embeddings(len(tokenizer))
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vc.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=VICUNA_V1_TEMPLATE,
        image_token=image_token,
    )
    return model.eval(), processor


def _load_tensors(path) -> dict:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)  # tensors only: no code is unpickled


def build(cfg: TrainConfig):
    """Model (peft), processor, teacher, projector: everything but the loop."""
    cfg = apply_preset(cfg)
    model, processor = load_base(cfg)
    fam = viral.family(model.config)
    reads_llava = cfg.teacher == "self" or cfg.teacher_input != "image"
    if cfg.weight and not fam.own_encoder and cfg.teacher not in (None, "", "none") and reads_llava:
        raise ValueError(
            f"VIRAL on {model.config.model_type}: teacher={cfg.teacher!r} with teacher_input={cfg.teacher_input!r} is "
            "LLaVA-1.5 only (it reads the LLaVA pixels or the LLaVA vision tower); pass a vision backbone directory "
            "(--teacher DIR, e.g. shapeworld-teacher or a saved facebook/dinov2-base) with --teacher-input image"
        )
    if cfg.weight:
        for layer in layers_of(cfg):
            viral.check_layer(layer, len(viral.decoder_layers(model)))
    peft_model = wrap_lora(model, cfg)
    teacher = None
    if cfg.weight:
        if cfg.teacher_input == "official":
            teacher = viral.OfficialTeacher.from_pretrained(cfg.teacher, viral.llm_grid(model))
        else:
            teacher = viral.load_teacher(cfg.teacher, peft_model, cfg.teacher_image_size)
        if teacher is not None and cfg.teacher_reinit:
            reinit_linear(teacher, cfg.seed)
    projector = None
    if teacher is not None:
        projector = make_projector(cfg, model.config.text_config.hidden_size, teacher.dim)
    return peft_model, processor, teacher, projector


def reinit_linear(teacher, seed: int, std: float = 0.02) -> int:
    """The official load path's effect on the teacher: every Linear layer of the backbone re-drawn
    N(0, std) with zero bias (transformers 4.37 ``from_pretrained`` initialises modules missing from the
    LLM checkpoint with LlamaPreTrainedModel._init_weights). Returns how many layers."""
    gen = torch.Generator().manual_seed(seed + 7919)
    n = 0
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)
                if m.bias is not None:
                    m.bias.zero_()
                n += 1
    return n


def train(cfg: TrainConfig, records: list[dict] | None = None) -> dict:
    """Run the training; ``records`` (LLaVA-format dicts, ``image`` may be a PIL image) replace ``cfg.data``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    out = Path(cfg.output_dir)
    cfg = apply_preset(dataclasses.replace(cfg))
    if cfg.teacher_input not in ("image", "pixels", "official"):
        raise ValueError(
            f"teacher_input={cfg.teacher_input!r}: use 'image' (re-process the original), 'pixels' or 'official'"
        )
    if cfg.effective_batch:
        import os

        world = int(os.environ.get("WORLD_SIZE", "1"))
        per_step = cfg.batch_size * world
        if cfg.effective_batch % per_step:
            raise ValueError(
                f"effective batch {cfg.effective_batch} is not a multiple of batch_size x processes = {per_step}"
            )
        cfg.grad_accum = cfg.effective_batch // per_step
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum)
    set_seed(cfg.seed)
    model, processor, teacher, projector = build(cfg)
    low = resolve_dtype(cfg.dtype) if resolve_dtype(cfg.dtype) in (torch.bfloat16, torch.float16) else None
    if low is not None:
        # mixed precision: frozen weights stay in bf16/fp16, trained ones get float32 master weights
        # (AdamW's eps underflows in fp16 and bf16 updates vanish), autocast lets the two meet
        for p in [*model.parameters(), *(projector.parameters() if projector is not None else ())]:
            if p.requires_grad:
                p.data = p.data.float()
    accelerator.print("viral-train recipe: " + json.dumps(recipe(cfg), indent=2))
    records = (read_records(cfg.data) if records is None else records)[: cfg.limit]
    data = ConversationDataset(records, processor, cfg.image_folder, cfg.max_length, cfg.pad_to_square)
    sampler = EpochSampler(len(data), cfg.seed)
    pad_id = processor.tokenizer.pad_token_id
    loader = torch.utils.data.DataLoader(
        data, batch_size=cfg.batch_size, sampler=sampler, collate_fn=lambda b: collate(b, pad_id)
    )
    steps_per_epoch = max(1, len(loader) // cfg.grad_accum)
    total = cfg.max_steps or max(1, int(round(cfg.epochs * steps_per_epoch)))
    groups = param_groups(model, projector, cfg)
    group_names = [g.pop("name") for g in groups]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    factor = (
        official_lr_lambda(total, cfg.warmup_ratio)
        if cfg.schedule == "official"
        else lr_lambda(total, int(cfg.warmup_ratio * total))
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if projector is not None and any(p.requires_grad for p in projector.parameters()):
        model, projector, optimizer, loader = accelerator.prepare(model, projector, optimizer, loader)
    else:  # a frozen projector (preset=official) is not a module to distribute
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        if projector is not None:
            projector.to(accelerator.device)
    if teacher is not None and not isinstance(teacher, viral.EncoderTeacher):
        teacher.to(accelerator.device)
    base = accelerator.unwrap_model(model)
    image_token_id = base.config.image_token_id
    grid = viral.llm_grid(base) if viral.family(base.config).own_encoder else None  # else per image, from the geometry
    ip = processor.image_processor
    source = {
        "mean": ip.image_mean,
        "std": ip.image_std,
        "crop": viral.crop_fraction(ip),
        "from_images": cfg.teacher_input == "image" and isinstance(teacher, viral.BackboneTeacher),
    }

    step = 0
    resume = latest_checkpoint(out) if cfg.resume is True else (Path(cfg.resume) if cfg.resume else None)
    if resume is not None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(base, load_file(str(resume / "adapter" / "adapter_model.safetensors")))
        if projector is not None:
            accelerator.unwrap_model(projector).load_state_dict(load_file(str(resume / "vra_projector.safetensors")))
        _load_optimizer(optimizer, resume)
        step = json.loads((resume / "trainer_state.json").read_text())["step"]
        with warnings.catch_warnings():  # replaying the schedule before any optimizer step is intended
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(step):
                scheduler.step()
        accelerator.print(f"resumed from {resume} at step {step}")

    settings = {
        "base": cfg.pretrained,
        **dataclasses.asdict(cfg),
        "records": len(records),
        "teacher_info": teacher.describe() if teacher is not None else None,
        "steps": total,
        "grid": list(grid) if grid else "per image (geometry base block)",
        "image_token_id": image_token_id,
        "recipe": recipe(cfg),
    }
    cache: dict[int, torch.Tensor] = {}
    log_path = out / "log.jsonl"
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(
        total=total, initial=step, desc="viral-train", disable=not (cfg.progress and accelerator.is_local_main_process)
    )
    running = {"lm": [], "vra": [], "t": []}
    autocast = torch.autocast(accelerator.device.type, dtype=low, enabled=low is not None)
    scaler = torch.amp.GradScaler(
        accelerator.device.type, enabled=low == torch.float16
    )  # fp16 gradients underflow unscaled
    model.train()
    last = {}
    while step < total:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        sampler.use_epoch(epoch)
        epoch_loader = (
            accelerator.skip_first_batches(loader, done_in_epoch * cfg.grad_accum) if done_in_epoch else loader
        )
        t0 = time.perf_counter()
        for batch in epoch_loader:
            index = batch.pop("index")
            targets = None
            if teacher is not None and "pixel_values" in batch:
                aligned = None if grid else viral.aligned_tokens(base.config, batch, image_token_id)
                targets = _targets(
                    teacher,
                    batch["pixel_values"],
                    index,
                    cache if cfg.cache_teacher else None,
                    grid,
                    data,
                    source,
                    aligned,
                )
            with accelerator.accumulate(model, *([projector] if projector is not None else [])):
                with autocast:
                    res = viral.viral_step(
                        model,
                        batch,
                        projector=projector,
                        targets=targets,
                        layer=layers_of(cfg),
                        weight=cfg.weight,
                        image_token_id=image_token_id,
                        loss=cfg.loss,
                    )
                accelerator.backward(scaler.scale(res["loss"]))
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    scaler.unscale_(optimizer)
                    params = [p for g in optimizer.param_groups for p in g["params"]]
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step() if accelerator.sync_gradients else None
                optimizer.zero_grad()
            running["lm"].append(float(res["lm_loss"].detach()))
            if res["vra_loss"] is not None:
                running["vra"].append(float(res["vra_loss"].detach()))
            if not accelerator.sync_gradients:
                continue
            step += 1
            running["t"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            last = {"lm_loss": _mean(running["lm"]), "vra_loss": _mean(running["vra"])}
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in last.items() if v is not None})
            if accelerator.is_main_process and (step % cfg.log_every == 0 or step == total):
                row = {
                    "step": step,
                    **last,
                    "lr": scheduler.get_last_lr()[group_names.index("main") if "main" in group_names else 0],
                    "lrs": dict(zip(group_names, scheduler.get_last_lr())),
                    "sec_per_step": _mean(running["t"]),
                }
                with open(log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                running = {"lm": [], "vra": [], "t": []}
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                _checkpoint(accelerator, out, step, model, projector, optimizer, settings, cfg.keep_checkpoints)
            if step >= total:
                break
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_outputs(
            out,
            accelerator.unwrap_model(model),
            accelerator.unwrap_model(projector) if projector is not None else None,
            settings,
        )
    return {"step": step, **last}


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def _targets(teacher, pixel_values, index, cache, grid, data, source, aligned=None):
    """Teacher features of each sample on its grid: ``grid`` for every sample (LLaVA-1.5), else each
    sample's ``aligned`` grid (the whole image seen; a list, None where nothing is aligned, when grids differ)."""
    if grid is None:
        return _targets_per_grid(teacher, index, cache, data, aligned, pixel_values.device)

    def compute(rows):
        if source["from_images"]:
            return viral.teacher_targets_from_images(
                teacher, [data.image(int(index[b])) for b in rows], grid, source["crop"]
            )
        return viral.teacher_targets(teacher, pixel_values[rows], source["mean"], source["std"], grid)

    if cache is None:
        return compute(list(range(len(index)))).to(pixel_values.device)
    missing = [b for b, i in enumerate(index.tolist()) if i not in cache]
    if missing:
        fresh = compute(missing).cpu()
        for b, feats in zip(missing, fresh):
            cache[int(index[b])] = feats
    return torch.stack([cache[int(i)] for i in index.tolist()]).to(pixel_values.device)


def _targets_per_grid(teacher, index, cache, data, aligned, device):
    cache = {} if cache is None else cache
    for b, i in enumerate(index.tolist()):
        a = aligned[b]
        if a is not None and (i not in cache or tuple(cache[i].shape[:1]) != (a.grid[0] * a.grid[1],)):
            crop = None if a.whole_image else viral.crop_fraction(data.processor.image_processor)
            cache[i] = viral.teacher_targets_from_images(teacher, [data.image(i)], a.grid, crop)[0].cpu()
    out = [cache[i].to(device) if aligned[b] is not None else None for b, i in enumerate(index.tolist())]
    shapes = {t.shape for t in out if t is not None}
    return torch.stack(out) if len(shapes) == 1 and all(t is not None for t in out) else out


def _checkpoint(accelerator, out: Path, step: int, model, projector, optimizer, settings: dict, keep: int) -> None:
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    path = out / "checkpoints" / f"step-{step:06d}"
    save_outputs(
        path,
        accelerator.unwrap_model(model),
        accelerator.unwrap_model(projector) if projector is not None else None,
        settings,
    )
    _save_optimizer(optimizer, path)
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    for old in sorted((out / "checkpoints").glob("step-*"))[:-keep] if keep else []:
        import shutil

        shutil.rmtree(old)
