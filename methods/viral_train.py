"""Fine-tuning a VLM checkpoint with VIRAL's alignment loss, on peft LoRA and accelerate.

Families (their adapters, methods/families/, each naming its aligned tokens in ``aligned_block``):
LLaVA-1.5, LLaVA-NeXT / OneVision (the base block is aligned), Qwen2.5-VL and Qwen3-VL (the merged
tokens, rows x cols), Gemma 3 (the pooled grid) and InternVL (the thumbnail). Batches are the checkpoint's own
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

Data: LLaVA-format conversation records (methods/conversation_data.py); the model, LoRA, projector,
teacher and optimiser groups are built by methods/viral_setup.py.
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

from .params import Param, parse_params

from . import families, viral, viral_teachers
from .conversation_data import ConversationDataset, EpochSampler, collate, read_records
from .viral_setup import build, layers_of, lr_lambda, official_lr_lambda, param_groups, resolve_dtype


@dataclasses.dataclass
class TrainConfig:
    pretrained: str
    data: str
    output_dir: str
    image_folder: str = ""
    teacher: str = "self"  # a vision backbone directory, "self" (the model's own vision tower) or "none"
    teacher_image_size: int | None = None
    teacher_input: str = "image"  # "image": re-process the original image; "pixels": convert the LLaVA pixels;
    # "official": the LLaVA pixels as they are into DINOv2 with its position table resampled (OfficialTeacher)
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
    conversation: str = (
        "processor"  # "processor": its chat template; "v1": LLaVA's official --version v1 ids and labels
    )
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
        "conversation": "v1",  # --version v1: conv_vicuna_v1, tokenizer_image_token, preprocess_v1's masking
        # two behaviours of the official code reproduced (docs/viral.md, "official bugs"):
        "train_vra_projector": False,  # peft freezes it (train.py:1107) and nothing re-enables it
        "projector_init": "official",
        "teacher_reinit": True,  # from_pretrained re-initialises the hub DINOv2's Linear layers
    }
}


class _Setting(Param):
    """A TrainConfig field as a ``parse_params`` parameter: its value is already a Python value (from
    argparse or the caller), taken as given; model_args' string conversion would turn "none" into None."""

    def parse(self, raw: Any) -> Any:
        return raw


def apply_preset(cfg: TrainConfig) -> TrainConfig:
    """The settings of the run: the config's values < the preset < what the caller set, by the rule
    every wrapper's model_args follow (``params.parse_params``). What the caller set: ``cfg.explicit``
    (the CLI's given flags, so a flag equal to its default still wins), else every field that is not
    at its dataclass default. The config's values, not the dataclass defaults, are the bottom layer:
    a field set but left out of ``explicit`` keeps its value where the preset has none."""
    if not cfg.preset:
        return cfg
    fields = [f for f in dataclasses.fields(cfg) if f.name not in ("preset", "explicit")]
    explicit = set(cfg.explicit) or {f.name for f in fields if getattr(cfg, f.name) != f.default}
    given = {f.name: getattr(cfg, f.name) for f in fields if f.name in explicit}
    settings = [_Setting(f.name, object, getattr(cfg, f.name), "") for f in fields]
    values = parse_params(settings, {**given, "preset": cfg.preset}, PRESETS, owner="viral-train")
    if "grad_accum" in given and "effective_batch" not in given:  # an explicit grad_accum wins over the preset's
        values["effective_batch"] = cfg.effective_batch
    return dataclasses.replace(cfg, **values)


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
        "conversation": cfg.conversation,
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
# The loop
# ---------------------------------------------------------------------------------------


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
    family = families.adapter(model.config.model_type)
    if cfg.conversation == "v1" and not family.square_grid:  # the official code's single square-grid layout
        raise ValueError(f"conversation='v1' is LLaVA-1.5's official data path; {family.display_name} uses 'processor'")
    data = ConversationDataset(
        records, processor, cfg.image_folder, cfg.max_length, cfg.pad_to_square, conversation=cfg.conversation
    )
    sampler = EpochSampler(len(data), cfg.seed)
    pad_id = processor.tokenizer.pad_token_id
    loader = torch.utils.data.DataLoader(
        data, batch_size=cfg.batch_size, sampler=sampler, collate_fn=lambda b: collate(b, pad_id)
    )
    steps_per_epoch = max(1, len(loader) // cfg.grad_accum)
    # as transformers' Trainer counts them: ceil(epochs x optimizer steps per epoch)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
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
    if teacher is not None and not isinstance(teacher, viral_teachers.EncoderTeacher):
        teacher.to(accelerator.device)
    base = accelerator.unwrap_model(model)
    image_token_id = base.config.image_token_id
    grid = viral.llm_grid(base) if viral.family(base.config).square_grid else None  # else per image, from the geometry
    ip = processor.image_processor
    source = {
        "mean": ip.image_mean,
        "std": ip.image_std,
        "crop": viral_teachers.crop_fraction(ip),
        "from_images": cfg.teacher_input == "image" and isinstance(teacher, viral_teachers.BackboneTeacher),
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
            return viral_teachers.teacher_targets_from_images(
                teacher, [data.image(int(index[b])) for b in rows], grid, source["crop"]
            )
        return viral_teachers.teacher_targets(teacher, pixel_values[rows], source["mean"], source["std"], grid)

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
            crop = None if a.whole_image else viral_teachers.crop_fraction(data.processor.image_processor)
            cache[i] = viral_teachers.teacher_targets_from_images(teacher, [data.image(i)], a.grid, crop)[0].cpu()
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
