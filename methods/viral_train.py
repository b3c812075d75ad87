"""Fine-tuning a LLaVA checkpoint with VIRAL's alignment loss, on peft LoRA and accelerate.

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
    teacher_input: str = "image"  # "image": re-process the original image; "pixels": convert the LLaVA pixels
    layer: int = viral.DEFAULTS["layer"]
    weight: float = viral.DEFAULTS["weight"]
    proj_hidden: int = viral.DEFAULTS["proj_hidden"]
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    train_mm_projector: bool = True
    lr: float = 2e-4
    proj_lr: float | None = None  # default: lr
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    batch_size: int = 4
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    max_length: int = 2048
    max_grad_norm: float = 1.0
    seed: int = 0
    dtype: str = "float32"
    cache_teacher: bool = True  # teacher features computed once per sample (no augmentation here)
    save_every: int = 0  # optimizer steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    log_every: int = 10
    resume: Any = False  # True: latest checkpoint in output_dir; or a checkpoint directory
    limit: int | None = None  # use only the first N records
    progress: bool = True


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


def read_records(path: str) -> list[dict]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"training data {p} not found (expected LLaVA-format JSON or JSONL)")
    text = p.read_text()
    records = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
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


def encode_conversation(processor, image, conversations: list[dict], max_length: int) -> dict:
    """input_ids, labels (assistant tokens only), pixel_values for one record."""
    image_token = getattr(processor, "image_token", "<image>")
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
        start = ids(processor.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True))["input_ids"].shape[1]
        end = ids(processor.apply_chat_template(messages[: k + 1], tokenize=False))["input_ids"].shape[1]
        labels[start:end] = input_ids[start:end]
    item = {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}
    if images:
        item["pixel_values"] = full["pixel_values"][0]
    return item


class ConversationDataset(torch.utils.data.Dataset):
    """LLaVA-format records, encoded lazily (and remembered) per index."""

    def __init__(self, records: list[dict], processor, image_folder: str = "", max_length: int = 2048):
        self.records, self.processor, self.folder, self.max_length = records, processor, Path(image_folder or "."), max_length
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
            self._cache[i] = encode_conversation(self.processor, self.image(i), self.records[i]["conversations"], self.max_length)
        return {**self._cache[i], "index": i}


def collate(items: list[dict], pad_id: int) -> dict:
    n = max(len(it["input_ids"]) for it in items)
    batch = {
        "input_ids": torch.full((len(items), n), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(items), n, dtype=torch.long),
        "labels": torch.full((len(items), n), -100, dtype=torch.long),
        "index": torch.tensor([it["index"] for it in items]),
    }
    for b, it in enumerate(items):
        m = len(it["input_ids"])
        batch["input_ids"][b, :m] = it["input_ids"]
        batch["attention_mask"][b, :m] = 1
        batch["labels"][b, :m] = it["labels"]
    with_image = [it for it in items if "pixel_values" in it]
    if with_image:
        if len(with_image) != len(items):
            raise ValueError("mixing text-only and image samples in one batch is not supported; use batch_size 1 or separate the data")
        batch["pixel_values"] = torch.stack([it["pixel_values"] for it in items])
    return batch


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
        save_file({k: v.detach().cpu().contiguous() for k, v in projector.state_dict().items()}, str(out / "vra_projector.safetensors"))
    (out / "viral_config.json").write_text(json.dumps(settings, indent=2, default=str))


def latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = sorted((output_dir / "checkpoints").glob("step-*"))
    return ckpts[-1] if ckpts else None


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


def lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def build(cfg: TrainConfig):
    """Model (peft), processor, teacher, projector: everything but the loop."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    dtype = getattr(torch, cfg.dtype)
    model = LlavaForConditionalGeneration.from_pretrained(cfg.pretrained, dtype=dtype)
    processor = AutoProcessor.from_pretrained(cfg.pretrained)
    if model.config.vision_feature_select_strategy != "default":
        raise ValueError("VIRAL needs vision_feature_select_strategy='default' (one image token per patch, no CLS)")
    if cfg.weight:
        viral.check_layer(cfg.layer, len(viral.decoder_layers(model)))
    model.requires_grad_(False)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=LM_TARGETS,
        modules_to_save=["multi_modal_projector"] if cfg.train_mm_projector else None,
    )
    peft_model = get_peft_model(model, lora)
    teacher = viral.load_teacher(cfg.teacher, peft_model, cfg.teacher_image_size) if cfg.weight else None
    projector = None
    if teacher is not None:
        torch.manual_seed(cfg.seed)
        projector = viral.VraProjector(model.config.text_config.hidden_size, teacher.dim, cfg.proj_hidden)
    return peft_model, processor, teacher, projector


