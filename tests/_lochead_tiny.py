"""A tiny random LLaVA whose tokenizer can write a box: byte-level BPE with no merges.

The shared test checkpoint's word-level tokenizer joins tokens with spaces, so
"[0.12, 0.34, 0.56, 0.78]" cannot come back out of it; llava_lochead refuses it (tested).
"""

from pathlib import Path


def byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lmms_eval_plugins.testing import CHAT_TEMPLATE

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_byte_level_llava(out_dir, seed: int = 0) -> Path:
    """build_tiny_llava's geometry (4 LM layers x 4 heads, 4x4 image grid) with a byte-level tokenizer."""
    import torch
    from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from lmms_eval_plugins.testing import CHAT_TEMPLATE, build_tiny_llava

    out = Path(out_dir)
    build_tiny_llava(out, seed=seed)
    tok = byte_level_tokenizer()
    config = LlavaConfig.from_pretrained(out)
    config.text_config.vocab_size = len(tok)
    config.text_config.bos_token_id, config.text_config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    config.text_config.pad_token_id = tok.pad_token_id
    config.image_token_id = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    old = AutoProcessor.from_pretrained(out)
    LlavaProcessor(
        image_processor=old.image_processor,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(out)
    return out
