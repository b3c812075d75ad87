"""Random LLaVA checkpoints built locally, for tests and benchmarks (no download).

``build_tiny_llava(dir)`` writes a complete interleaved LLaVA checkpoint directory
(weights, config, word-level tokenizer, processor with a LLaVA-1.5 chat template) that
loads through the same ``from_pretrained`` path as ``llava-hf/llava-1.5-7b-hf``.
``llava15_shaped`` gives the geometry of LLaVA-1.5 (336 px, 14 px patches, a 24x24 grid
of 576 image tokens) with a few small layers, for the benchmark.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}"
    "{{ item['text'] }}{% endif %}{% endfor %}{% endif %} {% else %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{{ item['text'] }}{% endfor %}{% endif %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

WORDS = (
    "USER ASSISTANT : ? . , ! yes no is there a an the in of image picture photo answer question using single word "
    "phrase please describe this what color shape how many left right above below red green blue yellow circle "
    "square triangle star small large and to on with one two three four five six seven eight nine zero 0 1 2 3 4 5 "
    "6 7 8 9 [ ] A B C D option letter select from following choices"
).split()


def build_tokenizer(words=WORDS, extra_specials=()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>", *extra_specials]
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*specials, *words, "\n"]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>", **{t.strip("<>") + "_token": t for t in extra_specials}},
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def byte_level_tokenizer(extra_specials=(), named: dict | None = None):
    """A byte-level BPE tokenizer without merges (every byte a token, as SentencePiece's byte fallback can
    write anything): answers such as lochead's boxes decode back exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", *extra_specials]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens=dict(named or {}),
    )


def _tower_config(config_class, image_size, patch_size, hidden, layers, heads, mlp=None, **extra):
    """A tiny vision tower's config (CLIP or SigLIP): MLP twice the width unless ``mlp`` is given."""
    return config_class(
        hidden_size=hidden,
        intermediate_size=mlp or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        **extra,
    )