def train(cfg: TrainConfig, records: list[dict] | None = None) -> dict:
    """Run the training; ``records`` (LLaVA-format dicts, ``image`` may be a PIL image) replace ``cfg.data``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    out = Path(cfg.output_dir)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum)
    set_seed(cfg.seed)
    model, processor, teacher, projector = build(cfg)
    records = (read_records(cfg.data) if records is None else records)[: cfg.limit]
    data = ConversationDataset(records, processor, cfg.image_folder, cfg.max_length)
    sampler = EpochSampler(len(data), cfg.seed)
    pad_id = processor.tokenizer.pad_token_id
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, sampler=sampler, collate_fn=lambda b: collate(b, pad_id))
    steps_per_epoch = max(1, len(loader) // cfg.grad_accum)
    total = cfg.max_steps or max(1, int(round(cfg.epochs * steps_per_epoch)))
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr}]
    if projector is not None:
        groups.append({"params": list(projector.parameters()), "lr": cfg.proj_lr or cfg.lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, int(cfg.warmup_ratio * total)))
    if projector is not None:
        model, projector, optimizer, loader = accelerator.prepare(model, projector, optimizer, loader)
    else:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if teacher is not None and not isinstance(teacher, viral.EncoderTeacher):
        teacher.to(accelerator.device)
    base = accelerator.unwrap_model(model)
    image_token_id = base.config.image_token_id
    grid = viral.llm_grid(base)
    if cfg.teacher_input not in ("image", "pixels"):
        raise ValueError(f"teacher_input={cfg.teacher_input!r}: use 'image' (re-process the original) or 'pixels'")
    ip = processor.image_processor
    source = {"mean": ip.image_mean, "std": ip.image_std, "crop": viral.crop_fraction(ip),
              "from_images": cfg.teacher_input == "image" and isinstance(teacher, viral.BackboneTeacher)}

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

    settings = {"base": cfg.pretrained, **dataclasses.asdict(cfg), "records": len(records), "teacher_info": teacher.describe() if teacher is not None else None,
                "steps": total, "grid": list(grid), "image_token_id": image_token_id}
    cache: dict[int, torch.Tensor] = {}
    log_path = out / "log.jsonl"
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=total, initial=step, desc="viral-train", disable=not (cfg.progress and accelerator.is_local_main_process))
    running = {"lm": [], "vra": [], "t": []}
    model.train()
    last = {}
    while step < total:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        sampler.use_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, done_in_epoch * cfg.grad_accum) if done_in_epoch else loader
        t0 = time.perf_counter()
        for batch in epoch_loader:
            index = batch.pop("index")
            targets = None
            if teacher is not None and "pixel_values" in batch:
                targets = _targets(teacher, batch["pixel_values"], index, cache if cfg.cache_teacher else None, grid, data, source)
            with accelerator.accumulate(model, *( [projector] if projector is not None else [])):
                res = viral.viral_step(model, batch, projector=projector, targets=targets, layer=cfg.layer,
                                       weight=cfg.weight, image_token_id=image_token_id)
                accelerator.backward(res["loss"])
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    params = [p for g in optimizer.param_groups for p in g["params"]]
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
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
                row = {"step": step, **last, "lr": scheduler.get_last_lr()[0], "sec_per_step": _mean(running["t"])}
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
        save_outputs(out, accelerator.unwrap_model(model), accelerator.unwrap_model(projector) if projector is not None else None, settings)
    return {"step": step, **last}


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def _targets(teacher, pixel_values, index, cache, grid, data, source):
    def compute(rows):
        if source["from_images"]:
            return viral.teacher_targets_from_images(teacher, [data.image(int(index[b])) for b in rows], grid, source["crop"])
        return viral.teacher_targets(teacher, pixel_values[rows], source["mean"], source["std"], grid)

    if cache is None:
        return compute(list(range(len(index)))).to(pixel_values.device)
    missing = [b for b, i in enumerate(index.tolist()) if i not in cache]
    if missing:
        fresh = compute(missing).cpu()
        for b, feats in zip(missing, fresh):
            cache[int(index[b])] = feats
    return torch.stack([cache[int(i)] for i in index.tolist()]).to(pixel_values.device)


def _checkpoint(accelerator, out: Path, step: int, model, projector, optimizer, settings: dict, keep: int) -> None:
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    path = out / "checkpoints" / f"step-{step:06d}"
    save_outputs(path, accelerator.unwrap_model(model), accelerator.unwrap_model(projector) if projector is not None else None, settings)
    _save_optimizer(optimizer, path)
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    for old in sorted((out / "checkpoints").glob("step-*"))[:-keep] if keep else []:
        import shutil

        shutil.rmtree(old)
