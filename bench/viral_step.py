"""Training-step time with VIRAL's alignment loss vs without (target: at most 1.3x).

One optimizer step = forward + backward + AdamW on a LoRA-wrapped LLaVA with LLaVA-1.5
geometry (336 px, 14 px patches, 576 image tokens; a few small layers, see
lmms_eval_plugins.testing.llava15_shaped). Variants, interleaved step by step so that
machine load hits them alike:
  lm        weight=0 (plain LoRA fine-tuning)
  cached    VRA with precomputed teacher features (DINOv2-B width, 768), projector 2048 wide
  self      VRA against the model's own vision tower, computed live every step
  small     VRA with a projector as wide as the LLM (hidden = d)
Reports the median step time of each and the ratio to `lm`, plus the FLOP share of the
projector for LLaVA-1.5-7B (where the LLM dominates far more than in this toy model).

    OMP_NUM_THREADS=1 nice -n 10 python bench/viral_step.py --steps 10 --json results/viral_bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from peft import LoraConfig, get_peft_model
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from lmms_eval_plugins.testing import llava15_shaped
    from methods import viral, viral_teachers
    from methods.viral_setup import LM_TARGETS

    torch.manual_seed(0)
    ckpt = llava15_shaped(tempfile.mkdtemp(), text_layers=args.layers)
    processor = AutoProcessor.from_pretrained(ckpt)
    model = LlavaForConditionalGeneration.from_pretrained(ckpt)
    model.requires_grad_(False)
    model = get_peft_model(
        model, LoraConfig(r=128, lora_alpha=256, target_modules=LM_TARGETS, modules_to_save=["multi_modal_projector"])
    )
    msgs = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "is there a red circle in the image ?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
    ]
    text = processor.apply_chat_template(msgs, tokenize=False)
    images = [Image.new("RGB", (400, 336), (30 * k, 100, 200)) for k in range(args.batch_size)]
    batch = dict(processor(images=images, text=[text] * args.batch_size, return_tensors="pt"))
    batch["labels"] = batch["input_ids"].clone()
    d = model.config.text_config.hidden_size
    n_grid = viral.grid_count(model)
    layer = max(1, args.layers // 2)  # the paper's 16 of 32
    self_teacher = viral_teachers.EncoderTeacher(model)
    ip = processor.image_processor
    variants = {
        "lm": dict(projector=None, targets=lambda: None, weight=0.0),
        "cached": dict(
            projector=viral.VraProjector(d, 768, 2048),
            targets=(lambda t=torch.randn(args.batch_size, n_grid, 768): t),  # noqa: B008 (drawn once)
            weight=0.5,
        ),
        "self": dict(
            projector=viral.VraProjector(d, self_teacher.dim, 2048),
            targets=lambda: viral_teachers.teacher_targets(
                self_teacher, batch["pixel_values"], ip.image_mean, ip.image_std, viral.llm_grid(model)
            ),
            weight=0.5,
        ),
        "small": dict(
            projector=viral.VraProjector(d, 768, d),
            targets=(lambda t=torch.randn(args.batch_size, n_grid, 768): t),  # noqa: B008
            weight=0.5,
        ),
    }
    opts = {}
    for name, v in variants.items():
        params = [p for p in model.parameters() if p.requires_grad] + (
            list(v["projector"].parameters()) if v["projector"] else []
        )
        opts[name] = torch.optim.AdamW(params, lr=1e-5)
    times = {name: [] for name in variants}
    model.train()
    for step in range(args.warmup + args.steps):
        for name, v in variants.items():
            t0 = time.perf_counter()
            res = viral.viral_step(
                model, batch, projector=v["projector"], targets=v["targets"](), layer=layer, weight=v["weight"]
            )
            res["loss"].backward()
            opts[name].step()
            opts[name].zero_grad()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    proj_params_7b = 4096 * 2048 + 2048 * 2048 + 2048 * 768
    result = {
        "geometry": {
            "image_tokens": n_grid,
            "d_model": d,
            "layers": args.layers,
            "aligned_layer": layer,
            "batch_size": args.batch_size,
            "seq_len": int(batch["input_ids"].shape[1]),
        },
        "median_seconds": med,
        "ratio_to_lm": {k: med[k] / med["lm"] for k in med},
        "llava15_7b_projector_flop_share": proj_params_7b / 6.7e9,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
