"""What a viral-train run is built from, everything but the loop (methods/viral_train.py).

The base model (a checkpoint, or the official starting point assembled from a base LLM, a CLIP
tower and the stage-1 projector), LoRA on the language model, the VRA projector(s), the teacher
(with the official code's re-initialisation), AdamW's parameter groups and the two learning-rate
schedules. The functions read a ``TrainConfig`` whose preset is already applied.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from . import viral, viral_teachers

LM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


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


def build(cfg):
    """Model (peft), processor, teacher, projector: everything but the loop."""
    model, processor = load_base(cfg)
    fam = viral.family(model.config)
    reads_llava = cfg.teacher == "self" or cfg.teacher_input != "image"
    if cfg.weight and not fam.square_grid and cfg.teacher not in (None, "", "none") and reads_llava:
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
            teacher = viral_teachers.OfficialTeacher.from_pretrained(cfg.teacher, viral.llm_grid(model))
        else:
            teacher = viral_teachers.load_teacher(cfg.teacher, peft_model, cfg.teacher_image_size)
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
    """(model, processor): ``pretrained`` (a checkpoint of any family with an adapter) or, with
    ``base_llm``, assembled from a base LLM, a vision tower and a stage-1 projector (the official
    starting point: vicuna-7b-v1.5 + the pretrain projector)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    dtype = resolve_dtype(cfg.dtype)
    if cfg.base_llm:
        return assemble_llava(cfg.base_llm, cfg.vision_tower, cfg.mm_projector, dtype=dtype)
    viral.family(AutoConfig.from_pretrained(cfg.pretrained))  # a clear error before loading anything else
    model = AutoModelForImageTextToText.from_pretrained(cfg.pretrained, dtype=dtype)
    return model, AutoProcessor.from_pretrained(cfg.pretrained)


# LLaVA-1.5's conversation template "v1" = conv_vicuna_v1 (llava/conversation.py:253-263; SeparatorStyle.TWO:
# system + " ", then "USER: ... " and "ASSISTANT: ...</s>", so turns join as "... ASSISTANT: a</s>USER: ..."),
# the image first in its user turn as "<image>\n"; tests/test_viral_data.py renders it against the official prompts.
VICUNA_V1_TEMPLATE = (
    "{{ bos_token }}A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. "
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
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
