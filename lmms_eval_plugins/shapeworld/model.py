"""The tiny LLaVA of the ShapeWorld testbed: config, word-level tokenizer, processor.

Everything is a stock transformers class (LlavaForConditionalGeneration with a CLIP
vision tower and a Llama text model, PreTrainedTokenizerFast, CLIPImageProcessor,
LlavaProcessor), so the checkpoint loads through the same path as llava-1.5-7b-hf.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from .data import vocabulary_texts
from .scenes import COLOUR_NAMES, NUMBER_WORDS, PLURALS, SHAPES, SIZE_CLASSES

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
# Words split on whitespace; brackets and punctuation are their own tokens, except that a
# decimal number keeps a trailing comma ("0.12,") so that decoding with spaces gives
# "[ 0.12, 0.40, 0.30, 0.58 ]", which refcoco's parser reads.
PRETOKENIZE_PATTERN = r"\d+\.\d+,|\d+\.\d+|[\[\]\(\)\.,\?!:;]|[^\s\[\]\(\)\.,\?!:;]+"

# LLaVA-1.5 layout: "USER: <image>\n{text} ASSISTANT:".  Accepts string content (simple
# llava_hf, which already put "<image>\n" in the text) and content lists (chat llava_hf).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class Geometry:
    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 256
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 256

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def image_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def max_positions(self) -> int:
        """Room for the image tokens plus a long prompt and answer (512 for the 64-token tiny)."""
        n = 512
        while n < self.image_tokens + 256:
            n *= 2
        return n


# The testbed in LLaVA-1.5's own geometry (issue 24): 336 px, 14 px patches, a 24x24 grid of 576
# image tokens, hidden_states[-2] without CLS, the mlp2x_gelu projector (LlavaMultiModalProjector),
# a Llama of 8 layers with as many KV heads as query heads (no GQA, as Llama-2-7B).
LLAVA15_GEOMETRY = Geometry(
    image_size=336,
    patch_size=14,
    vision_hidden=128,
    vision_layers=4,
    vision_heads=4,
    vision_intermediate=512,
    text_hidden=128,
    text_layers=8,
    text_heads=8,
    text_kv_heads=8,
    text_intermediate=384,
)
GEOMETRIES = {"llava": Geometry(), "llava-1.5": LLAVA15_GEOMETRY}


def _pre_tokenizer():
    return pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated")]
    )


def build_vocabulary() -> list:
    pre = _pre_tokenizer()
    words = []
    seen = set(SPECIAL_TOKENS)

    def add(w):
        if w not in seen:
            seen.add(w)
            words.append(w)

    for w in (
        list(SHAPES) + list(PLURALS.values()) + list(COLOUR_NAMES) + list(SIZE_CLASSES) + list(NUMBER_WORDS.values())
    ):
        add(w)
    for d in range(10):
        add(str(d))
    for text in vocabulary_texts():
        for w, _ in pre.pre_tokenize_str(text.lower()):
            add(w)
    add("[")
    add("]")
    for k in range(101):
        add(f"{k / 100:.2f},")
        add(f"{k / 100:.2f}")
    return SPECIAL_TOKENS + words


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(build_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=512,
        padding_side="left",
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(geometry: Geometry = Geometry(), tokenizer=None) -> LlavaProcessor:
    tokenizer = tokenizer or build_tokenizer()
    tokenizer.model_max_length = geometry.max_positions
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": geometry.image_size},
        crop_size={"height": geometry.image_size, "width": geometry.image_size},
        do_center_crop=True,
        resample=3,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=geometry.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        image_token="<image>",
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer, geometry: Geometry = Geometry()) -> LlavaConfig:
    vision = CLIPVisionConfig(
        image_size=geometry.image_size,
        patch_size=geometry.patch_size,
        hidden_size=geometry.vision_hidden,
        intermediate_size=geometry.vision_intermediate,
        num_hidden_layers=geometry.vision_layers,
        num_attention_heads=geometry.vision_heads,
        projection_dim=geometry.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=geometry.text_hidden,
        intermediate_size=geometry.text_intermediate,
        num_hidden_layers=geometry.text_layers,
        num_attention_heads=geometry.text_heads,
        num_key_value_heads=geometry.text_kv_heads,
        max_position_embeddings=geometry.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=geometry.image_tokens,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    return config


def build_model(seed: int = 0, geometry: Geometry = Geometry()):
    """(model, processor) freshly initialised from `seed`."""
    import torch

    tokenizer = build_tokenizer()
    processor = build_processor(geometry, tokenizer)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(tokenizer, geometry))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, processor


def geometry_dict(geometry: Geometry = Geometry()) -> dict:
    return asdict(geometry) | {"grid": geometry.grid, "image_tokens": geometry.image_tokens}
