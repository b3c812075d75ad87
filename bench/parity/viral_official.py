"""Golden fixtures of cvlab-kaist/VIRAL's training step, from the official code (PARITY.md, VIRAL).

Runs in the official stack (transformers 4.37.2, peft 0.10.0, timm; ``official_env.sh``) with the
VIRAL checkout's own ``llava/`` package first on ``sys.path`` (its ``llava_arch.py`` returns the
expanded ids that ``llava_llama.py`` uses to find the 576 image positions) and a checkout of
``facebookresearch/dinov2`` for the teacher's code. The official files run unmodified; the runtime
shim is ours:

- ``cpu_shim.install()`` (cuda -> cpu, fp32);
- stub modules for ``wandb`` (its ``log`` records the exact NTP / VRA loss values the official
  forward logs), ``matplotlib.pyplot`` and ``sklearn.decomposition`` (imported by
  ``llava_llama.py`` for a visualisation helper the training step never calls);
- ``torch.hub.load('facebookresearch/dinov2', 'dinov2_vitb14')`` returns the dinov2 checkout's
  ``DinoVisionTransformer`` built exactly as its ``hub/backbones.py`` builds ViT-B/14 (518 px,
  patch 14, LayerScale 1.0, MemEffAttention blocks, no registers, interpolate_offset 0.1) but with
  tiny widths, and the tiny teacher's weights (``viral_tiny.teacher_state``) instead of a download.

What it does, in the official order (``llava/train/train.py:train``):
1. ``LlavaLlamaForCausalLM.from_pretrained(tiny original layout, config=<its config + VIRAL's
   config.json keys>)``: builds the alignment projector and the DINOv2 teacher (pos_embed
   resampled 37x37 -> 24x24 by timm, ``llava_llama.py:294-306``). Records which teacher tensors
   ``from_pretrained`` changed afterwards (transformers 4.37 initialises every module that has no
   weights in the checkpoint, ``modeling_utils.py`` ``_fast_init``), then restores the intended
   teacher weights and overwrites the projector with ``viral_tiny.projector_state``;
2. ``get_peft_model`` with ``find_all_linear_names`` (train.py:169-182) and the LoRA settings of
   ``scripts/v1_5/finetune_lora.sh`` (r 128, alpha 256, dropout 0.05); LoRA A matrices set to
   ``viral_tiny.draw``; ``initialize_vision_modules`` (loads CLIP, re-enables the mm_projector);
3. ``LLaVATrainer.create_optimizer`` / ``create_scheduler`` with the script's arguments
   (lr 2e-4, mm_projector_lr 2e-5, weight decay 0, warm-up 0.03, cosine);
4. one forward on a fixed batch of two samples (the official forward; dropout modules in eval
   mode so that the step is deterministic), backward, gradient clipping at 1.0 (the Trainer's
   default) and one AdamW step at the groups' learning rates.

Writes ``--out/viral_official.safetensors`` and ``--out/provenance.json``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import cpu_shim  # noqa: E402
import tiny_llava15 as tiny  # noqa: E402
import viral_tiny as vt  # noqa: E402

VIRAL_COMMIT = "adc0791259b2524837bd18f5f8e65bd43a33f28d"


def install_shims(dinov2_dir: Path) -> dict:
    """cpu_shim, the stub modules and the hub redirect; returns the dict the wandb stub logs into."""
    import importlib.machinery

    import peft  # noqa: F401  (transformers and peft look for sklearn / wandb when imported: import them before the stubs)
    import transformers  # noqa: F401

    cpu_shim.install()
    logged: dict = {}
    cpu_shim.stub_modules(["wandb"], wandb={"log": lambda d, **k: logged.update(d), "init": lambda *a, **k: None})
    cpu_shim.stub_modules(["matplotlib.pyplot"])
    cpu_shim.stub_modules(["sklearn.decomposition"], **{"sklearn.decomposition": {"PCA": object}})
    for name in ("wandb", "matplotlib", "matplotlib.pyplot", "sklearn", "sklearn.decomposition"):
        sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
    sys.path.insert(1, str(dinov2_dir))

    def hub_load(repo, name, *args, **kwargs):
        if repo != "facebookresearch/dinov2" or name != "dinov2_vitb14":
            raise RuntimeError(f"the harness only provides facebookresearch/dinov2:dinov2_vitb14, not {repo}:{name}")
        from dinov2.layers import MemEffAttention
        from dinov2.layers import NestedTensorBlock as Block
        from dinov2.models.vision_transformer import DinoVisionTransformer

        # hub/backbones.py _make_dinov2_model + models/vision_transformer.py vit_base, tiny widths
        model = DinoVisionTransformer(
            img_size=vt.TEACHER["image_size"],
            patch_size=vt.TEACHER["patch_size"],
            init_values=1.0,
            ffn_layer="mlp",
            block_chunks=0,
            num_register_tokens=0,
            interpolate_antialias=False,
            interpolate_offset=0.1,
            embed_dim=vt.TEACHER["hidden_size"],
            depth=vt.TEACHER["num_hidden_layers"],
            num_heads=vt.TEACHER["num_attention_heads"],
            mlp_ratio=vt.TEACHER["mlp_ratio"],
            block_fn=functools.partial(Block, attn_class=MemEffAttention),
        )
        model.load_state_dict(vt.teacher_state(), strict=True)
        return model

    torch.hub.load = hub_load
    return logged


def viral_config(model_dir: Path, scratch: Path) -> Path:
    """The tiny model's config plus the VRA keys of VIRAL's config.json (projector / teacher widths tiny)."""
    cfg = json.loads((model_dir / "original" / "config.json").read_text())
    cfg.update(
        {
            "vra_loss": True,
            "target_layers": [vt.TARGET_LAYER],
            "use_multiple_projectors": False,
            "vra_target": "dinov2-vit-b",
            "vra_weight": vt.VRA_WEIGHT,
            "projector_dim": vt.PROJECTOR_DIM,
            "z_dim": vt.Z_DIM,
            "mm_projector_lr": 2e-5,
        }
    )
    out = scratch / "viral_config"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def official_batch():
    """input_ids with IMAGE_TOKEN_INDEX, labels, attention_mask as the official collator makes them
    (right padding with the pad id 0 = unk, attention_mask = ids != pad)."""
    rows, labels = [], []
    for before, after, n_answer in vt.batch_ids():
        ids = [1, *before, tiny.IMAGE_TOKEN_INDEX, *after]
        lab = [-100] * (len(ids) - n_answer) + after[-n_answer:]
        rows.append(ids)
        labels.append(lab)
    n = max(map(len, rows))
    input_ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (n - len(r)) for r in labels])
    return input_ids, labels, input_ids.ne(0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--viral", required=True, type=Path, help="checkout of cvlab-kaist/VIRAL (at adc0791)")
    ap.add_argument("--dinov2", required=True, type=Path, help="checkout of facebookresearch/dinov2")
    ap.add_argument("--model", required=True, type=Path, help="tiny_llava15.build output")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--scratch", required=True, type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    logged = install_shims(args.dinov2)
    sys.path.insert(0, str(args.viral))

    import peft
    import timm
    import transformers
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    from llava.train.llava_trainer import LLaVATrainer
    from llava.train.train import ModelArguments, TrainingArguments, find_all_linear_names
    from peft import LoraConfig, get_peft_model

    # 1. the model as train.py:1042-1064 loads it
    config = transformers.AutoConfig.from_pretrained(
        str(viral_config(args.model, args.scratch)), trust_remote_code=True
    )
    model = LlavaLlamaForCausalLM.from_pretrained(
        str(args.model / "original"), config=config, torch_dtype=torch.float32, attn_implementation="eager"
    )
    model.config.use_cache = False
    enc = model.alignment_encoder
    intended = vt.teacher_state()
    pos_resampled = enc.pos_embed.detach().clone()
    loaded = {k: v.detach().clone() for k, v in enc.state_dict().items()}
    changed = sorted(k for k, v in intended.items() if k != "pos_embed" and not torch.equal(loaded[k], v))
    # the teacher as from_pretrained left it (for the record), then the intended one
    images = tiny.fixed_pixels(2)
    with torch.no_grad():
        feats_reinit = enc.forward_features(torch.nn.functional.interpolate(images, size=(336, 336), mode="bilinear"))[
            "x_norm_patchtokens"
        ]
    enc.load_state_dict({**intended, "pos_embed": pos_resampled}, strict=True)
    with torch.no_grad():
        for name, p in model.alignment_projector.projector.named_parameters():
            p.copy_(vt.projector_state(tiny.TEXT["hidden_size"])[name])

    # 2. LoRA (train.py:1091-1107), then the vision modules (train.py:1153-1187)
    targets = find_all_linear_names(model)
    lora = LoraConfig(
        r=vt.LORA["r"],
        lora_alpha=vt.LORA["alpha"],
        target_modules=targets,
        lora_dropout=vt.LORA["dropout"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    n_lora = vt.set_lora_a(model)
    model_args = ModelArguments(
        model_name_or_path=str(args.model / "original"),
        version="v1",
        vision_tower=str(args.model / "original" / "clip"),
        mm_vision_select_layer=-2,
        mm_projector_type="mlp2x_gelu",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        mm_patch_merge_type="flat",
        mm_vision_select_feature="patch",
    )
    model.get_model().initialize_vision_modules(model_args=model_args, fsdp=None)
    model.get_vision_tower().to(dtype=torch.float32)
    base = model.base_model.model
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)

    # 3. the optimiser groups and schedule of LLaVATrainer with finetune_lora.sh's arguments
    targs = TrainingArguments(
        output_dir=str(args.scratch / "trainer"),
        learning_rate=2e-4,
        mm_projector_lr=2e-5,
        weight_decay=0.0,
        warmup_ratio=0.03,
        lr_scheduler_type="cosine",
        use_cpu=True,
        report_to=[],
        lora_enable=True,
        lora_r=vt.LORA["r"],
        lora_alpha=vt.LORA["alpha"],
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        num_train_epochs=1,
    )
    trainer = LLaVATrainer(model=model, args=targs)
    optimizer = trainer.create_optimizer()
    total = 100
    scheduler = trainer.create_scheduler(num_training_steps=total, optimizer=optimizer)
    lr_factors = [scheduler.lr_lambdas[0](s) for s in range(total + 1)]
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for g in optimizer.param_groups:
        kinds: dict = {}
        for p in g["params"]:
            n = names[id(p)]
            kind = (
                "lora"
                if "lora_" in n
                else "mm_projector"
                if "mm_projector" in n
                else "alignment_projector"
                if "alignment_projector" in n
                else "other"
            )
            kinds[kind] = kinds.get(kind, 0) + 1
        groups.append(
            {
                "lr": g["initial_lr"],
                "lr_at_step0": g["lr"],
                "weight_decay": g["weight_decay"],
                "betas": list(g["betas"]),
                "eps": g["eps"],
                "params": kinds,
            }
        )

    # 4. one training step on a fixed batch
    input_ids, labels, attention_mask = official_batch()
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    box: dict = {}
    orig_ff = enc.forward_features

    def capture_ff(x, *a, **k):
        out = orig_ff(x, *a, **k)
        box["teacher"] = out["x_norm_patchtokens"].detach().clone()
        return out

    enc.forward_features = capture_ff
    h = base.alignment_projector.register_forward_hook(lambda m, i, o: box.__setitem__("projected", o.detach().clone()))
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, images=images)
    h.remove()
    enc.forward_features = orig_ff
    out.loss.backward()
    lm_layers = base.model.layers
    q = lm_layers[vt.TARGET_LAYER - 1].self_attn.q_proj
    grad_norm_b = torch.zeros(len(lm_layers), len(vt.LORA_MODULES))
    grad_norm_a = torch.zeros_like(grad_norm_b)
    for i, layer in enumerate(lm_layers):
        for j, name in enumerate(vt.LORA_MODULES):
            mod = getattr(
                layer.self_attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp, name
            )
            grad_norm_b[i, j] = mod.lora_B["default"].weight.grad.norm()
            grad_norm_a[i, j] = mod.lora_A["default"].weight.grad.norm()
    mm = base.model.mm_projector
    # the image positions of the expanded sequence (official: img_token_where, llava_llama.py:461)
    where = []
    for row in input_ids:
        k = int((row == tiny.IMAGE_TOKEN_INDEX).nonzero()[0])
        where.append(torch.arange(k, k + tiny.N_IMAGE_TOKENS))
    projected = torch.stack([box["projected"][b, where[b]] for b in range(len(where))])
    tensors = {
        "teacher_features": box["teacher"],
        "pos_embed_resampled": pos_resampled,
        "projected": projected,
        # copies: clip_grad_norm_ below scales the .grad tensors in place
        "grad.mm_projector.0.weight": mm[0].weight.grad.clone(),
        "grad.mm_projector.0.bias": mm[0].bias.grad.clone(),
        "grad.mm_projector.2.weight": mm[2].weight.grad.clone(),
        "grad.mm_projector.2.bias": mm[2].bias.grad.clone(),
        f"grad.lora_B.{vt.TARGET_LAYER - 1}.q_proj": q.lora_B["default"].weight.grad.clone(),
        "grad_norm.lora_B": grad_norm_b,
        "grad_norm.lora_A": grad_norm_a,
    }
    params = [p for g in optimizer.param_groups for p in g["params"]]
    total_norm = torch.nn.utils.clip_grad_norm_(params, targs.max_grad_norm)
    before = {"mm": mm[0].bias.detach().clone(), "lora": q.lora_B["default"].weight[0].detach().clone()}
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"]
    optimizer.step()  # the groups' own learning rates (the scheduler's factor at step 0 is recorded above)
    tensors["step_delta.mm_projector.0.bias"] = mm[0].bias.detach() - before["mm"]
    tensors[f"step_delta.lora_B.{vt.TARGET_LAYER - 1}.q_proj.row0"] = (
        q.lora_B["default"].weight[0].detach() - before["lora"]
    )

    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(args.out / "viral_official.safetensors"), metadata={"format": "pt"})
    cos_reinit = torch.nn.functional.cosine_similarity(feats_reinit, box["teacher"], dim=-1).mean().item()
    model_info = json.loads((args.model / "model_info.json").read_text())
    prov = {
        "repository": "cvlab-kaist/VIRAL",
        "commit": VIRAL_COMMIT,
        "files": [
            "llava/model/language_model/llava_llama.py",
            "llava/model/llava_arch.py",
            "llava/train/train.py",
            "llava/train/llava_trainer.py",
            "scripts/v1_5/finetune_lora.sh",
            "config.json",
        ],
        "teacher_code": {
            "repository": "facebookresearch/dinov2",
            "commit": os.environ.get("DINOV2_COMMIT")
            or _git_head(args.dinov2)
            or "unknown (exported tree: set DINOV2_COMMIT)",
            "files": ["dinov2/hub/backbones.py", "dinov2/models/vision_transformer.py"],
        },
        "command": "bash bench/parity/regenerate.sh --viral /work/official/VIRAL:/work/official/dinov2",
        "stack": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "timm": timm.__version__,
        },
        "shim_sha256": hashlib.sha256((HERE / "cpu_shim.py").read_bytes()).hexdigest(),
        "harness_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "model": {"seed": model_info["seed"], "fingerprint": model_info["fingerprint"]},
        "teacher": {"seed": vt.TEACHER_SEED, "fingerprint": vt.state_fingerprint(vt.teacher_state()), **vt.TEACHER},
        "config": {
            "target_layers": [vt.TARGET_LAYER],
            "vra_weight": vt.VRA_WEIGHT,
            "projector_dim": vt.PROJECTOR_DIM,
            "z_dim": vt.Z_DIM,
            "alignment_loss": "direct",
            "lora": vt.LORA,
            "lora_target_modules": sorted(targets),
        },
        "precision": "float32 on CPU (the official recipe trains in bf16 on GPU)",
        "dropout": "all Dropout modules (LoRA dropout 0.05) in eval mode for a deterministic step",
        "batch": {
            "samples": [[len(b), len(a), n] for b, a, n in vt.batch_ids()],
            "pixels": "tiny_llava15.fixed_pixels(2)",
        },
        "losses": {"ntp": logged.get("ntp loss"), "vra": logged.get("vra loss"), "total": float(out.loss)},
        "optimizer": {
            "class": type(optimizer).__name__,
            "groups": groups,
            "max_grad_norm": targs.max_grad_norm,
            "grad_norm_before_clip": float(total_norm),
        },
        "schedule": {"total_steps": total, "warmup_steps": targs.get_warmup_steps(total), "lr_factors": lr_factors},
        "facts": {
            "trainable_params": {
                "lora": sum("lora_" in n for n in trainable),
                "mm_projector": sum("mm_projector" in n for n in trainable),
                "alignment_projector": sum("alignment_projector" in n for n in trainable),
                "other": [
                    n for n in trainable if not any(k in n for k in ("lora_", "mm_projector", "alignment_projector"))
                ],
            },
            "alignment_projector_requires_grad": any(p.requires_grad for p in base.alignment_projector.parameters()),
            "lora_a_overwritten": n_lora,
            "teacher_tensors_changed_by_from_pretrained": changed,
            "teacher_features_cos_reinitialised_vs_intended": cos_reinit,
        },
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
    }
    (args.out / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
    print(json.dumps({"losses": prov["losses"], "facts": prov["facts"], "groups": groups}, indent=2))
    return 0


def _git_head(path: Path) -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
