"""The ShapeWorld testbed in the Qwen2.5-VL architecture (`shapeworld-tiny-qwen`).

Stock transformers classes only (Qwen2_5_VLForConditionalGeneration with its windowed
vision tower and M-RoPE text model, a word-level PreTrainedTokenizerFast, the Qwen2-VL image
processor, Qwen2_5_VLProcessor with Qwen's own chat template), so stock lmms-eval
`qwen2_5_vl` loads the checkpoint like Qwen/Qwen2.5-VL-7B-Instruct.

Resolution: the real patch size (14) and merge size (2), so lmms-eval's `qwen_vl_utils`
resize (multiples of 28) and the processor agree; min_pixels = max_pixels = 112 * 112 make
every 336 px ShapeWorld image 112 x 112 -> 8 x 8 patches -> a 4 x 4 merged grid of 16 LM
tokens. `shapeworld-tiny` reads an 8 x 8 grid; 256 patches per image (a 224 px input) made
CPU training too slow for the time this checkpoint had on a shared 2-core machine, and 168 px
(6 x 6) still took ~4 s a step there. lmms-eval passes its own min/max pixels (200704 /
1605632) unless told: use `--model_args pretrained=...,min_pixels=12544,max_pixels=12544`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tokenizers import Tokenizer, models, normalizers
from transformers import PreTrainedTokenizerFast

from .model import _pre_tokenizer, build_vocabulary

QWEN_SPECIAL_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# lmms-eval's qwen2_5_vl default system prompt, in the vocabulary so the model reads it
SYSTEM_PROMPT = "You are a helpful assistant."
EXTRA_WORDS = ["system", "user", "assistant", "you", "are", "a", "helpful"]

# Qwen2-VL / Qwen2.5-VL-Instruct's chat template (default system message, image and video
# placeholders between vision start/end); string and list content both work.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class QwenGeometry:
    image_size: int = 112  # after qwen_vl_utils / the processor's resize at min = max pixels
    patch_size: int = 14
    merge_size: int = 2
    window_size: int = 56  # pixels: 2 x 2 merged tokens per attention window (Qwen2.5-VL: 4 x 4), 4 windows
    vision_hidden: int = 64  # a narrow tower keeps CPU training affordable
    vision_layers: int = 4
    vision_heads: int = 2
    vision_intermediate: int = 128
    fullatt_blocks: tuple = (1, 3)
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 256
    mrope_section: tuple = (4, 6, 6)  # sums to head_dim / 2 = 16 (Qwen2.5-VL: 16, 24, 24 of 64)

    @property
    def pixels(self) -> int:
        return self.image_size * self.image_size

    @property
    def grid(self) -> int:
        return self.image_size // (self.patch_size * self.merge_size)

    @property
    def image_tokens(self) -> int:
        return self.grid * self.grid


def build_tokenizer() -> PreTrainedTokenizerFast:
    words = [w for w in build_vocabulary() if w not in ("<s>", "</s>", "<image>")]
    vocab = {}
    for w in words[:2] + QWEN_SPECIAL_TOKENS + EXTRA_WORDS + words[2:]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = _pre_tokenizer()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        model_max_length=512,
        padding_side="left",
    )
    fast.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(geometry: QwenGeometry = QwenGeometry(), tokenizer=None):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tokenizer = tokenizer or build_tokenizer()
    kw = dict(
        min_pixels=geometry.pixels,
        max_pixels=geometry.pixels,
        patch_size=geometry.patch_size,
        merge_size=geometry.merge_size,
        temporal_patch_size=2,
    )
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**kw),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**kw),
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer, geometry: QwenGeometry = QwenGeometry()):
    from transformers import Qwen2_5_VLConfig

    ids = tokenizer.convert_tokens_to_ids
    vision = dict(
        depth=geometry.vision_layers,
        hidden_size=geometry.vision_hidden,
        intermediate_size=geometry.vision_intermediate,
        num_heads=geometry.vision_heads,
        patch_size=geometry.patch_size,
        spatial_merge_size=geometry.merge_size,
        temporal_patch_size=2,
        window_size=geometry.window_size,
        fullatt_block_indexes=list(geometry.fullatt_blocks),
        out_hidden_size=geometry.text_hidden,
    )
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=geometry.text_hidden,
        intermediate_size=geometry.text_intermediate,
        num_hidden_layers=geometry.text_layers,
        num_attention_heads=geometry.text_heads,
        num_key_value_heads=geometry.text_kv_heads,
        max_position_embeddings=512,
        max_window_layers=geometry.text_layers,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(geometry.mrope_section)},
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_model(seed: int = 0, geometry: QwenGeometry = QwenGeometry()):
    """(model, processor) freshly initialised from `seed`."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    tokenizer = build_tokenizer()
    processor = build_processor(geometry, tokenizer)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(build_config(tokenizer, geometry))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model, processor


def geometry_dict(geometry: QwenGeometry = QwenGeometry()) -> dict:
    return asdict(geometry) | {"grid": geometry.grid, "image_tokens": geometry.image_tokens, "pixels": geometry.pixels}