def _lm_config(config_class, tok, hidden, layers, heads, kv_heads, mlp=None):
    """A tiny language model's config (Llama or Qwen2) over ``tok``: MLP twice the width unless ``mlp`` is
    given, 4096 positions."""
    return config_class(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=mlp or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def build_tiny_llava(
    out_dir,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    vision_heads: int = 4,
    text_hidden: int = 64,
    text_layers: int = 4,
    text_heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random interleaved LLaVA checkpoint to ``out_dir`` and return its path."""
    from transformers import LlavaForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    config = tiny_llava_config(
        tok,
        image_size=image_size,
        patch_size=patch_size,
        vision_hidden=vision_hidden,
        vision_layers=vision_layers,
        vision_heads=vision_heads,
        text_hidden=text_hidden,
        text_layers=text_layers,
        text_heads=text_heads,
        kv_heads=kv_heads,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tiny_llava_processor(tok, image_size, patch_size).save_pretrained(out)
    return out


def tiny_llava_config(
    tok,
    *,
    image_size: int,
    patch_size: int,
    vision_hidden: int,
    vision_layers: int,
    vision_heads: int,
    text_hidden: int,
    text_layers: int,
    text_heads: int,
    kv_heads: int,
    vision_mlp: int | None = None,
    text_mlp: int | None = None,
    vocab_size: int | None = None,
):
    """The config of an interleaved LLaVA over ``tok``: a CLIP tower (CLS, penultimate-layer features), a Llama
    LM and LLaVA-1.5's two-layer GELU projector. MLPs twice the width and the tokenizer's vocabulary unless given
    (``lmms-plugins bench --shape`` gives LLaVA-1.5-7B's)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text_config = _lm_config(LlamaConfig, tok, text_hidden, text_layers, text_heads, kv_heads, text_mlp)
    if vocab_size is not None:
        text_config.vocab_size = vocab_size
    return LlavaConfig(
        vision_config=_tower_config(
            CLIPVisionConfig,
            image_size,
            patch_size,
            vision_hidden,
            vision_layers,
            vision_heads,
            vision_mlp,
            projection_dim=vision_hidden,
        ),
        text_config=text_config,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def tiny_llava_processor(tok, image_size: int, patch_size: int):
    """LLaVA-1.5's processor over ``tok``: resize the short side, centre-crop a square, one token per patch."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


# A few anyres pinpoints for tiny towers: a non-square image picks a 1x2, 2x1, 1x3 or 3x1 tiling.
def tiny_pinpoints(side: int) -> list[list[int]]:
    return [[side, 2 * side], [2 * side, side], [2 * side, 2 * side], [side, 3 * side], [3 * side, side]]


def build_tiny_llava_next(
    out_dir,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    vision_heads: int = 4,
    text_hidden: int = 64,
    text_layers: int = 4,
    text_heads: int = 4,
    kv_heads: int = 2,
    pinpoints: list | None = None,
    seed: int = 0,
    tokenizer=None,
) -> Path:
    """A random LLaVA-NeXT (anyres) checkpoint: CLIP tower with CLS, Llama LM, base crop + tiles + newlines.
    tokenizer: another tokenizer with an ``<image>`` token (default: the word-level test tokenizer)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer or build_tokenizer()
    pinpoints = pinpoints or tiny_pinpoints(image_size)
    config = LlavaNextConfig(
        vision_config=_tower_config(
            CLIPVisionConfig,
            image_size,
            patch_size,
            vision_hidden,
            vision_layers,
            vision_heads,
            projection_dim=vision_hidden,
        ),
        text_config=_lm_config(LlamaConfig, tok, text_hidden, text_layers, text_heads, kv_heads),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    return out


def build_tiny_llava_onevision(
    out_dir,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    vision_heads: int = 4,
    text_hidden: int = 64,
    text_layers: int = 4,
    text_heads: int = 4,
    kv_heads: int = 2,
    pinpoints: list | None = None,
    max_tiles: int = 2,
    seed: int = 0,
    tokenizer=None,
) -> Path:
    """A random LLaVA-OneVision checkpoint: SigLIP tower (no CLS), Qwen2 LM, base crop + tiles + newlines;
    ``max_tiles`` small (``anyres_max_2``) so large tilings are shrunk by interpolation, as in the real model."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer or build_tokenizer(extra_specials=("<video>",))
    pinpoints = pinpoints or tiny_pinpoints(image_size)
    config = LlavaOnevisionConfig(
        vision_config=_tower_config(
            SiglipVisionConfig, image_size, patch_size, vision_hidden, vision_layers, vision_heads
        ),
        text_config=_lm_config(Qwen2Config, tok, text_hidden, text_layers, text_heads, kv_heads),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        video_token_id=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=f"anyres_max_{max_tiles}",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=LlavaOnevisionVideoProcessor(size={"height": image_size, "width": image_size}),
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=f"anyres_max_{max_tiles}",
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    return out


def llava15_shaped(out_dir, text_layers: int = 4, text_hidden: int = 256, seed: int = 0) -> Path:
    """LLaVA-1.5 geometry (336 px, 14 px patches, 576 image tokens) with a few small layers."""
    return build_tiny_llava(
        out_dir,
        image_size=336,
        patch_size=14,
        vision_hidden=64,
        vision_layers=3,
        vision_heads=4,
        text_hidden=text_hidden,
        text_layers=text_layers,
        text_heads=max(text_hidden // 64, 1),
        kv_heads=max(text_hidden // 64, 1),
        seed=seed,
    )


def run_lmms_eval(
    model: str,
    model_args: str,
    tasks: str,
    output_path,
    *,
    include_path=None,
    extra=(),
    cwd=None,
    timeout=900,
    batch_size: int = 1,
):
    """Run the real lmms-eval CLI offline and return (results dict or None, combined output).

    The CLI exits 0 even when evaluation fails, so callers check the returned results.
    """
    import glob
    import json
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "lmms_eval", "--model", model, "--model_args", model_args, "--tasks", tasks]
    cmd += ["--batch_size", str(batch_size), "--output_path", str(output_path), "--log_samples", *extra]
    if include_path:
        cmd += ["--include_path", str(include_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    files = sorted(glob.glob(os.path.join(str(output_path), "**", "*_results.json"), recursive=True))
    results = json.load(open(files[-1])) if files else None
    return results, proc.stdout + proc.stderr


def run_lmms_eval_many(runs: list[dict], config_path, *, cwd=None, timeout=900) -> str:
    """Run the real lmms-eval CLI once on a ``--config`` YAML listing several runs (each a dict of
    CLI options: model, model_args, tasks, output_path, ...; batch_size 1 unless a run says otherwise) and return
    its combined output.

    lmms-eval evaluates the list in one process, one run after the other, and goes on after a run
    that fails; read each run's results from its own output_path (``results_of``). One process
    instead of one per run saves the interpreter start-up and imports, and ``cli_sharing_task_index``
    saves re-indexing every task directory for every run (about 3 s a run on 2 cores).
    """
    import os
    import subprocess
    import sys

    import yaml

    Path(config_path).write_text(yaml.safe_dump([{"batch_size": 1, "log_samples": True, **r} for r in runs]))
    entry = "from lmms_eval_plugins.testing import cli_sharing_task_index; cli_sharing_task_index()"
    cmd = [sys.executable, "-c", entry, "--config", str(config_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    return proc.stdout + proc.stderr


def cli_sharing_task_index() -> None:
    """``python -m lmms_eval`` (its ``cli_evaluate``, arguments from ``sys.argv``), except that the runs of one
    ``--config`` list share one scan of the task directories: lmms-eval's ``TaskManager`` builds the same index
    (every YAML under lmms_eval/tasks and ``--include_path``) for each run. Each run still gets its own copy
    of the index and loads its tasks, model and data itself."""
    import copy

    from lmms_eval.__main__ import cli_evaluate
    from lmms_eval.tasks import TaskManager

    scan, indexes = TaskManager.initialize_tasks, {}

    def initialize_tasks(self, include_path=None, include_defaults=True):
        key = (repr(include_path), include_defaults)
        if key not in indexes:
            indexes[key] = scan(self, include_path=include_path, include_defaults=include_defaults)
        return copy.deepcopy(indexes[key])

    TaskManager.initialize_tasks = initialize_tasks
    cli_evaluate()


def results_of(output_path) -> dict | None:
    """The newest ``*_results.json`` under an lmms-eval output_path, or None."""
    import glob
    import json
    import os

    files = sorted(glob.glob(os.path.join(str(output_path), "**", "*_results.json"), recursive=True))
    return json.load(open(files[-1])) if files else None


def read_samples(output_path, task: str) -> list[dict]:
    """The per-sample log (``--log_samples``) of one task, in doc order."""
    import glob
    import json
    import os

    files = sorted(glob.glob(os.path.join(str(output_path), "**", f"*_samples_{task}.jsonl"), recursive=True))
    if not files:
        return []
    rows = [json.loads(line) for line in open(files[-1])]
    return sorted(rows, key=lambda r: r["doc_id"])


def llava_next_shaped(out_dir, text_layers: int = 4, text_hidden: int = 256, seed: int = 0) -> Path:
    """LLaVA-NeXT geometry (336 px tiles of 14 px patches: a 24x24 base grid + anyres tiles on the
    llava-v1.6 pinpoints + newlines) with a few small layers."""
    return build_tiny_llava_next(
        out_dir,
        image_size=336,
        patch_size=14,
        vision_hidden=64,
        vision_layers=3,
        vision_heads=4,
        text_hidden=text_hidden,
        text_layers=text_layers,
        text_heads=max(text_hidden // 64, 1),
        kv_heads=max(text_hidden // 64, 1),
        pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        seed=seed,
    )


def llava_onevision_shaped(out_dir, text_layers: int = 4, text_hidden: int = 256, seed: int = 0) -> Path:
    """LLaVA-OneVision geometry (384 px SigLIP crops of 14 px patches: a 27x27 base grid, anyres_max_9
    tiles on 384-multiples up to 6x6, shrunk by interpolation past 9 tiles) with a few small layers."""
    pinpoints = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    return build_tiny_llava_onevision(
        out_dir,
        image_size=384,
        patch_size=14,
        vision_hidden=64,
        vision_layers=3,
        vision_heads=4,
        text_hidden=text_hidden,
        text_layers=text_layers,
        text_heads=max(text_hidden // 64, 1),
        kv_heads=max(text_hidden // 64, 1),
        pinpoints=pinpoints,
        max_tiles=9,
        seed=seed,
    )


# Qwen2.5-VL-7B-Instruct's preprocessor_config.json pixel bounds: a 448x336 image (multiples of 28) keeps its size
QWEN_PIXELS = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384}


def qwen2_5_vl_shaped(out_dir, text_layers: int = 4, text_hidden: int = 256, seed: int = 0) -> Path:
    """Qwen2.5-VL-7B vision geometry (14 px patches, 2x2 merge, 112 px attention windows, the 7B's
    period of 7 windowed blocks + 1 full-attention block, M-RoPE over the merged grid) with a few
    small layers; the processor keeps the 7B's min/max pixels (3136 / 12845056), so a 448x336
    image is not resized: 24x32 patches -> a 12x16 merged grid of 192 image tokens."""
    import dataclasses

    from .shapeworld.qwen_model import QwenGeometry, build_model

    heads = max(text_hidden // 64, 1)
    geo = dataclasses.replace(
        QwenGeometry(),
        window_size=112,
        vision_hidden=64,
        vision_layers=8,
        vision_heads=4,
        vision_intermediate=128,
        fullatt_blocks=(7,),
        text_hidden=text_hidden,
        text_layers=text_layers,
        text_heads=heads,
        text_kv_heads=heads,
        text_intermediate=2 * text_hidden,
        mrope_section=(8, 12, 12),  # head_dim 64: the 7B's 16/24/24 of 128, halved
    )
    model, processor = build_model(seed=seed, geometry=geo)
    processor.image_processor.size = dict(QWEN_PIXELS)
    out = Path(out_dir)
    model.eval().save_pretrained(out)
    processor.save_pretrained(out)
    return out


def assert_ranked_alike(ours: list, ref: list, value: dict, tol: float) -> None:
    """``ours`` ranks like ``ref`` (both best first, possibly top-k prefixes) outside near-ties.

    ``value`` maps every key to the reference value the ranking sorts by. Two keys whose values
    differ by at most ``tol`` (but are not equal) may come in either order, and a top-k prefix may
    swap keys at its boundary within ``tol``: which of two values that close sorts first depends on
    the CPU's kernels. Exactly equal values keep the reference order (that is the sort's stability,
    the same on every CPU). Compare the values themselves separately, within ``tol``."""
    import numpy as np

    pos = {k: i for i, k in enumerate(ref)}
    ascending = len(ref) < 2 or value[ref[0]] <= value[ref[-1]]
    sign = 1.0 if ascending else -1.0
    v = np.array([sign * value[k] for k in ours], dtype=np.float64)
    # a key ranked later must not be better by more than tol: no pair (earlier i, later j) with v[i] > v[j] + tol
    worst_so_far = np.maximum.accumulate(v)
    bad = np.nonzero(worst_so_far[:-1] > v[1:] + tol)[0] if len(v) > 1 else []
    assert len(bad) == 0, f"{ours[bad[0] + 1]!r} ranked after a key worse by more than {tol}"
    for i in range(len(ours) - 1):
        a, b = ours[i], ours[i + 1]
        if value[a] == value[b] and a in pos and b in pos:
            assert pos[a] < pos[b], f"exact tie {a!r}, {b!r} in another order than the reference's (stable sort)"
    # top-k prefixes: keys in one list only must sit at the boundary, within tol of the other list's last value
    for mine, other in ((ours, ref), (ref, ours)):
        if not other:
            continue
        edge = sign * value[other[-1]]
        for k in set(mine) - set(other):
            assert sign * value[k] <= edge + tol, (
                f"{k!r} is ranked by one side only and is not a near-tie at the boundary"
            )


def load_parity_script(name: str):
    """A harness script of bench/parity/ (not a package) loaded as a module, e.g. ``tiny_llava15``."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "parity" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Gemma 3's chat format (turns between <start_of_turn> and <end_of_turn>, the assistant is "model"); the
# processor expands each <start_of_image> into <start_of_image> + image soft tokens + <end_of_image>.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
GEMMA3_SPECIALS = ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<image_soft_token>", "<end_of_image>")


def build_tiny_gemma3(
    out_dir,
    *,
    image_size: int = 64,
    patch_size: int = 8,
    tokens_per_image: int = 16,
    vision_hidden: int = 32,
    text_hidden: int = 64,
    text_layers: int = 4,
    sliding_window: int = 24,
    vision_layers: int = 2,
    layer_types: list | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    padding_side: str = "right",
) -> Path:
    """A random Gemma 3 checkpoint: SigLIP tower, the projector's average pool to ``tokens_per_image``
    tokens, a Gemma 3 language model alternating sliding-window (``sliding_window`` keys) and global
    layers, and the real Gemma3Processor (squash resize, image soft tokens between boi and eoi).
    ``padding_side``: the tokenizer's (the real Gemma tokenizers pad left)."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = byte_level_tokenizer(
        GEMMA3_SPECIALS,
        named={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
    )
    tok.padding_side = tok.init_kwargs["padding_side"] = padding_side  # init_kwargs: what is saved
    heads = 4
    text = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        head_dim=text_hidden // heads,
        query_pre_attn_scalar=text_hidden // heads,
        sliding_window=sliding_window,
        layer_types=layer_types
        or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(text_layers)],
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = _tower_config(SiglipVisionConfig, image_size, patch_size, vision_hidden, vision_layers, 4)
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    image_processor = Gemma3ImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=tokens_per_image,
    )
    processor.save_pretrained(out)
    return out


def gemma3_shaped(out_dir, text_layers: int = 4, text_hidden: int = 256, seed: int = 0) -> Path:
    """Gemma 3's geometry (896 px SigLIP input of 14 px patches, a 64x64 patch grid pooled to 16x16 = 256
    image tokens; five sliding-window layers of 1024 keys to one global, the last layer global) with a few
    small layers."""
    return build_tiny_gemma3(
        out_dir,
        image_size=896,
        patch_size=14,
        tokens_per_image=256,
        vision_hidden=64,
        vision_layers=3,
        text_hidden=text_hidden,
        text_layers=text_layers,
        sliding_window=1024,
        layer_types=[
            "full_attention" if (i + 1) % 6 == 0 or i == text_layers - 1 else "sliding_attention"
            for i in range(text_layers)
        ],
        seed=seed,
    )


def build_tiny_qwen3_vl(
    out_dir,
    *,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    deepstack_layers: tuple = (0, 1),
    text_hidden: int = 64,
    text_layers: int = 4,
    min_pixels: int = 64 * 64,
    max_pixels: int = 160 * 160,
    weight_std: float | None = 0.15,
    seed: int = 0,
) -> Path:
    """A random Qwen3-VL checkpoint: 16 px patches merged 2x2, learned positions of the tower, DeepStack
    features from the vision layers ``deepstack_layers`` added after the first len(deepstack_layers) LM
    layers, interleaved M-RoPE, the ShapeWorld Qwen tokenizer and Qwen's chat template, and the real
    Qwen3VLProcessor (min/max pixels as given). ``weight_std``: matrices redrawn wider than the default
    init, so greedy answers depend on the image (None keeps the init)."""
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
    )
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from .shapeworld.qwen_model import CHAT_TEMPLATE, build_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    ids = tok.convert_tokens_to_ids
    heads = 4
    head_dim = text_hidden // heads
    third = head_dim // 2 // 3
    text = dict(
        vocab_size=len(tok),
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [head_dim // 2 - 2 * third, third, third],
            "mrope_interleaved": True,
        },
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        depth=vision_layers,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_heads=2,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=text_hidden,
        num_position_embeddings=64,
        deepstack_visual_indexes=list(deepstack_layers),
    )
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    if weight_std is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=g) * weight_std)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    kw = dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, **kw),
        tokenizer=tok,
        video_processor=Qwen3VLVideoProcessor(size=size, **kw),
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    return out


def qwen3_vl_shaped(out_dir, text_layers: int = 4, text_hidden: int = 256, seed: int = 0) -> Path:
    """Qwen3-VL's vision geometry (16 px patches merged 2x2, the released processors' pixel bounds 65536 /
    16777216: a 448x336 image becomes 448x320, a 10x14 merged grid of 140 tokens) with DeepStack after the
    first min(3, text_layers) LM layers (the released models inject 3) and a few small layers."""
    ds = min(3, text_layers)
    return build_tiny_qwen3_vl(
        out_dir,
        vision_hidden=64,
        vision_layers=ds,
        deepstack_layers=tuple(range(ds)),
        text_hidden=text_hidden,
        text_layers=text_layers,
        min_pixels=65536,
        max_pixels=16777216,
        weight_std=None,
        seed=seed,
    )


INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<IMG_CONTEXT>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INTERNVL_SPECIALS = ("<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>")


def build_tiny_internvl(
    out_dir,
    *,
    image_size: int = 64,
    patch_size: int = 8,
    max_patches: int = 6,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    text_hidden: int = 64,
    text_layers: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A random InternVL (HF-native ``InternVLForConditionalGeneration``): an InternViT-style tower with a
    CLS token, pixel shuffle (downsample ratio 0.5: each LM token is a 2x2 group of patches), a Qwen2
    language model, and the real InternVLProcessor (dynamic tiles of ``image_size`` px plus a thumbnail,
    up to ``max_patches`` tiles; the image's tokens between ``<img>`` and ``</img>``)."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
        InternVLVisionConfig,
        Qwen2Config,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = byte_level_tokenizer(
        INTERNVL_SPECIALS,
        named={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    text = _lm_config(Qwen2Config, tok, text_hidden, text_layers, 4, 2)
    vision = _tower_config(InternVLVisionConfig, [image_size] * 2, [patch_size] * 2, vision_hidden, vision_layers, 4)
    tokens_per_tile = (image_size // patch_size // 2) ** 2
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.context_image_token_id,
        image_seq_length=tokens_per_tile,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    image_processor = GotOcr2ImageProcessor(
        size={"height": image_size, "width": image_size},
        max_patches=max_patches,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    processor = InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=InternVLVideoProcessor(size={"height": image_size, "width": image_size}),
        chat_template=INTERNVL_CHAT_TEMPLATE,
        image_seq_length=tokens_per_tile,
    )
    processor.save_pretrained(out)
    return out


def internvl_shaped(out_dir, text_layers: int = 4, text_hidden: int = 256, seed: int = 0) -> Path:
    """InternVL's HF geometry (448 px tiles of 14 px patches, pixel-shuffled to 16x16 = 256 tokens per tile; up to
    12 tiles plus the thumbnail, lmms-eval internvl_hf's max_patches: a 448x336 image becomes 4x3 tiles + the
    thumbnail = 3328 image tokens) with a small 2-layer tower and a few small LM layers."""
    return build_tiny_internvl(
        out_dir,
        image_size=448,
        patch_size=14,
        max_patches=12,
        vision_hidden=64,
        vision_layers=2,
        text_hidden=text_hidden,
        text_layers=text_layers,
        seed=seed,
    )
